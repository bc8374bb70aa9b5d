"""`afedge device setup|list|serve`: build the emulated ARM64 device, show devices, serve one over TVM RPC."""
from __future__ import annotations

import argparse
import sys


def cmd_setup(args: argparse.Namespace) -> int:
    from rich.console import Console

    from afedge.device.image import setup_emu_arm64
    con = Console(stderr=True)
    with con.status("building emu-arm64") as status:
        image = setup_emu_arm64(progress=lambda m: (status.update(m), con.print(m)))
    info = image.info()
    con.print(f"emu-arm64 ready in {image.root}: QEMU {info['qemu']['version']} ({info['qemu']['suite']}), "
              f"arm64 {info['rootfs']} root filesystem, guest " +
              ", ".join(f"{k} {v}" for k, v in info["guest"].items()))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from afedge.device.devices import KEY_FEATURES, emu_device, emulated_cpus
    from afedge.device.image import SetupError, load_image
    from afedge.device.session import DeviceProcess
    try:
        image = load_image()
    except SetupError as e:
        image, why = None, str(e)
    cols = ["device", "qemu -cpu", "requires", "kernels it lets the libraries pick"]
    table = Table(*cols, *(["key features the guest sees"] if args.probe else []))
    for cpu, c in emulated_cpus().items():
        row = [f"emu:{cpu}", c["qemu_cpu"], " ".join(c["features"]), c["kernels"]]
        if args.probe and image is not None:
            proc = DeviceProcess(emu_device(cpu, image))
            row.append(" ".join(f for f in KEY_FEATURES if f in proc.hello["features"]))
            proc.close()
        table.add_row(*row)
    con = Console()
    con.print(table)
    if image is None:
        con.print(f"[yellow]{why}[/]")
    con.print("also: adb:SERIAL (a phone over adb), rpc:KEY@HOST:PORT (a TVM RPC tracker's device, TVM artifacts)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from afedge.device.devices import EmuDevice, parse_device
    from afedge.device.rpc import serve_emulated
    device = parse_device(args.device)
    if not isinstance(device, EmuDevice):
        raise ValueError(f"{args.device}: only emulated devices (emu:CPU) are served from here")
    host, _, port = args.tracker.rpartition(":")
    proc = serve_emulated(device, (host, int(port)), args.key, args.port)
    print(f"{device.name} registered with the tracker {args.tracker} as '{args.key}' (^C stops it)",
          file=sys.stderr)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        raise


def add_parser(sub) -> None:
    d = sub.add_parser("device", help="emulated ARM64 devices, adb and TVM RPC devices").add_subparsers(
        dest="device_cmd", required=True)
    s = d.add_parser("setup", help="build a device (QEMU, root filesystem, aarch64 wheels) into the cache "
                                   "($AFEDGE_CACHE, default ~/.cache/afedge); idempotent")
    s.add_argument("name", choices=["emu-arm64"])
    s.set_defaults(fn=cmd_setup)
    s = d.add_parser("list", help="the devices afedge knows")
    s.add_argument("--probe", action="store_true", help="start each emulated CPU and show the features it reports")
    s.set_defaults(fn=cmd_list)
    s = d.add_parser("serve", help="run a TVM RPC server on an emulated device, registered with a tracker "
                                   "(start one with `python -m tvm.exec.rpc_tracker --port 9190`)")
    s.add_argument("device", help="emu:CPU")
    s.add_argument("--tracker", required=True, help="HOST:PORT")
    s.add_argument("--key", default="linux-arm64", help="the key to register under (default linux-arm64)")
    s.add_argument("--port", type=int, help="the server's port (default: a free one)")
    s.set_defaults(fn=cmd_serve)

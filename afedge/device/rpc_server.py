"""A TVM RPC server for a device, in this process: `python3 rpc_server.py --tracker HOST:PORT --key KEY`.

TVM's own `python -m tvm.exec.rpc_server` starts its server in a child interpreter (`sys.executable -m
tvm.exec.popen_worker`), which an emulated device cannot exec (QEMU user mode runs one binary; there is no binfmt
handler to run a second one). This runs TVM's server state in the device process itself and waits on it. Like
worker.py it imports only the standard library and TVM's runtime (TVM_USE_RUNTIME_LIB=1).
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tracker", required=True, help="HOST:PORT of the RPC tracker")
    p.add_argument("--key", required=True, help="the device key to register under (e.g. linux-arm64)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=9091)
    p.add_argument("--port-end", type=int, help="the end of the port range to try (default: port + 100)")
    args = p.parse_args(argv)
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    from tvm.rpc.server import PopenRPCServerState

    host, _, port = args.tracker.rpartition(":")
    state = PopenRPCServerState(args.host, args.port, args.port_end or args.port + 100, False, (host, int(port)), args.key,
                                None, None, True, True, None)
    print(f"rpc server on {args.host}:{state.port}, key {args.key}, tracker {args.tracker}", file=sys.stderr,
          flush=True)
    state.thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

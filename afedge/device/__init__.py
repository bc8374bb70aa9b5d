"""Devices that run a bundle's ARM64 artifacts: emulated ARM64 Linux (QEMU user mode), adb, TVM RPC."""

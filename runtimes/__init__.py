"""Runtimes, one file each, registered in RUNTIMES. Heavy imports happen inside each runtime."""

"""Exporters, one file each, registered in EXPORTERS. Heavy imports happen inside each exporter."""

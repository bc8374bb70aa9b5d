"""Target profiles as TOML data (one file per hardware class), loaded and validated by afedge.target."""

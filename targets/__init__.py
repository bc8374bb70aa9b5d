"""Target profiles as TOML data; see afedge.targets_loader... loaded by afedge.target."""

"""aelab's Hydra config groups, shipped inside the package as `aelab.configs`."""

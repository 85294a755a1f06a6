"""aelab's Hydra launchers, shipped with aelab (Hydra finds plugins in the hydra_plugins namespace)."""

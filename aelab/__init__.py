"""aelab: a config-driven experiment runner for autoencoder losses and regularizers."""
__version__ = "0.1.0"

"""Streaming sensor anomaly detector: the core stages and the daemon that wires them."""

__version__ = "0.1.0"

__all__ = ["__version__"]

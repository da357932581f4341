"""ztunnel-py: an Istio-ambient-style node agent in Python."""

__version__ = "0.1.0"

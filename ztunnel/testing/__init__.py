"""Test and benchmark helpers (loopback mesh, simulated-cluster agents): never imported by the product."""

"""Test and benchmark helpers (the loopback mesh, agents for a simulated cluster).

Never imported by the product (tests/test_enroll_layering.py checks it)."""

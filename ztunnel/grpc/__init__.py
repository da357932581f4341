"""A small gRPC (HTTP/2) client and server on trio: what the control-plane protocols need.

``status`` and ``framing`` and ``engine`` are sans-IO (no trio); ``client`` and
``server`` drive them over trio streams. See docs/control-plane.md for why this is
not grpcio or purerpc.
"""

"""Shared test configuration: root-only tests skip with a reason when not root."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Examples are regenerated each run; no on-disk database (the checkout may be read-only).
settings.register_profile("ztunnel", database=None)
settings.load_profile("ztunnel")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(
        reason="needs root (network namespaces / iptables / eBPF); CI runs as root"
    )
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)

"""Shared test configuration: root-only tests skip with a reason when not root."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Agents the tests start as processes (`ztunnel run`) inherit this environment: one process
# each unless a test asks for workers (ZTUNNEL_WORKER_THREADS in its own env), so the suite
# exercises the single-process path by default (docs/architecture.md, "Worker processes";
# the multi-worker path has its own tests: tests/test_workers*.py). In-process agents
# (Agent(config).run) already default to one process.
os.environ.setdefault("ZTUNNEL_WORKER_THREADS", "1")

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

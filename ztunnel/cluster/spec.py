"""The packaged demo cluster file. The parser itself is the product's
(``ztunnel.sources.clusterfile.spec``): the simulator builds what the agent reads."""

from __future__ import annotations

from importlib import resources

from ztunnel.sources.clusterfile.spec import ClusterSpec, loads_spec

DEMO_FILE = "ztunnel/cluster/demo.yaml"


def demo_text() -> str:
    return resources.files("ztunnel.cluster").joinpath("demo.yaml").read_text(encoding="utf-8")


def demo_spec() -> ClusterSpec:
    """The packaged demo cluster (ztunnel/cluster/demo.yaml)."""
    return loads_spec(demo_text(), DEMO_FILE)

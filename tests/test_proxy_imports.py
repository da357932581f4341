"""The proxy layer's import graph: flows never import the proxy that runs them, no cycles.

Every import counts, also those inside functions and ``if TYPE_CHECKING:`` blocks
(a cycle hidden there is still a cycle).
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PROXY = Path(__file__).resolve().parent.parent / "ztunnel" / "proxy"


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            # "from ztunnel.proxy import headers" imports a module too
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {f"ztunnel.proxy.{p.stem}": p for p in PROXY.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def test_no_flow_imports_the_workload_proxy() -> None:
    offenders = [m for m, deps in graph().items() if "ztunnel.proxy.workload_proxy" in deps]
    assert offenders == []


def test_the_proxy_layer_has_no_import_cycle() -> None:
    try:
        order = list(TopologicalSorter(graph()).static_order())
    except CycleError as exc:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"import cycle: {exc.args[1]}") from exc
    assert {"ztunnel.proxy.workload_proxy", "ztunnel.proxy.outbound"} <= set(order)

"""Who may import whom around enrollment: every import statement counts, also those inside
functions and ``if TYPE_CHECKING:`` blocks."""

from __future__ import annotations

from import_graph import imports as _imports
from import_graph import modules as _modules
from import_graph import under

SIMULATOR = ("ztunnel.cluster", "ztunnel.testing", "ztunnel.demo")
# Modules this part of the design owns: none may sit on an import cycle.
ENROLLMENT = (
    "ztunnel.agent",
    "ztunnel.enroll",
    "ztunnel.sources",
    "ztunnel.redirect",
    "ztunnel.cli",
)


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    stack = list(_imports(start))
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack.extend(_imports(module))
    return seen


def test_the_import_scan_sees_imports_inside_functions_and_type_checking_blocks() -> None:
    assert "ztunnel.demo" in _imports("ztunnel.cli")  # imported inside main()
    assert "ztunnel.redirect.netns" in _imports("ztunnel.proxy.sockets")  # TYPE_CHECKING


def test_the_product_never_imports_the_simulator_or_test_helpers() -> None:
    offenders = {
        module: sorted(m for m in _imports(module) if under(m, *SIMULATOR[:2]))
        for module in _modules()
        if not under(module, *SIMULATOR)
    }
    assert {m: found for m, found in offenders.items() if found} == {}


def test_enrollment_knows_neither_the_agent_nor_any_source() -> None:
    for module in _modules():
        if under(module, "ztunnel.enroll"):
            reached = _reachable(module)
            assert not {m for m in reached if under(m, "ztunnel.agent", "ztunnel.cli")}
            assert not {m for m in reached if under(m, "ztunnel.sources", "ztunnel.proxy")}


def test_no_import_cycle_passes_through_enrollment() -> None:
    cycles = {
        module: sorted(m for m in _imports(module) if module in _reachable(m))
        for module in _modules()
        if under(module, *ENROLLMENT, *SIMULATOR)
    }
    assert {m: back for m, back in cycles.items() if back} == {}

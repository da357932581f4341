"""Who may import whom around enrollment: every import statement counts, also those inside
functions and ``if TYPE_CHECKING:`` blocks."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ztunnel"
SIMULATOR = ("ztunnel.cluster", "ztunnel.testing", "ztunnel.demo")
# Modules this part of the design owns: none may sit on an import cycle.
ENROLLMENT = (
    "ztunnel.agent",
    "ztunnel.enroll",
    "ztunnel.sources",
    "ztunnel.redirect",
    "ztunnel.cli",
)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _under(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@cache
def _imports(module: str) -> frozenset[str]:
    """The package modules ``module`` imports, wherever the statement is."""
    modules = _modules()
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports pkg.mod when that is a module.
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(n for n in names if n in modules and n != module)
    return frozenset(found)


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
        module: sorted(m for m in _imports(module) if _under(m, SIMULATOR[:2]))
        for module in _modules()
        if not _under(module, SIMULATOR)
    }
    assert {m: found for m, found in offenders.items() if found} == {}


def test_enrollment_knows_neither_the_agent_nor_any_source() -> None:
    for module in _modules():
        if _under(module, ("ztunnel.enroll",)):
            reached = _reachable(module)
            assert not {m for m in reached if _under(m, ("ztunnel.agent", "ztunnel.cli"))}
            assert not {m for m in reached if _under(m, ("ztunnel.sources", "ztunnel.proxy"))}


def test_no_import_cycle_passes_through_enrollment() -> None:
    cycles = {
        module: sorted(m for m in _imports(module) if module in _reachable(m))
        for module in _modules()
        if _under(module, ENROLLMENT + SIMULATOR)
    }
    assert {m: back for m, back in cycles.items() if back} == {}

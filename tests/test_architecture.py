"""The import graph of the whole package, as docs/architecture.md draws it.

Every import statement counts, also those inside functions and ``if TYPE_CHECKING:`` blocks:
a cycle hidden behind a lazy import is still a cycle in the design.

1. Layers: a module imports only modules of its own layer or the layers above it.
2. No cycles between modules.
3. Sans-IO modules (protocol engines, policy, state, model) never import trio.
"""

from __future__ import annotations

from import_graph import imports as _imports
from import_graph import modules as _modules
from import_graph import under as _under

# Top to bottom; a module may import only from its own row or the rows above it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ztunnel", "ztunnel.errors", "ztunnel.model"),
    ("ztunnel.config",),
    ("ztunnel.state",),
    ("ztunnel.policy",),
    ("ztunnel.telemetry",),
    ("ztunnel.proto", "ztunnel.grpc"),
    ("ztunnel.identity",),
    ("ztunnel.hbone",),
    ("ztunnel.redirect",),
    ("ztunnel.sources",),
    ("ztunnel.proxy",),
    ("ztunnel.workers",),
    ("ztunnel.enroll",),
    ("ztunnel.waypoint",),
    ("ztunnel.admin",),
    ("ztunnel.agent", "ztunnel.cli", "ztunnel.waypoint_app"),
    ("ztunnel.cluster", "ztunnel.demo", "ztunnel.testing"),  # the simulator and test helpers
)
# The one sanctioned upward edge: `ztunnel demo` is a command of the CLI.
ALLOWED_UPWARD = {("ztunnel.cli", "ztunnel.demo")}

SANS_IO = (
    "ztunnel.model",
    "ztunnel.h2wire",
    "ztunnel.state",
    "ztunnel.policy",
    "ztunnel.hbone.engine",
    "ztunnel.hbone.events",
    "ztunnel.proxy.socks5_proto",
    "ztunnel.grpc.engine",
    "ztunnel.grpc.framing",
    "ztunnel.sources.xds_protocol",
    "ztunnel.sources.zds_protocol",
    "ztunnel.sources.kubernetes.protocol",
    "ztunnel.sources.kubernetes.derive",
    "ztunnel.waypoint.h2proto",
    "ztunnel.waypoint.routes",
    "ztunnel.waypoint.sniff",
)


def _layer(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer): the most specific prefix decides
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if _under(module, prefix) and len(prefix) > best[0]:
                best = (len(prefix), index)
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[1]


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        _layer(module)


def test_no_module_imports_a_layer_below_its_own() -> None:
    upward = sorted(
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module in _modules()
        for target in _imports(module)
        if _layer(target) > _layer(module) and (module, target) not in ALLOWED_UPWARD
    )
    assert not upward, "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in _modules():
        if root in index:
            continue
        work = [(root, iter(sorted(_imports(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(_imports(child)))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_there_are_no_import_cycles() -> None:
    assert not _cycles()


def test_sans_io_modules_never_import_trio() -> None:
    offenders = sorted(
        module
        for module in _modules()
        if any(_under(module, p) for p in SANS_IO) and "trio" in _imports(module, external=True)
    )
    assert not offenders


def test_the_checks_see_lazy_imports_and_would_catch_a_violation() -> None:
    # cli imports the demo inside a function: the scan must see it (and it is the one exception).
    assert "ztunnel.demo" in _imports("ztunnel.cli")
    assert _layer("ztunnel.demo") > _layer("ztunnel.cli")
    # The layer lookup is by most specific prefix, and the table puts the simulator last.
    assert _layer("ztunnel.cluster.net") == len(LAYERS) - 1
    assert _layer("ztunnel.model.address") == 0


def test_one_logging_style_structlog_everywhere() -> None:
    """Only telemetry/logging.py touches stdlib logging (it routes it into structlog); every
    other module logs through ``structlog.get_logger(name)`` with key=value fields."""
    offenders = sorted(
        module
        for module in _modules()
        if module != "ztunnel.telemetry.logging" and "logging" in _imports(module, external=True)
    )
    assert not offenders

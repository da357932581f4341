"""Logging: structlog on top of stdlib ``logging``, with ztunnel's filter syntax.

Why stdlib underneath: its logger hierarchy gives per-module levels that change
at runtime without reconfiguring anything, and third-party stdlib loggers end up
in the same stream and format. The filter syntax is ztunnel's (tracing's
EnvFilter): ``debug`` or ``ztunnel::proxy=debug,access=off,info`` -- comma
separated ``target=level`` directives plus at most one bare default level.
Targets map to logger names: ``ztunnel::proxy`` and ``ztunnel.proxy`` are both
the ``ztunnel.proxy`` logger; access logs use the ``access`` logger.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from ztunnel.model.logfilter import LEVEL_NAMES, LogFilter

ACCESS_LOGGER = "access"
TRACE = 5  # tracing's TRACE; below stdlib DEBUG
_OFF = logging.CRITICAL + 10

LEVELS: Mapping[str, int] = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": _OFF,
}
assert set(LEVELS) == set(LEVEL_NAMES)  # the filter's parser (model/) knows the same names


class Bare(str):
    """A string rendered without quotes in the plain format (addresses, like ztunnel's ``%``)."""

    __slots__ = ()


def logger_name(target: str) -> str:
    """ztunnel target (``ztunnel::proxy``) or Python module path -> stdlib logger name."""
    return target.replace("::", ".")


class _LogState:
    """The process-wide logging state (logging itself is process-wide)."""

    def __init__(self) -> None:
        self.initial = LogFilter("info")
        self.current = self.initial
        self.handler: logging.Handler | None = None


_state = _LogState()


def configure_logging(
    level: str = "info", fmt: str = "plain", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging to ``stream`` in ``fmt`` ("plain" or "json").

    ``level`` is a filter spec (see module docstring); it is also what ``reset`` restores.
    Calling again replaces the previous configuration.
    """
    if fmt not in ("plain", "json"):
        raise ValueError(f"log format must be 'plain' or 'json', not {fmt!r}")
    initial = LogFilter.parse(level)
    shared: list[Processor] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    renderer = render_json if fmt == "json" else render_plain
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
        foreign_pre_chain=shared,
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _state.handler is not None:
        root.removeHandler(_state.handler)
    root.addHandler(handler)
    _state.handler = handler
    _state.initial = initial
    _apply(initial)


def set_filter(spec: str) -> str:
    """Change levels at runtime (replacing the whole previous filter); returns the new filter."""
    _apply(LogFilter.parse(spec))
    return current_filter()


def reset() -> str:
    """Go back to the filter given to ``configure_logging``; returns it."""
    _apply(_state.initial)
    return current_filter()


def current_filter() -> str:
    return str(_state.current)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger bound to the stdlib logger ``name`` (a module path or ``access``)."""
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(logger_name(name))
    return logger


def level_check(name: str) -> Callable[[str], bool]:
    """``keeps(level)`` for the logger ``name``: whether the current filter writes a line at
    ``level`` ("debug", "info", ...). Asked per line (the filter changes at runtime), it lets
    a caller skip building fields for a line that would be dropped; before
    ``configure_logging`` (structlog's own defaults) every line is kept."""
    stdlib = logging.getLogger(logger_name(name))

    def keeps(level: str) -> bool:
        return not structlog.is_configured() or stdlib.isEnabledFor(LEVELS[level])

    return keeps


# Libraries that log every request at info (httpx2: each Kubernetes watch and patch): kept at
# this level unless the filter names them (RUST_LOG=httpx2=info) or asks for less.
QUIET_LIBRARIES: Mapping[str, str] = {"httpx2": "warn"}


def _apply(new: LogFilter) -> None:
    for target, _level in _state.current.targets:
        logging.getLogger(logger_name(target)).setLevel(logging.NOTSET)
    logging.getLogger().setLevel(LEVELS[new.default])
    _quiet_libraries(new)
    for target, level in new.targets:
        logging.getLogger(logger_name(target)).setLevel(LEVELS[level])
    _state.current = new


def _quiet_libraries(new: LogFilter) -> None:
    for name, level in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(max(LEVELS[level], LEVELS[new.default]))


def _level_name(event: EventDict) -> str:
    level = str(event.pop("level", "info")).lower()
    return "warn" if level == "warning" else level


# Plain text is one record per line, fields separated by spaces and the head by tabs. Values
# come from the network (headers, baggage, SNI-less authorities, peer errors), so nothing may
# reach the line raw that could end it or fake a separator: control characters (CR, LF, TAB,
# ESC...), DEL, and Unicode line/paragraph separators are written as escapes (backslash-n,
# backslash-x1b, backslash-u2028), whatever the field (message, key, value, logger name).
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_BARE_UNSAFE = frozenset(' "=\\')


def escape_text(text: str) -> str:
    """``text`` with every non-printable character escaped (printable text unchanged, but
    for backslashes, doubled so that an escape in the output is always ours)."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_ESCAPES.get(ch) or (ch if ch.isprintable() else _code(ch)) for ch in text)


def _code(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _plain_value(value: object) -> str:
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Bare) and value.isprintable() and _BARE_UNSAFE.isdisjoint(value):
        return str(value)
    # JSON quoting escapes control characters and (ensure_ascii) all non-ASCII; DEL is the
    # one non-printable ASCII character it leaves raw.
    return json.dumps(str(value)).replace("\x7f", "\\u007f")


def render_plain(_logger: WrappedLogger, _name: str, event: EventDict) -> str:
    """``<time>\\t<level>\\t<logger>\\t<message> k=v ...``, like ztunnel's text logs.

    Always exactly one line per record, whatever the values; a traceback follows on
    lines that start with two spaces, so no line of it can pass for a record.
    """
    head = "\t".join(
        (
            escape_text(str(event.pop("timestamp", ""))),
            _level_name(event),
            escape_text(str(event.pop("logger", ""))),
            escape_text(str(event.pop("event", ""))),
        )
    )
    exc = event.pop("exception", None)
    fields = " ".join(
        f"{escape_text(str(k))}={_plain_value(v)}" for k, v in event.items() if v is not None
    )
    line = f"{head} {fields}" if fields else head
    if not exc:
        return line
    return "\n".join([line, *(f"  {escape_text(ln)}" for ln in str(exc).splitlines())])


def render_json(_logger: WrappedLogger, _name: str, event: EventDict) -> str:
    """One JSON object per line: level, time, scope, message, then the fields."""
    out: MutableMapping[str, object] = {
        "level": _level_name(event),
        "time": event.pop("timestamp", ""),
        "scope": event.pop("logger", ""),
        "message": event.pop("event", ""),
    }
    out.update((k, v) for k, v in event.items() if v is not None)
    return json.dumps(out, default=str)


def unconfigure_logging() -> None:
    """Undo ``configure_logging`` (tests; embedding): drop our handler, reset levels."""
    root = logging.getLogger()
    if _state.handler is not None:
        root.removeHandler(_state.handler)
        _state.handler = None
    _apply(LogFilter("warn"))  # stdlib's own default
    _state.initial = _state.current
    structlog.reset_defaults()

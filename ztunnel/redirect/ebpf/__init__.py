"""eBPF redirection (``REDIRECT_MODE=ebpf``): tc programs from ``ebpf/``, compiled with bcc.

See docs/ebpf.md for how the programs work and how to inspect them.
"""

from ztunnel.redirect.ebpf.environment import EbpfUnavailable, check_environment
from ztunnel.redirect.ebpf.redirector import (
    DEFAULT_PIN_ROOT,
    EbpfRedirector,
    EbpfSettings,
    clean_other_modes,
    original_dst,
    other_modes_present,
)
from ztunnel.redirect.ebpf.tc import EbpfError

__all__ = [
    "DEFAULT_PIN_ROOT",
    "EbpfError",
    "EbpfRedirector",
    "EbpfSettings",
    "EbpfUnavailable",
    "check_environment",
    "clean_other_modes",
    "original_dst",
    "other_modes_present",
]

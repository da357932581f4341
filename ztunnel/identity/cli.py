"""``ztunnel ca init DIR``: write a new root CA in Istio's plugged-in CA layout."""

from __future__ import annotations

import sys
from pathlib import Path

from ztunnel.identity.ca import CA_FILES, init_ca_dir

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_EXISTS = 2


def ca_init_command(directory: str, trust_domain: str, force: bool) -> int:
    """Create the CA files and print them. Exit code 0; 2 if files exist; 1 on I/O error."""
    target = Path(directory)
    try:
        init_ca_dir(target, trust_domain=trust_domain, force=force)
    except FileExistsError as exc:
        print(f"ztunnel ca init: {exc}", file=sys.stderr)
        return EXIT_EXISTS
    except OSError as exc:
        print(f"ztunnel ca init: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    for name in CA_FILES:
        print(f"wrote {target / name}")
    print(f"root CA for trust domain {trust_domain!r}; keep ca-key.pem private")
    return EXIT_OK

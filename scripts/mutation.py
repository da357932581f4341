"""Mutation testing of the security-critical modules with mutmut (issue 14).

    .venv/bin/python scripts/mutation.py              # every mutant of the modules below
    .venv/bin/python scripts/mutation.py --quick      # CI: CONNECT validation + CSR key checks
    .venv/bin/python scripts/mutation.py --mutants 'ztunnel.policy.rbac.*'

Runs in a copy of the checkout's tracked files (mutmut writes a ``mutants/`` tree next to
the code), prints the score, writes ``mutation-results.json`` and ``survivors.md`` (every
surviving mutant with its category) into the work directory, and prints the diff of each
survivor that no category explains (``EXPLANATIONS``). Exit status 1 when such a survivor
exists (a check no test notices) or mutmut itself failed. docs/reliability.md records the
score and the categories.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = Path(sys.executable).parent / "mutmut"

# The checks an attacker would like gone: TLS contexts and peer identity checks, the CA's
# CSR checks, the HBONE CONNECT/authority validation, inbound resolution and the self-call
# check, policy evaluation, the limits per peer and per pod.
MODULES = (
    "ztunnel/identity/tls.py",
    "ztunnel/identity/ca.py",
    "ztunnel/hbone/engine.py",
    "ztunnel/state/resolve.py",
    "ztunnel/policy/rbac.py",
    "ztunnel/policy/match.py",
    "ztunnel/proxy/admission.py",
)
# Unit and transcript tests of those modules (the loopback/e2e tests are too slow to run
# once per mutant; what they add is not counted in this score).
TESTS = (
    "tests/test_identity_tls.py",
    "tests/test_identity_ca.py",
    "tests/test_identity_certificate.py",
    "tests/test_reliability_mutants.py",
    "tests/test_hbone_engine.py",
    "tests/test_hbone_connection.py",
    "tests/test_hbone_hostile.py",
    "tests/test_state_resolve.py",
    "tests/test_policy_rbac.py",
    "tests/test_reliability_policy.py",
    "tests/test_peer_limits.py",
)
QUICK_MODULES = ("ztunnel/hbone/engine.py", "ztunnel/identity/ca.py")
QUICK_TESTS = (
    "tests/test_hbone_engine.py",
    "tests/test_identity_ca.py",
    "tests/test_reliability_mutants.py",
)
QUICK_MUTANTS = (
    "ztunnel.hbone.engine.x_validate_connect*",
    "ztunnel.hbone.engine.x_parse_authority*",
    "ztunnel.identity.ca.x__check_csr_key*",
)


# Why a surviving mutant is not a missing test, by the function it is in (mutmut names
# functions x_<name>, methods xǁ<Class>ǁ<name>). Checked in order; the first match wins.
EXPLANATIONS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("diagnostics", ("rbac.x_explain", "rbac.x_decision_to_json", "rbac.x__conn_json",
                     "rbac.x__describe_conn", "match.x_describe_string_match"),
     "text and JSON for `ztunnel ctl explain` and the config dump, not a decision"),
    ("endpoint choice", ("resolve.x__rank", "resolve.x__candidates", "resolve.x__by_locality",
                         "resolve.x__scope_matches", "resolve.x__pick"),
     "load balancing and locality among allowed endpoints, not an access check"),
    ("CA tooling", ("ca.x_new_intermediate", "ca.x_init_ca_dir", "ca.x__write_file",
                    "ca.x_new_root", "ca.xǁFileCAǁload", "ca.xǁFakeCAǁ"),
     "making CA files for `ztunnel ca init` and tests; FileCA checks what it loads"),
    ("HTTP/2 connection", ("engine.xǁHboneEngineǁ", "engine.xǁ_H2Connectionǁ",
                           "engine.x__h2_settings", "engine.xǁH2Settingsǁ"),
     "HTTP/2 drain and flow accounting, not the CONNECT checks; S3's engine work (phase 2)"),
    ("policy cache/prefilter", ("match.x_compiled", "match.x__rule_ports", "match.x__policy_ports",
                                "match.x__clause_ports"),
     "a mutant that disables the compiled-policy cache or widens the port prefilter changes "
     "speed, not decisions (narrowing it is caught: test_reliability_policy.py)"),
    ("resolve (S2)", ("resolve.",),
     "state/resolve.py is being restructured by S2 (AgentPorts, SocketAddr, typed outcomes); "
     "tests against its new API are phase 2"),
)  # fmt: skip
MESSAGE_ONLY = (
    "only the text of an error or log message changes; its type (what callers check) does not"
)


# Mutants that cannot change behaviour, by the exact change (removed, added) they make.
EQUIVALENT: tuple[tuple[str, str, str], ...] = (
    ("=False", "=None", "None is falsy like False"),
    ("= False", "= None", "None is falsy like False"),
    ("os.W_OK) else None", "os.W_OK)) or True else None",
     "differs only where /dev/shm is not writable (not on the test machines); tested there"),
    ("replace(microsecond=0)", "replace(microsecond=1)",
     "the sub-second part of notBefore (certificates encode whole seconds)"),
    ("_load_single_cert(ca_cert_pem, CA_CERT)", "_load_single_cert(ca_cert_pem, None)",
     "the file name appears only in error messages"),
    ("ipaddress.IPv4Address(host)", "ipaddress.IPv4Address(None)",
     "a dotted-quad also passes the hostname-label rule that follows"),
    ("return 0 < len(host) <= 253", "return 0 <= len(host) <= 253",
     "an empty host has one empty label, which the label rule refuses"),
    ("self.stream_id = stream_id", "self.stream_id = None",
     "the stream id appears only in error messages"),
    ('.decode("latin-1")', '.decode("LATIN-1")', "codec names are case-insensitive"),
    ('.decode("ascii")', '.decode("ASCII")', "codec names are case-insensitive"),
    ("check_hostname = False", "check_hostname = None", "None is falsy like False"),
    ("num_tickets = 0", "num_tickets = 1",
     "session tickets: our clients never resume, so a ticket is only wasted bytes"),
    ("if workers <= 1:", "if workers < 1:", "limits divided by 1 worker are the same limits"),
    ("self._counts.get(key, 0) - 1", "self._counts.get(key, 1) - 1",
     "releasing an uncounted key: a count of 0 or -1 both leave it uncounted"),
    ("if count < self.maximum:", "if count <= self.maximum:",
     "after a release the count is below the maximum (acquire stops at it)"),
    ("if len(self._until) > _MAX_PENALTIES:", "if len(self._until) >= _MAX_PENALTIES:",
     "prunes expired keys one add earlier; how many running ones go has its own bound"),
    ("if until <= now]", "if until < now]",
     "a key expiring this instant is expired for check(), and with one penalty length the "
     "oldest key, which expires first, is the one forgotten either way"),
)  # fmt: skip
# Lines that only build the text of an error message (the raise is on another line).
MESSAGE_LINES = ("want = ",)


def _message_only(line: str) -> bool:
    text = line[1:].lstrip()
    return "raise " in text or "Error(" in text or "log." in text or text.startswith(MESSAGE_LINES)


def explain_survivor(name: str, diff: str) -> tuple[str, str] | None:
    """(category, why) for a surviving mutant, or None when it is a missing test."""
    changed = [ln for ln in diff.splitlines() if ln[:1] in "-+" and ln[:3] not in ("---", "+++")]
    removed = [ln for ln in changed if ln.startswith("-")]
    added = [ln for ln in changed if ln.startswith("+")]
    for old, new, why in EQUIVALENT:
        if any(old in ln for ln in removed) and any(new in ln for ln in added):
            return "equivalent", why
    if removed and all(
        "raise " in ln
        or "Error(" in ln
        or "log." in ln
        or ln[1:].lstrip().startswith(MESSAGE_LINES)
        for ln in removed
    ):
        return "message text", MESSAGE_ONLY
    for category, prefixes, why in EXPLANATIONS:
        if any(f"ztunnel.{_module_of(p)}" in name and p.split(".", 1)[1] in name for p in prefixes):
            return category, why
    return None


def _module_of(prefix: str) -> str:
    head = prefix.split(".", 1)[0]
    return {"rbac": "policy.rbac", "match": "policy.match", "resolve": "state.resolve",
            "ca": "identity.ca", "engine": "hbone.engine", "tls": "identity.tls",
            "admission": "proxy.admission"}[head]  # fmt: skip


def survivor_report(repo: Path, names: list[str]) -> tuple[str, list[str]]:
    """Markdown: every survivor with its category (or UNEXPLAINED) and diff line."""
    lines = ["| mutant | category | change |", "|---|---|---|"]
    unexplained = []
    for name in names:
        diff = show(repo, name)
        found = explain_survivor(name, diff)
        if found is None:
            unexplained.append(name)
        change = " / ".join(
            ln[1:].strip().replace("|", "\\|")
            for ln in diff.splitlines()
            if ln[:1] in "-+" and not ln.startswith(("---", "+++"))
        )
        lines.append(
            f"| `{name}` | {found[0] if found else '**UNEXPLAINED**'} | `{change[:160]}` |"
        )
    return "\n".join(lines) + "\n", unexplained


def _toml_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(workdir: Path, modules: tuple[str, ...], tests: tuple[str, ...]) -> Path:
    """A copy of the tracked files with a [tool.mutmut] section for this run."""
    repo = workdir / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            dst = repo / name.decode()
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    with (repo / "pyproject.toml").open("a") as f:
        f.write(
            "\n[tool.mutmut]\n"
            'source_paths = ["ztunnel/"]\n'
            f"only_mutate = {_toml_list(modules)}\n"
            f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
            'also_copy = ["tests/", "examples/"]\n'
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q", "--timeout=120"]\n'
        )
    return repo


def survivors(repo: Path) -> list[str]:
    out = subprocess.run([str(MUTMUT), "results"], cwd=repo, capture_output=True, text=True).stdout
    return [ln.split(":")[0].strip() for ln in out.splitlines() if ": survived" in ln]


def show(repo: Path, mutant: str) -> str:
    return subprocess.run(
        [str(MUTMUT), "show", mutant], cwd=repo, capture_output=True, text=True
    ).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a handful of mutants (CI)")
    parser.add_argument("--mutants", nargs="*", default=[], help="mutant name globs")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    parser.add_argument("--max-children", type=int, default=1, help="parallel mutants")
    args = parser.parse_args(argv)
    modules, tests = (QUICK_MODULES, QUICK_TESTS) if args.quick else (MODULES, TESTS)
    patterns = list(args.mutants) or (list(QUICK_MUTANTS) if args.quick else [])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ztunnel-mutation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    repo = prepare(workdir, modules, tests)
    env = {**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"}
    log = workdir / "mutmut.log"
    with log.open("w") as out:
        run = subprocess.run(
            [str(MUTMUT), "run", f"--max-children={args.max_children}", *patterns],
            cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        subprocess.run(
            [str(MUTMUT), "export-cicd-stats"], cwd=repo, env=env, stdout=out, stderr=out
        )
    stats_file = repo / "mutants" / "mutmut-cicd-stats.json"
    if run.returncode != 0 or not stats_file.exists():
        print(f"mutmut failed (exit {run.returncode}); see {log}")
        return 1
    stats = json.loads(stats_file.read_text())
    lost = survivors(repo)
    tested = sum(stats[k] for k in ("killed", "survived", "timeout", "suspicious", "segfault"))
    caught = tested - stats["survived"]
    score = caught / tested if tested else 0.0
    result = {"modules": modules, "patterns": patterns, "stats": stats, "score": score,
              "survived": lost, "tests": tests}  # fmt: skip
    (workdir / "mutation-results.json").write_text(json.dumps(result, indent=2))
    print(f"mutants tested {tested}, caught {caught}, survived {stats['survived']}, "
          f"no tests {stats['no_tests']}: score {score:.1%}")  # fmt: skip
    table, unexplained = survivor_report(repo, lost)
    (workdir / "survivors.md").write_text(table)
    for mutant in unexplained:
        print(f"\n--- survived, not explained: {mutant}\n{show(repo, mutant)}")
    print(f"\n{len(lost) - len(unexplained)} survivors explained by category, "
          f"{len(unexplained)} not (see {workdir / 'survivors.md'})")  # fmt: skip
    print(f"results: {workdir / 'mutation-results.json'}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())

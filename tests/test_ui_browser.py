"""The admin UI in a real browser: headless Debian Chromium driven by Playwright.

Playwright's own browser download cannot work offline, so the tests launch the system's
``/usr/bin/chromium`` (``executable_path``) with a fresh profile directory; Playwright
talks to it over the DevTools protocol. Skipped with a reason when either is missing.

- against ``ztunnel demo --keep`` as a user runs it (root): the printed URL serves the
  graph, the demo's allowed and denied edges appear with the right identities, a click
  on a denied edge shows the deciding policy and the access log, a click on a workload
  its certificate; a screenshot is saved (path printed);
- against an admin server holding hostile names and values: they are shown as text and
  nothing in them runs.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_demo import ROOT, _env, _leftovers, _prefix
from test_ui_api import BAGGAGE, HOSTILE, World, deny

from ztunnel.admin.server import serve_admin

CHROMIUM = os.environ.get("ZTUNNEL_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEMO_READY_TIMEOUT = 180.0
WAIT_MS = 20_000
CLIENT_ID = "spiffe://cluster.local/ns/demo/sa/client"
ECHO_ID = "spiffe://cluster.local/ns/demo/sa/echo"
OTHER_ID = "spiffe://cluster.local/ns/demo/sa/other"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A Chromium context with a fresh user-data dir; skips when Chromium is missing."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')"
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not found: Debian's chromium package (scripts/install.sh as root)")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 820},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-screenshots")


class PageLog:
    """What the page reported: console errors (CSP violations among them) and dialogs."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def edges(page: Any) -> list[tuple[str, str]]:
    """(outcome, title) of every edge drawn."""
    page.wait_for_selector("g.edge", timeout=WAIT_MS)
    found = page.eval_on_selector_all(
        "g.edge",
        "els => els.map(e => [e.dataset.outcome, e.querySelector('title').textContent])",
    )
    return [(str(outcome), str(title)) for outcome, title in found]


def click_edge_label(page: Any, title_part: str) -> None:
    labels = page.locator("g.edge-label")
    for i in range(labels.count()):
        if title_part in (labels.nth(i).locator("title").text_content() or ""):
            labels.nth(i).locator("text").click()  # a real mouse click on the drawn label
            return
    raise AssertionError(f"no edge label with {title_part!r}")


# -- the demo -----------------------------------------------------------------------------


@contextlib.contextmanager
def demo_keep() -> Iterator[tuple[dict[str, str], str]]:
    """``ztunnel demo --keep`` as a user runs it: yields ({node: UI URL}, its output)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztunnel.cli", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output = ""
    try:
        deadline = time.monotonic() + DEMO_READY_TIMEOUT
        while "Press Ctrl-C" not in output:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"demo ended early ({proc.wait()}):\n{output}"
            output += line
        urls = dict(re.findall(r"UI agent@(\S+): (http://127\.0\.0\.1:\d+/)", output))
        assert set(urls) == {"node1", "node2"}, output
        yield urls, output
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        while (line := lines.get(timeout=5)) is not None:
            output += line
        stdout.close()
        assert code == 0, output
        if "Cluster " in output:
            assert _leftovers(_prefix(output)) == []


@pytest.mark.root
@pytest.mark.slow
def test_demo_ui_shows_allowed_and_denied_edges_and_the_deciding_policy(
    browser: Any, artefacts: Path
) -> None:
    with demo_keep() as (urls, _output):
        page = browser.new_page()
        log = PageLog(page)
        seen: list[tuple[str, str]] = []
        for node in ("node2", "node1"):  # node1 last: it is the one clicked and pictured
            page.goto(urls[node])
            page.wait_for_selector('g.edge[data-outcome="denied"]', timeout=WAIT_MS)
            assert page.text_content("#title") == f"ztunnel on {node}"
            seen += edges(page)
        node1 = edges(page)
        # Allowed: mTLS from client to the echo pods, with both SPIFFE identities.
        assert (
            "mtls",
            f"demo/client → demo/echo-1: mTLS, allowed\n{CLIENT_ID} → {ECHO_ID}",
        ) in node1
        assert any(o == "mtls" and t.startswith("demo/client → demo/echo-2") for o, t in node1)
        # Denied: `other` (a mesh identity the policy does not allow) and the plaintext
        # legacy client (no identity), each to whichever echo pod the VIP picked.
        denied = [t for o, t in seen if o == "denied"]
        assert any(
            re.fullmatch(
                rf"demo/other → demo/echo-[12]: denied by policy\n{OTHER_ID} → {ECHO_ID}", t
            )
            for t in denied
        ), denied
        assert any(
            re.fullmatch(
                rf"legacy/legacy-client → demo/echo-[12]: denied by policy\n"
                rf"no client identity → {ECHO_ID}",
                t,
            )
            for t in denied
        ), denied
        # One click on a denied edge: the deciding policy and the access-log lines.
        node1_denied = [t for o, t in node1 if o == "denied"]
        who = "demo/other" if any(t.startswith("demo/other") for t in node1_denied) else "legacy"
        click_edge_label(page, who)
        page.wait_for_selector("#details .explain pre", timeout=WAIT_MS)
        page.wait_for_selector("#details .logs pre", timeout=WAIT_MS)
        explanation = page.text_content("#details .explain") or ""
        assert "DENY: no allow policies matched" in explanation
        assert "allow policy demo/echo-allow-client did not match" in explanation
        access = page.text_content("#details .logs") or ""
        assert 'message="connection complete"' in access and "connection denied" in access
        shot = artefacts / "demo-node1-denied-edge.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}")
        if target := os.environ.get("ZTUNNEL_UI_SCREENSHOT"):
            shutil.copy(shot, target)
        # A workload this agent holds a certificate for: identity, serial, expiry.
        page.locator('g.node[data-node$="/demo/client"]').click()
        page.wait_for_selector("#details dl", timeout=WAIT_MS)
        details = page.text_content("#details") or ""
        assert CLIENT_ID in details and "Available" in details
        assert re.search(r"serial\d{10,}", details) and re.search(
            r"expires\d{4}-\d\d-\d\dT", details
        )
        assert log.errors == [] and log.dialogs == []


# -- hostile names ------------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_thread(world: World) -> Iterator[int]:
    """The world's admin server on a loopback port, run by trio in a background thread."""
    ready: queue.Queue[int] = queue.Queue()
    stop: list[Any] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            stop.append((nursery.cancel_scope, trio.lowlevel.current_trio_token()))
            port = await nursery.start(
                lambda task_status: serve_admin(
                    ("127.0.0.1", 0),
                    dump_provider=world.dump,
                    tracker=world.tracker,
                    explainer=world.explain,
                    task_status=task_status,
                )
            )
            ready.put(port)

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    try:
        yield ready.get(timeout=10)
    finally:
        scope, token = stop[0]
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(10)


def test_hostile_names_render_as_text_and_nothing_runs(browser: Any, artefacts: Path) -> None:
    world = World()
    world.demo_traffic()
    world.tracker.open(world.connection(HOSTILE, "echo-1")).close(deny(BAGGAGE + HOSTILE))
    with serve_in_thread(world) as port:
        page = browser.new_page()
        log = PageLog(page)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector('g.node[data-node="wl:c//Pod/evil/x"]', timeout=WAIT_MS)
        node = page.locator('g.node[data-node="wl:c//Pod/evil/x"]')
        assert node.locator("title").text_content() == (
            f"evil/{HOSTILE}\nspiffe://cluster.local/ns/evil/sa/{HOSTILE}"
        )
        node.click()
        page.wait_for_selector("#details .logs pre", timeout=WAIT_MS)
        assert page.text_content("#details h2") == f"evil/{HOSTILE}"
        assert "X-Injected: 1,<img src=x onerror=" in (page.text_content("#details .logs") or "")
        page.screenshot(path=str(artefacts / "hostile.png"), full_page=True)
        # Only our own script, no element made from the data, no dialog, no CSP report.
        assert page.eval_on_selector_all("script", "els => els.map(e => e.src)") == [
            f"http://127.0.0.1:{port}/ui/ui.js"
        ]
        assert page.locator("img").count() == 0
        assert log.dialogs == [] and log.errors == []

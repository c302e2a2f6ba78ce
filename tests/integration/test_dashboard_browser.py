"""The dashboard in a real headless Chromium, driven by Playwright: open the one-time
link from the real CLI, see the fleet, press Restart, watch the pid change.

Skipped when Playwright or a Chromium binary is missing (`playwright install` is never
run: its download hosts may be out of reach). ROTATOR_CHROMIUM names the binary;
ROTATOR_SCREENSHOT=FILE.png saves the page (a fleet of five, for docs/dashboard.png).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PY, Load, cli, component, write_config

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:
    pytest.skip(
        "playwright is not installed (it is in the 'test' extra: pip install -e '.[test]')",
        allow_module_level=True,
    )


def find_chromium() -> str | None:
    named = os.environ.get("ROTATOR_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    mac = "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome"
    return mac if os.access(mac, os.X_OK) else None


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip(
        "no Chromium found (chromium, chromium-browser or google-chrome on PATH, "
        "or ROTATOR_CHROMIUM=/path/to/binary)",
        allow_module_level=True,
    )

# Quiet and offline: no first-run pages, no update or sync traffic, no sandbox (root in CI).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FLEET = ["hermes", "athena", "apollo", "artemis", "hestia"]
WAIT_MS = 30_000  # a rotation on a busy machine; far above the usual second


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


def watch_errors(page: Page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def test_restart_from_the_dashboard(tmp_path: Path, daemon_factory: Any, browser: Browser) -> None:
    screenshot = os.environ.get("ROTATOR_SCREENSHOT")
    names = FLEET if screenshot else FLEET[:3]
    config = write_config(tmp_path, {name: component() for name in names})
    daemon = daemon_factory(config)
    link = cli(config, "dashboard")
    assert link.returncode == 0, link.stderr

    page = browser.new_page(viewport={"width": 1360, "height": 600})
    errors = watch_errors(page)
    with Load(daemon.url(names[0]), clients=2):
        page.goto(link.stdout.strip())
        assert page.url == daemon.admin + "/"  # the used code is gone from the address bar
        expect(page.locator("#access")).to_contain_text("Restart enabled")
        for c in daemon.status()["components"]:
            row = page.locator(f'tr[data-component="{c["name"]}"]')
            expect(row.locator(".pid")).to_have_text(str(c["active"]["pid"]))
            expect(row.locator("td.state")).to_have_text("running")
        expect(page.locator("tbody tr")).to_have_count(len(names))

        target = page.locator(f'tr[data-component="{names[1]}"]')
        old = target.locator(".pid").inner_text()
        target.locator("button.restart").click()
        expect(target.locator(".pid")).not_to_have_text(old, timeout=WAIT_MS)
        assert target.locator(".pid").inner_text() == str(
            daemon.component(names[1])["active"]["pid"]
        )
        expect(target.locator("td.restarts")).to_have_text("1", timeout=WAIT_MS)
        expect(target.locator("button.restart")).to_be_enabled(timeout=WAIT_MS)
        expect(target.locator("td.stop")).to_have_text("graceful")
        # requests/s comes from the counter's deltas in the page: the loaded one is moving.
        loaded = page.locator(f'tr[data-component="{names[0]}"] td.rate')
        expect(loaded).not_to_have_text(re.compile(r"^(0\.0|\u2026)$"), timeout=WAIT_MS)
        if screenshot:
            page.wait_for_timeout(2500)  # the row's highlight fades, the rates settle
            page.screenshot(path=screenshot, full_page=True)
    assert errors == []


def test_open_hands_the_browser_a_page_that_logs_it_in(
    tmp_path: Path, daemon_factory: Any, browser: Browser
) -> None:
    config = write_config(tmp_path, {"web": component()})
    daemon = daemon_factory(config)
    given = tmp_path / "given"  # what `--open` started the browser with
    recorder = tmp_path / "browser.py"
    recorder.write_text(f"import sys; open({str(given)!r}, 'w').write(sys.argv[1])\n")
    opened = subprocess.run(
        [PY, "-m", "rotator", "-c", str(config), "dashboard", "--open"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "BROWSER": f"{PY} {recorder} %s"},
    )
    assert opened.returncode == 0, opened.stderr
    page_url = given.read_text()
    assert page_url.startswith("file://") and "code" not in page_url

    page = browser.new_page()
    errors = watch_errors(page)
    page.goto(page_url)
    page.wait_for_url(daemon.admin + "/")
    # The cookie came with a navigation a file:// page started: SameSite=Strict still
    # lets the page's own requests carry it.
    expect(page.locator("#access")).to_contain_text("Restart enabled")
    assert not Path(page_url.removeprefix("file://")).exists()  # gone with its code
    assert errors == []


def test_without_a_session_the_page_is_read_only_and_shows_text_as_text(
    tmp_path: Path, daemon_factory: Any, browser: Browser
) -> None:
    # A command that cannot start: its name comes back in the component's error.
    evil = "<img src=x onerror=window.pwned=1>"
    config = write_config(tmp_path, {"web": component(), "broken": component(command=[evil])})
    daemon = daemon_factory(config)
    page = browser.new_page()
    errors = watch_errors(page)
    page.goto(daemon.admin + "/")
    expect(page.locator("#access")).to_contain_text("rotator dashboard")
    expect(page.locator('tr[data-component="web"] button.restart')).to_be_disabled()
    broken = page.locator('tr[data-component="broken"]')
    expect(broken.locator("td.state")).to_have_text("failed")
    expect(broken.locator(".error")).to_contain_text(evil)
    assert page.locator("tbody img").count() == 0
    assert page.evaluate("window.pwned") is None
    assert errors == []

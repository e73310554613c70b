"""Fixtures of the dashboard's browser tests: a cluster of real processes of their own
(server + a worker group whose config the tests edit), and Debian's headless Chromium
driven by selenium through Debian's chromedriver. Without chromium the tests are skipped,
except in CI (CI set), where a missing browser fails them: .ci/setup.sh installs it."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from support import TOKEN
from sandmill.localcluster import LocalCluster

SHOTS_ENV = "SANDMILL_SCREENSHOTS"  # where the screenshots go (default: the test's tmp dir)


def _browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (os.path.exists("/usr/bin/chromedriver") and "/usr/bin/chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def dash(pg_url, tmp_path_factory):
    """A server and one worker of a group of the module's own (its own tag, so it takes no
    other test's jobs): the tests edit this group's config."""
    c = LocalCluster(pg_url, tmp_path_factory.mktemp("dash"), token=TOKEN)
    c.group = f"dash-{uuid.uuid4().hex[:6]}"
    c.tag = c.group
    try:
        c.start_server()
        c.start_worker(c.group, tags=c.tag, subworkers=2)
        c.wait_workers(c.group)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get(SHOTS_ENV) or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def driver():
    paths = _browser_paths()
    if paths is None:
        msg = "chromium and chromedriver are not installed (apt install chromium chromium-driver: .ci/setup.sh)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,800", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=paths[1]), options=opts)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()

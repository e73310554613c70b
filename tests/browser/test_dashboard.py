"""The web dashboard in a real (headless) Chromium against a cluster of real processes:
sign in with a token kept in sessionStorage, run code from the page and watch it complete
with its logs, cancel a running job, edit a group's tags with a bad value refused at the
field, see a new worker appear; no console errors; no horizontal overflow at 1280×800 nor
at a phone's 390×844. Screenshots are written by the tests."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from support import SLOWDOWN, TOKEN

WAIT_S = 45 * SLOWDOWN


def until(driver, pred, what: str, timeout: float = WAIT_S):
    try:
        # the page re-renders as the job moves on: an element read as it is replaced is stale
        return WebDriverWait(driver, timeout, poll_frequency=0.1,
                             ignored_exceptions=[StaleElementReferenceException]).until(lambda d: pred(d))
    except Exception as e:  # noqa: BLE001 - say what we waited for, with the page's text
        body = driver.find_element(By.TAG_NAME, "body").text[-2000:]
        raise AssertionError(f"timed out waiting for {what}; page: {body}") from e


def text(driver, css: str) -> str:
    els = driver.find_elements(By.CSS_SELECTOR, css)
    return els[0].text if els else ""


def visible(driver, css: str) -> bool:
    els = driver.find_elements(By.CSS_SELECTOR, css)
    return bool(els) and els[0].is_displayed()


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    """SEVERE entries of the browser's log since the last read, but those expected."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and not any(a in e["message"] for a in allowed)]


def sign_in(driver, base: str, token: str = TOKEN) -> None:
    driver.get(base + "/#/overview")
    until(driver, lambda d: visible(d, "#signin") or visible(d, "#nav"), "the page")
    if visible(d := driver, "#signin"):
        d.find_element(By.ID, "token").send_keys(token)
        d.find_element(By.ID, "signin-button").click()
        until(d, lambda d: visible(d, "#nav"), "the signed-in page")


def go(driver, base: str, hash_: str) -> None:
    driver.get(f"{base}/{hash_}")


def state_of(driver) -> str:
    return text(driver, '#job-fields dd[data-field="state"]')


def run_from_page(driver, dash, code: str) -> str:
    """Run bash ``code`` on the module's group from the jobs page; the job page's id."""
    go(driver, dash.base, "#/jobs")
    until(driver, lambda d: visible(d, "#run-form"), "the run form")
    driver.find_element(By.ID, "run-content").clear()
    driver.find_element(By.ID, "run-content").send_keys(code)
    driver.find_element(By.ID, "run-tag").send_keys(dash.tag)
    driver.find_element(By.ID, "run-submit").click()
    until(driver, lambda d: "#/job/" in d.current_url, "the job page")
    return driver.current_url.rsplit("/", 1)[1]


def test_sign_in_keeps_the_token_for_the_tab_and_out_of_the_url(driver, dash, shots):
    driver.get(dash.base + "/")
    until(driver, lambda d: visible(d, "#signin"), "the sign-in form")
    driver.save_screenshot(str(shots / "signin.png"))
    driver.find_element(By.ID, "token").send_keys("not-the-token")
    driver.find_element(By.ID, "signin-button").click()
    until(driver, lambda d: "invalid token" in text(d, "#signin-error"), "the refusal")
    assert not visible(driver, "#nav")
    assert driver.execute_script("return sessionStorage.getItem('sandmill.token')") is None
    driver.find_element(By.ID, "token").clear()
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.ID, "signin-button").click()
    until(driver, lambda d: visible(d, "#nav") and text(d, "#card-workers-alive"), "the overview")
    assert driver.execute_script("return sessionStorage.getItem('sandmill.token')") == TOKEN
    assert driver.execute_script("return localStorage.length") == 0
    assert TOKEN not in driver.current_url and "not-the-token" not in driver.current_url
    # the only errors: the refused sign-in's 401
    assert console_errors(driver, allowed=("/api/dashboard/groups - Failed to load resource: the server"
                                           " responded with a status of 401",)) == []


def test_run_code_from_the_page_and_watch_it_complete_with_its_logs(driver, dash, shots):
    sign_in(driver, dash.base)
    run_from_page(driver, dash, "echo first-line; sleep 3; echo second-line")
    # the logs stream while it runs: the first line shows before the job ends
    until(driver, lambda d: "first-line" in text(d, "#job-logs"), "the first log line")
    assert state_of(driver) in ("running", "queued"), state_of(driver)
    assert "second-line" not in text(driver, "#job-logs")
    until(driver, lambda d: state_of(d) == "success", "the job's success")
    until(driver, lambda d: "second-line" in text(d, "#job-logs"), "the last log line")
    assert text(driver, "#job-logs").count("first-line") == 1
    assert text(driver, '#job-fields dd[data-field="duration"]')
    assert not visible(driver, "#cancel")
    driver.save_screenshot(str(shots / "job.png"))
    assert console_errors(driver) == []


def test_cancel_a_running_job(driver, dash):
    sign_in(driver, dash.base)
    run_from_page(driver, dash, "echo started; sleep 120")
    until(driver, lambda d: "started" in text(d, "#job-logs"), "the job to start")
    driver.find_element(By.ID, "cancel").click()
    until(driver, lambda d: state_of(d) == "canceled", "the job canceled")
    assert "canceling" in text(driver, "#cancel-msg")
    assert "canceled from the dashboard" in text(driver, "#job-error") or "cancel" in text(driver, "#job-result-json")
    assert console_errors(driver) == []


def test_edit_a_groups_tags_and_see_a_bad_value_refused_at_the_field(driver, dash, shots):
    sign_in(driver, dash.base)
    go(driver, dash.base, f"#/group/{dash.group}")
    until(driver, lambda d: visible(d, "#cfg-form"), "the config form")
    tags = driver.find_element(By.ID, "cfg-tags")
    tags.clear()
    tags.send_keys(f"{dash.tag}, has space")
    driver.find_element(By.ID, "cfg-save").click()
    until(driver, lambda d: "bad tag 'has space'" in text(d, "#err-tags"), "the tags field's error")
    assert text(driver, "#err-limits") == "" and text(driver, "#cfg-saved") == ""
    driver.save_screenshot(str(shots / "group-error.png"))
    with dash.client() as api:
        assert api.get(f"/api/configs/worker__{dash.group}").status_code == 404  # nothing stored
        tags.clear()
        tags.send_keys(f"{dash.tag}, extra-tag")
        driver.find_element(By.ID, "cfg-save").click()
        until(driver, lambda d: "saved" in text(d, "#cfg-saved"), "the save")
        assert text(driver, "#err-tags") == ""
        assert api.get(f"/api/configs/worker__{dash.group}").json() == {"tags": [dash.tag, "extra-tag"]}
        # the group's worker reloads it: the workers page shows the new tag
        go(driver, dash.base, "#/workers")
        until(driver, lambda d: "extra-tag" in text(d, "#workers"), "the worker's new tags")
    assert console_errors(driver, allowed=(f"/api/configs/worker__{dash.group} - Failed to load resource:"
                                           " the server responded with a status of 422",)) == []


def test_a_new_worker_appears(driver, dash):
    sign_in(driver, dash.base)
    go(driver, dash.base, "#/workers")
    group = f"new-{uuid.uuid4().hex[:6]}"
    until(driver, lambda d: dash.group in text(d, "#workers"), "the workers page")
    assert group not in text(driver, "#workers")
    dash.start_worker(group, tags=group)
    until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-worker^="{group}-"]'), "the new worker's row")
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-worker^="{group}-"]')
    assert "process" in row.text and group in row.text
    assert console_errors(driver) == []


PAGES = ["#/overview", "#/workers", "#/jobs", "#/scripts", "#/groups", "#/group/{group}"]


@pytest.mark.parametrize("size", [(1280, 800), (390, 844)], ids=["desktop", "phone"])
def test_every_page_fits_the_screen_without_console_errors(driver, dash, shots, size):
    sign_in(driver, dash.base)
    with dash.client() as api:  # a script and a job, so the pages have something to show
        api.post("/api/w/main/scripts/create", json={"path": "f/dash/hello", "language": "bash",
                                                   "content": "echo hello $1", "summary": "says hello"})
        jid = api.post("/api/w/main/jobs/run/preview", params={"tag": dash.tag},
                       json={"language": "bash", "content": "echo from-the-size-test"}).text
    w, h = size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": w < 600})
    try:
        for page in [*PAGES, f"#/job/main/{jid}", "#/script/main/f/dash/hello"]:
            go(driver, dash.base, page.format(group=dash.group))
            until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#view h1") and
                  d.execute_script("return document.querySelectorAll('#view *').length") > 5, f"{page}")
            time.sleep(0.3)  # its first refresh drawn
            over = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            name = re.sub(r"[^a-z0-9]+", "-", page.split("/")[1])
            driver.save_screenshot(str(shots / f"{name}-{w}x{h}.png"))
            assert over[0] <= over[1], f"{page} at {w}x{h}: {over[0]} px wide in a {over[1]} px window"
            assert text(driver, "#page-error") == "", f"{page}: {text(driver, '#page-error')}"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert console_errors(driver) == []
    assert json.loads(json.dumps(sorted(p.name for p in shots.glob(f"*-{w}x{h}.png"))))

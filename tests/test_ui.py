"""The dashboard (GET /ui) in a real headless browser against an in-process router.

Engines are the project's simulated vLLM engines (they have vLLM's sleep API),
so what the page shows can be checked against what the engine itself says
(``GET /is_sleeping``). The browser is Debian's chromium driven by its own
chromedriver through selenium; nothing is downloaded at test time. Screenshots
at a laptop and a phone width go to the test's tmp_path and /tmp/ui-shots/.
"""
from __future__ import annotations

import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

import aiohttp
import orjson
import pytest
import yaml
from helpers import free_port, wait_for
from router_support import LoopThread, RouterServer

from router.config import load_config
from router.sim import SimEngine, SimOptions

SLEEPY = "org/sleepy-model"
OTHER = "other-model"
ADMIN_KEY = "ui-admin-secret"
SHOTS = Path("/tmp/ui-shots")
LAPTOP = (1366, 768)
PHONE = (390, 844)

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
#: Headless and quiet: no GPU, no sandbox (CI runs as root), no calls home.
CHROME_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--hide-scrollbars", "--force-color-profile=srgb")

needs_browser = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                   reason="no chromium and chromedriver binary (.ci/run installs Debian's "
                                          "chromium and chromium-driver)")


class UiStack:
    """Two models on simulated vLLM engines behind one router, all on the loop thread."""

    def __init__(self, loop: LoopThread, tmp: Path, **router: Any):
        self.loop = loop
        self.engines = {m: SimEngine(SimOptions(engine="vllm", model=m, port=0)) for m in (SLEEPY, OTHER)}
        for e in self.engines.values():
            loop.run(e.start())
        doc = {
            "router": {"router_port": free_port(), "access_log": False, "health_check_interval_seconds": 1,
                       **router},
            "sleep_manager": {"auto_sleep_enabled": False, "min_sleep_duration": 0, "wake_timeout_seconds": 5},
            "instances": [{"name": f"engine-{i}", "model": m, "engine": "vllm", "launch": False,
                           "engine_args": ["--host", "127.0.0.1", "--port", str(e.port)]}
                          for i, (m, e) in enumerate(self.engines.items())],
        }
        path = tmp / f"ui-{doc['router']['router_port']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.router = RouterServer(loop, load_config(path, sim=True)).start()

    @property
    def url(self) -> str:
        return self.router.url

    def close(self) -> None:
        self.router.stop()
        for e in self.engines.values():
            self.loop.run(e.stop())

    def engine_sleeping(self, model: str) -> bool:
        """What the engine itself answers on vLLM's GET /is_sleeping."""
        return bool(self.loop.run(self._get_json(self.engines[model].url + "/is_sleeping"))["is_sleeping"])

    def complete(self, model: str) -> int:
        """One completion through the router; its status."""
        async def go() -> int:
            async with aiohttp.ClientSession() as s:
                async with s.post(self.url + "/v1/completions",
                                  json={"model": model, "prompt": "hi", "max_tokens": 2}) as r:
                    await r.read()
                    return r.status
        return self.loop.run(go())

    @staticmethod
    async def _get_json(url: str) -> Any:
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                return orjson.loads(await r.read())


def http(url: str, headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
    """A plain GET from the test thread: (status, headers, body), errors included."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def make_stack(loop: LoopThread, tmp_path: Path) -> Iterator[Any]:
    made: list[UiStack] = []

    def make(**router: Any) -> UiStack:
        made.append(UiStack(loop, tmp_path, **router))
        return made[-1]
    yield make
    for s in made:
        s.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """The browser, sent away from the router after the test so no /events stream holds its shutdown."""
    yield browser
    browser.get("about:blank")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def viewport(driver: Any, size: tuple[int, int], mobile: bool = False) -> None:
    """The page's exact CSS viewport (a headless window's size would include no chrome, but be exact anyway)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": mobile})


def screenshot(driver: Any, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    assert driver.save_screenshot(str(path)), f"screenshot {name} failed"
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / name)
    return path


def page_errors(driver: Any) -> list[str]:
    """Script errors and CSP refusals in the console since the last call; the 404s of probes
    (/residency, /action/start/..., /logs/...) are answers the page expects, not errors."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def card(driver: Any, model: str) -> Any:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, f'article.card[data-model="{model}"]')


def card_state(driver: Any, model: str) -> Optional[str]:
    return driver.execute_script(
        "const c = document.querySelector(`article.card[data-model=\"${arguments[0]}\"]`);"
        "return c ? c.dataset.state : null;", model)


def card_total(driver: Any, model: str) -> int:
    from selenium.webdriver.common.by import By
    return int(card(driver, model).find_element(By.CSS_SELECTOR, 'dd[data-role="total"]').text)


def buttons(driver: Any, model: str) -> list[str]:
    """The actions of the card's visible buttons, read in one script (buttons are replaced as states change)."""
    return driver.execute_script(
        "const c = document.querySelector(`article.card[data-model=\"${arguments[0]}\"]`);"
        "return c ? [...c.querySelectorAll('button[data-action]')].filter((b) => b.offsetParent !== null)"
        "  .map((b) => b.dataset.action) : [];", model)


# ------------------------------------------------------------------ plain HTTP


def test_files_are_served_with_types_and_nothing_else(make_stack):
    st = make_stack()
    status, headers, body = http(st.url + "/ui")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'src="/ui/app.js"' in body and "default-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"), ("index.html", "text/html")):
        status, headers, body = http(f"{st.url}/ui/{name}")
        assert status == 200 and headers["content-type"].startswith(kind) and body
    for bad in ("/ui/nope.js", "/ui/..%2Fserver%2Fui.py", "/ui/%2E%2E/setup.cfg", "/ui/ui.py"):
        assert http(st.url + bad)[0] == 404, bad
    status, headers, _ = http(st.url + "/ui/")  # a directory is never listed: the page is the answer
    assert status == 200 and headers["content-type"].startswith("text/html")


def test_whoami_asks_the_guard(make_stack):
    open_ = make_stack()
    assert orjson.loads(http(open_.url + "/ui/whoami")[2]) == {"admin": True, "admin_key_configured": False,
                                                               "reason": None}
    keyed = make_stack(admin_api_key=ADMIN_KEY)
    me = orjson.loads(http(keyed.url + "/ui/whoami")[2])
    assert me["admin"] is False and me["admin_key_configured"] is True and "admin key" in me["reason"]
    assert ADMIN_KEY not in me["reason"]
    wrong = orjson.loads(http(keyed.url + "/ui/whoami", {"Authorization": "Bearer nope"})[2])
    assert wrong["admin"] is False
    right = orjson.loads(http(keyed.url + "/ui/whoami", {"Authorization": f"Bearer {ADMIN_KEY}"})[2])
    assert right["admin"] is True


# ----------------------------------------------------------------- the browser


@needs_browser
@pytest.mark.slow  # a real headless browser
def test_dashboard_sleeps_a_model_and_counts_requests(make_stack, page, tmp_path):
    browser = page
    from selenium.webdriver.common.by import By

    st = make_stack()
    viewport(browser, LAPTOP)
    browser.get(st.url + "/ui")
    wait_for(lambda: card_state(browser, SLEEPY) == "awake" and card_state(browser, OTHER) == "awake", 10)
    wait_for(lambda: browser.find_element(By.ID, "role").text == "admin", 5)  # loopback is admin
    wait_for(lambda: browser.find_element(By.ID, "live").text == "live", 5)
    assert buttons(browser, SLEEPY) == ["sleep"] and buttons(browser, OTHER) == ["sleep"]
    replicas = card(browser, SLEEPY).find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.get_attribute("data-instance") for r in replicas] == ["engine-0"]

    # Traffic before the screenshot, so the chart has something to draw.
    for _ in range(3):
        assert st.complete(OTHER) == 200
    wait_for(lambda: card_total(browser, OTHER) == 3, 5)

    card(browser, SLEEPY).find_element(By.CSS_SELECTOR, 'button[data-action="sleep"]').click()
    wait_for(lambda: st.engine_sleeping(SLEEPY), 10, what="the click to put the engine to sleep")
    asleep_at = time.monotonic()
    wait_for(lambda: card_state(browser, SLEEPY) == "sleeping", 2, what="the page to show the sleep within 2 s")
    shown_after = time.monotonic() - asleep_at
    assert card_state(browser, OTHER) == "awake" and not st.engine_sleeping(OTHER)
    wait_for(lambda: buttons(browser, SLEEPY) == ["wakeup"], 3)
    assert "sleeping" in card(browser, SLEEPY).find_element(By.CSS_SELECTOR, ".badge").text
    screenshot(browser, tmp_path, "laptop-1366x768.png")

    # A request meanwhile wakes the model, and the counter the page shows moves.
    before = card_total(browser, SLEEPY)
    assert st.complete(SLEEPY) == 200
    assert not st.engine_sleeping(SLEEPY)
    wait_for(lambda: card_total(browser, SLEEPY) == before + 1, 5, what="the request counter to move")
    wait_for(lambda: card_state(browser, SLEEPY) == "awake", 5)

    # The log pane: this router runs without supervisord, so there is no log to follow and it says so.
    card(browser, SLEEPY).find_element(By.CSS_SELECTOR, "tbody button.link").click()
    wait_for(lambda: "logs unavailable" in browser.find_element(By.ID, "log").text, 5)

    events = browser.find_element(By.ID, "events").text
    assert "sleeping" in events and "waking" in events

    viewport(browser, PHONE, mobile=True)
    time.sleep(0.3)  # one layout pass
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= PHONE[0], f"the page is {width}px wide on a {PHONE[0]}px phone"
    screenshot(browser, tmp_path, "phone-390x844.png")
    assert page_errors(browser) == []
    print(f"sleep shown {shown_after:.2f}s after the engine slept; screenshots in {tmp_path} and {SHOTS}")


#: Run in the page before its own scripts: what the page shows when its load event fires, and
#: what it had fetched and shown when it opened its event stream.
WATCH_FIRST_PICTURE = """
addEventListener("load", () => { window.atLoad = document.querySelectorAll("article.card").length; });
const Original = window.EventSource;
window.EventSource = class extends Original {
  constructor(url) {
    super(url);
    window.atStream = {
      cards: document.querySelectorAll("article.card").length,
      fetched: performance.getEntriesByType("resource").map((e) => new URL(e.name).pathname)
        .filter((p) => !p.startsWith("/ui/")),
    };
  }
};
"""


@needs_browser
@pytest.mark.slow  # a real headless browser
def test_first_picture_is_drawn_from_one_fetch_by_the_load_event(make_stack, page):
    """A headless screenshot (taken when the page has loaded) shows the model cards: they come
    from one fetch of /health/all, drawn before the load event and before the event stream opens."""
    browser = page
    st = make_stack()
    viewport(browser, LAPTOP)
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_FIRST_PICTURE})
    try:
        browser.get(st.url + "/ui")
        wait_for(lambda: browser.execute_script("return window.atStream !== undefined"), 10, "the event stream to open")
        assert browser.execute_script("return window.atLoad") == 2
        assert browser.execute_script("return window.atStream") == {"cards": 2, "fetched": ["/health/all"]}
        assert page_errors(browser) == []
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


@needs_browser
@pytest.mark.slow  # a real headless browser
def test_actions_need_the_admin_key(make_stack, page, tmp_path):
    browser = page
    from selenium.webdriver.common.by import By

    st = make_stack(admin_api_key=ADMIN_KEY)
    viewport(browser, LAPTOP)
    browser.get(st.url + "/ui")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_for(lambda: card_state(browser, SLEEPY) == "awake", 10)
    wait_for(lambda: browser.find_element(By.ID, "key").is_displayed(), 5)
    assert browser.find_element(By.ID, "role").text == "viewer"
    assert buttons(browser, SLEEPY) == [] and buttons(browser, OTHER) == []
    usage = browser.find_element(By.ID, "usage-body")
    wait_for(lambda: "usage unavailable" in usage.text and "HTTP 401" in usage.text, 5, "the usage panel's refusal")

    key = browser.find_element(By.ID, "key")
    key.send_keys("wrong-key")
    browser.find_element(By.ID, "key-use").click()
    wait_for(lambda: "refused" in browser.find_element(By.ID, "notice").text, 5)
    assert browser.find_element(By.ID, "role").text == "viewer"

    key.send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "key-use").click()
    wait_for(lambda: browser.find_element(By.ID, "role").text == "admin", 5)
    wait_for(lambda: buttons(browser, OTHER) == ["sleep"], 5)
    # The key opens the usage panel at the next poll, not ten seconds later.
    wait_for(lambda: usage_cells(browser, "model").get("total", {}).get("requests") == 0, 5, "the usage panel")
    card(browser, OTHER).find_element(By.CSS_SELECTOR, 'button[data-action="sleep"]').click()
    wait_for(lambda: st.engine_sleeping(OTHER), 10, what="the admin's click to sleep the engine")
    wait_for(lambda: card_state(browser, OTHER) == "sleeping", 2)
    assert browser.execute_script("return sessionStorage.getItem('kvrouter.adminKey')") == ADMIN_KEY

    # No /residency on this router: no memory panel, and no start/stop buttons until the routes exist.
    assert not browser.find_element(By.ID, "residency").is_displayed()
    assert buttons(browser, SLEEPY) == ["sleep"]
    # The bars the panel will draw, read from any object with a "used" and a "budget" number.
    bars = browser.execute_script(
        "return budgetBars(arguments[0], '').map((b) => [b.className, b.textContent,"
        "  b.querySelector('.bar-fill').style.width]);",
        {"gpus": {"0": {"used_bytes": 3 * 2**30, "budget_bytes": 4 * 2**30}}, "host": {"used": 9e9, "budget": 8e9}})
    assert bars == [["bar", "gpus / 03.0 GiB / 4.0 GiB", "75%"], ["bar over", "host8.4 GiB / 7.5 GiB", "100%"]]

    browser.find_element(By.ID, "key-forget").click()
    wait_for(lambda: browser.find_element(By.ID, "role").text == "viewer", 5)
    wait_for(lambda: buttons(browser, OTHER) == [], 5)
    assert page_errors(browser) == []


def usage_cells(driver: Any, by: str) -> dict[str, dict[str, int]]:
    """The usage panel's table grouped `by` ("model" or "key"): row name -> field -> number shown."""
    return driver.execute_script(
        "const out = {};"
        "for (const tr of document.querySelectorAll(`#usage table[data-by=\"${arguments[0]}\"] tr[data-name]`)) {"
        "  out[tr.dataset.name] = Object.fromEntries([...tr.querySelectorAll('td[data-field]')]"
        "    .map((td) => [td.dataset.field, Number(td.textContent)]));"
        "}"
        "return out;", by)


@needs_browser
@pytest.mark.slow  # a real headless browser
def test_usage_panel_shows_what_usage_and_the_activity_log_count(make_stack, page, tmp_path):
    """The page's usage panel, GET /usage and the activity log agree on the last hour's requests and
    tokens; the log holds neither a key nor any prompt text."""
    browser = page
    activity = tmp_path / "activity.jsonl"
    st = make_stack(activity_log=str(activity))
    for model, n in ((SLEEPY, 2), (OTHER, 3)):
        for _ in range(n):
            assert st.complete(model) == 200
    viewport(browser, LAPTOP)
    browser.get(st.url + "/ui")
    # The last answer is accounted just after its last byte reached the client.
    wait_for(lambda: orjson.loads(http(f"{st.url}/usage")[2])["total"]["requests"] == 5, 5, "the last request counted")
    api = {by: orjson.loads(http(f"{st.url}/usage?window=3600&by={by}")[2]) for by in ("model", "key")}
    assert api["model"]["usage"][OTHER]["requests"] == 3 and api["model"]["total"]["completion_tokens"] == 5 * 2
    wait_for(lambda: usage_cells(browser, "model").get(OTHER, {}).get("requests") == 3, 10, "the usage panel")
    for by in ("model", "key"):
        shown = usage_cells(browser, by)
        assert shown == {**api[by]["usage"], "total": api[by]["total"]}
    wait_for(lambda: activity.exists() and len(activity.read_text().splitlines()) == 5, 5, "the activity log")
    lines = [orjson.loads(line) for line in activity.read_text().splitlines()]
    total = api["key"]["total"]
    assert sum(line["prompt_tokens"] for line in lines) == total["prompt_tokens"] > 0
    assert sum(line["completion_tokens"] for line in lines) == total["completion_tokens"]
    assert {line["key"] for line in lines} == {"anonymous"} and '"hi"' not in activity.read_text()
    screenshot(browser, tmp_path, "usage-panel.png")
    assert page_errors(browser) == []

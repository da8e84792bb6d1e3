"""The web page at ``/`` in a real browser (headless Debian chromium, driven by selenium).

Each test runs twice: against the stub API of tests/page_stub.py (the real page router and
token middleware, stubbed data endpoints: it proves the page's own logic) and against a real
``corral supervise`` with the fake llama-server. Every step saves a screenshot into the
test's tmp_path. Nothing sleeps: every wait is a WebDriverWait on a condition.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from corral.api.security import is_open
from tests import browser
from tests.harness import FAKE, SupervisorProcess, make_fake_model, wait_gone
from tests.page_stub import StubServer
from tests.waiting import wait_for

FOUND = browser.chromium()
needs_chromium = pytest.mark.skipif(isinstance(FOUND, str), reason=str(FOUND))

TOKEN = "page-test-token-0123456789"
WAIT_S = 20
DEFAULT_SIZE = (1280, 900)
WIDTHS = [pytest.param((1280, 900), id="1280"), pytest.param((390, 844), id="390")]


# ---- the two back ends --------------------------------------------------------------

class Backend:
    url: str
    token: str | None

    def status(self) -> dict[str, Any]:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        result: dict[str, Any] = httpx.get(f"{self.url}/v1/status", headers=headers,
                                           timeout=10).json()
        return result

    def change(self, args: dict[str, Any]) -> httpx.Response:
        """A change from another client than the page."""
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.post(f"{self.url}/v1/params", json={"args": args}, headers=headers,
                          timeout=60)

    def kill_llama_server(self) -> None:
        raise NotImplementedError


class Stubbed(Backend):
    def __init__(self, server: StubServer) -> None:
        self.url, self.token = server.url, server.token

    def kill_llama_server(self) -> None:
        httpx.post(f"{self.url}/stub/crash", timeout=10,
                   headers={"authorization": f"Bearer {self.token}"} if self.token else {})


class Real(Backend):
    def __init__(self, sup: SupervisorProcess) -> None:
        self.sup = sup
        self.url, self.token = f"http://127.0.0.1:{sup.api_port}", sup.token

    def kill_llama_server(self) -> None:
        os.kill(self.sup.llama_pid(), signal.SIGKILL)


BackendFactory = Callable[[str | None], Backend]


@pytest.fixture(params=["stub", "real"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    """backend(token) starts the stub or a real supervisor (with the fake llama-server)."""
    model = make_fake_model(tmp_path / "a.gguf")
    started: list[Any] = []

    def make(token: str | None = None) -> Backend:
        if request.param == "stub":
            server = StubServer(model, token).__enter__()
            started.append(server)
            return Stubbed(server)
        sup = SupervisorProcess(tmp_path, FAKE, model, token=token,
                                extra_cli=["--api-token", token] if token else None).start()
        started.append(sup)
        sup.wait_running()
        if httpx.get(f"http://127.0.0.1:{sup.api_port}/", timeout=10).status_code != 200:
            pytest.fail("the supervisor does not serve the page at / yet")
        return Real(sup)

    yield make
    for thing in started:
        if isinstance(thing, StubServer):
            thing.__exit__()
        else:
            thing.close()
            wait_gone(thing.seen_pids, 5, "every llama-server the supervisor ran")


@pytest.fixture
def driver(request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    width, height = getattr(request, "param", DEFAULT_SIZE)
    d = browser.start(width, height)
    try:
        yield d
    finally:
        d.quit()


# ---- page helpers -------------------------------------------------------------------

class Page:
    def __init__(self, driver: WebDriver, shots: Path, asked: tuple[int, int]) -> None:
        self.d = driver
        self.shots = shots
        self.step = 0
        self.asked = asked
        self.width = asked[0]

    def open(self, url: str) -> None:
        self.d.get(url + "/")
        self.d.execute_script("window.__sameDocument = true")
        self.width = int(self.d.execute_script("return window.innerWidth"))

    def same_document(self) -> bool:
        """True while the page was never reloaded since open()."""
        return bool(self.d.execute_script("return window.__sameDocument === true"))

    def text(self, css: str) -> str:
        try:
            return str(self.d.find_element(By.CSS_SELECTOR, css).text)
        except WebDriverException:  # not there (yet), or re-rendered meanwhile
            return ""

    def until(self, what: str, condition: Callable[[], Any]) -> Any:
        """``wait_for`` on the page; a screenshot and the page's state when it times out."""
        try:
            return wait_for(condition, WAIT_S, what, interval=0.05)
        except AssertionError as exc:
            self.shot(f"timeout-{what}")
            raise AssertionError(f"timed out waiting for {what}; state "
                                 f"{self.text('#state')!r}, outcome "
                                 f"{self.text('#outcome')!r}") from exc

    def until_text(self, css: str, expected: str) -> None:
        self.until(f"{css} = {expected!r}", lambda: self.text(css) == expected)

    def shot(self, step: str, show: str | None = None) -> Path:
        """A screenshot of the viewport, scrolled to ``show`` (a CSS selector) if given."""
        self.step += 1
        if show:
            self.d.execute_script("document.querySelector(arguments[0]).scrollIntoView()",
                                  show)
        return browser.screenshot(self.d, self.shots / f"{self.width}-{self.step:02d}-{step}.png")

    def no_horizontal_scroll(self) -> None:
        widths = self.d.execute_script(
            "const e = document.documentElement; return [e.scrollWidth, e.clientWidth]")
        assert widths[0] <= widths[1], f"the page scrolls sideways: {widths}"

    def no_script_errors(self) -> None:
        """No exception, CSP violation or other error in the console (a failed fetch's
        HTTP status is the page's business, not an error here)."""
        errors = [e["message"] for e in self.d.get_log("browser") if e["level"] == "SEVERE"
                  and "Failed to load resource" not in e["message"]]
        assert not errors, errors

    def config_value(self, flag: str) -> str:
        return self.text(f'#config tr[data-flag="{flag}"] td')

    def submit(self, args: dict[str, str]) -> None:
        """Fill the key/value rows of the change form and press Apply."""
        rows = self.d.find_elements(By.CSS_SELECTOR, "#rows .kv")
        while len(rows) < len(args):
            self.d.find_element(By.ID, "add-row").click()
            rows = self.d.find_elements(By.CSS_SELECTOR, "#rows .kv")
        for row, (key, value) in zip(rows, args.items(), strict=False):
            for css, text in ((".key", key), (".value", value)):
                field = row.find_element(By.CSS_SELECTOR, css)
                field.clear()
                field.send_keys(text)
        self.d.find_element(By.ID, "apply").click()

    def outcome(self) -> tuple[str, str]:
        box = self.d.find_element(By.ID, "outcome")
        return str(box.get_attribute("data-outcome")), str(box.text)

    def enter_token(self, token: str) -> None:
        field = self.d.find_element(By.ID, "token")
        field.clear()
        field.send_keys(token)
        self.d.find_element(By.ID, "token-save").click()


@pytest.fixture
def page(driver: WebDriver, tmp_path: Path, request: pytest.FixtureRequest) -> Page:
    callspec = getattr(request.node, "callspec", None)
    return Page(driver, tmp_path, callspec.params.get("driver", DEFAULT_SIZE) if callspec
                else DEFAULT_SIZE)


# ---- the tests ----------------------------------------------------------------------

@needs_chromium
@pytest.mark.parametrize("driver", WIDTHS, indirect=True)
def test_page_shows_applies_rejects_and_follows_a_restart(backend: BackendFactory,
                                                          page: Page) -> None:
    """RUNNING and the model; -np 2 through the form is applied and shown; a change from
    another client shows up by itself; a missing model shows the reason; a SIGKILL of
    llama-server shows the restart; never a reload, never a sideways scroll."""
    api = backend(None)
    page.open(api.url)
    assert page.width == page.asked[0], f"viewport {page.width} px, asked {page.asked}"
    narrow = page.width < 600
    page.until_text("#state", "RUNNING")
    page.until_text("#model", "a.gguf")
    page.until("the live event stream", lambda: page.text("#live") == "live")
    page.until("a log line", lambda: page.text("#logs") != "")
    page.shot("running")
    if narrow:
        page.no_horizontal_scroll()

    page.submit({"-np": "2"})
    page.until("the outcome", lambda: page.outcome()[0] == "applied")
    assert page.outcome()[1].startswith("applied")
    page.until("--parallel 2 in the config", lambda: page.config_value("--parallel") == "2")
    page.until("the change in the history",
               lambda: "applied" in page.text("#changes tbody")
               and "--parallel" in page.text("#changes tbody"))
    page.shot("applied", "#change-card")

    # Another client changes it: the page follows by itself (events -> status).
    assert api.change({"-c": 2048}).status_code == 200
    page.until("--ctx-size 2048 from another client",
               lambda: page.config_value("--ctx-size") == "2048")
    page.shot("changed-elsewhere", "#config-card")

    page.submit({"-m": "/nonexistent/model.gguf"})
    page.until("the rejection", lambda: page.outcome()[0] == "rejected")
    verdict, text = page.outcome()
    assert "rejected" in text and "does not exist" in text, text
    assert page.config_value("--model").endswith("a.gguf")
    page.shot("rejected", "#change-card")
    if narrow:
        page.no_horizontal_scroll()

    before = api.status()
    restarts = int(page.text("#restarts"))
    assert restarts == before["restarts"]
    api.kill_llama_server()
    page.until("the restart counted", lambda: page.text("#restarts") == str(restarts + 1))
    page.until_text("#state", "RUNNING")
    page.until("a new pid", lambda: page.text("#pid") not in ("", "–", str(before["pid"])))
    page.until("the crash in the events", lambda: "crash" in page.text("#events"))
    page.shot("restarted", "#overview")
    if narrow:
        page.no_horizontal_scroll()
    assert page.same_document(), "the page was reloaded"
    page.no_script_errors()


@needs_chromium
def test_page_works_only_after_the_token_is_entered(backend: BackendFactory,
                                                    page: Page) -> None:
    """With --api-token the page (open to all) asks for the token, refuses a wrong one,
    works once the right one is entered, and keeps it for the tab's session."""
    api = backend(TOKEN)
    assert httpx.get(f"{api.url}/v1/status", timeout=10).status_code == 401
    for path in ("/", "/static/app.js", "/static/style.css"):
        r = httpx.get(api.url + path, timeout=10)
        assert r.status_code == 200, path
        assert "default-src 'self'" in r.headers["content-security-policy"]
    page.open(api.url)
    page.until("the token prompt", lambda: page.d.find_element(By.ID, "auth").is_displayed())
    assert page.text("#state") != "RUNNING"
    page.shot("token-asked")

    page.enter_token("wrong-token")
    page.until("the refusal", lambda: "wrong API token" in page.text("#auth-why"))
    assert page.d.find_element(By.ID, "auth").is_displayed()
    assert page.text("#state") != "RUNNING"
    page.shot("token-refused")

    page.enter_token(TOKEN)
    page.until_text("#state", "RUNNING")
    page.until_text("#model", "a.gguf")
    assert not page.d.find_element(By.ID, "auth").is_displayed()
    page.until("the live event stream", lambda: page.text("#live") == "live")
    page.submit({"-np": "2"})
    page.until("the outcome", lambda: page.outcome()[0] == "applied")
    page.until("--parallel 2 in the config", lambda: page.config_value("--parallel") == "2")
    page.shot("token-accepted")

    page.d.refresh()  # sessionStorage keeps the token for the tab
    page.until_text("#state", "RUNNING")
    assert not page.d.find_element(By.ID, "auth").is_displayed()
    assert page.d.execute_script("return sessionStorage.getItem('corral.token')") == TOKEN
    page.no_script_errors()


def test_only_the_page_and_its_files_are_open() -> None:
    """The token check lets through /health, / and one file name under /static/, no more."""
    for path in ("/health", "/", "/static/app.js", "/static/style.css", "/static/x"):
        assert is_open(path), path
    for path in ("/v1/status", "/static/", "/static/..", "/static/../v1/status", "/static/a/b",
                 "/docs", "/openapi.json", "//", "/index.html", "/staticx/app.js", "/static"):
        assert not is_open(path), path

"""Refresh the README's screenshots of the web page (``make page-png``; not a test).

Runs ``corral supervise`` (the real llama-server and model when given, else the fake one)
behind a front door, applies ``-np 2`` through the page's form, sends a few requests through
the front door, and saves the whole page as seen in headless chromium at 1280 and 390 px.
``--stub`` uses the test suite's stub API instead of a supervisor.

    python -m scripts.page_screenshot --binary PATH --model PATH --out docs/page.png
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests import browser
from tests.harness import FAKE, SupervisorProcess, free_port, make_fake_model, wait_gone
from tests.page_stub import StubServer

SIZES = ((1280, 900), (390, 844))


@contextlib.contextmanager
def running(args: argparse.Namespace, tmp: Path) -> Iterator[tuple[str, str | None]]:
    """(the API's URL, the front door's URL or None) of a running supervisor or stub."""
    model = Path(args.model) if args.model else make_fake_model(tmp / "model.gguf")
    if args.stub:
        with StubServer(model) as stub:
            yield stub.url, None
        return
    listen = f"127.0.0.1:{free_port()}"
    sup = SupervisorProcess(tmp, args.binary, model, ["-c", "2048"],
                            extra_cli=["--listen", listen]).start()
    try:
        sup.wait_running(timeout=300)
        url = f"http://127.0.0.1:{sup.api_port}"
        if httpx.get(url + "/", timeout=10).status_code != 200:
            raise SystemExit("this supervisor does not serve the page at / (not wired in "
                             "yet?); try --stub")
        yield url, f"http://{listen}"
    finally:
        sup.close()
        wait_gone(sup.seen_pids, 10, "llama-server")


def until(driver: WebDriver, what: str, css: str, text: str) -> None:
    def shown(_: object) -> bool:
        try:
            return text in driver.find_element(By.CSS_SELECTOR, css).text
        except Exception:  # noqa: BLE001 - not rendered yet
            return False
    try:
        WebDriverWait(driver, 120, poll_frequency=0.1).until(shown)
    except Exception as exc:
        raise SystemExit(f"timed out waiting for {what}") from exc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", default=str(FAKE), help="llama-server (default: the fake)")
    p.add_argument("--model", help="a GGUF model (default: a fake one)")
    p.add_argument("--out", type=Path, default=Path("docs/page.png"),
                   help="the 1280 px screenshot; the 390 px one goes beside it (-390)")
    p.add_argument("--stub", action="store_true", help="the tests' stub API, no supervisor")
    args = p.parse_args()
    found = browser.chromium()
    if isinstance(found, str):
        raise SystemExit(found)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="corral-page-") as tmp, \
            running(args, Path(tmp)) as (url, front):
        driver = browser.start(*SIZES[0])
        try:
            driver.get(url + "/")
            until(driver, "RUNNING", "#state", "RUNNING")
            for _ in range(5 if front else 0):  # something for the front door's counters
                httpx.get(f"{front}/props", timeout=60)
            driver.find_element(By.CSS_SELECTOR, "#rows .key").send_keys("-np")
            driver.find_element(By.CSS_SELECTOR, "#rows .value").send_keys("2")
            driver.find_element(By.ID, "apply").click()
            until(driver, "the change applied", "#outcome", "applied")
            until(driver, "RUNNING again", "#state", "RUNNING")
            until(driver, "the change in the events", "#events", "change")
            for width, height in SIZES:
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                    "width": width, "height": height, "deviceScaleFactor": 1,
                    "mobile": width < 600})
                driver.execute_script("window.scrollTo(0, 0)")
                out = args.out if width == SIZES[0][0] else args.out.with_stem(
                    f"{args.out.stem}-{width}")
                browser.screenshot(driver, out, full_page=True)
                print(f"{out}: the page at {width} px")
        finally:
            driver.quit()


if __name__ == "__main__":
    sys.exit(main())

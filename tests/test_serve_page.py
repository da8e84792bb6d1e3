"""corral serve's models page in a real browser (headless chromium, selenium), against
corral serve with the fake llama-server: the table follows the models, and its buttons
load and unload them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from tests import browser
from tests.harness import FAKE, make_fake_model, wait_for
from tests.serve_helpers import model_table, serving

FOUND = browser.chromium()
pytestmark = [pytest.mark.skipif(isinstance(FOUND, str), reason=str(FOUND)),
              pytest.mark.timeout(120)]


@pytest.fixture
def driver() -> Iterator[WebDriver]:
    d = browser.start(1280, 900)
    try:
        yield d
    finally:
        d.quit()


def state_of(d: WebDriver, model: str) -> str:
    rows = d.find_elements(By.CSS_SELECTOR, f'#models tr[data-model="{model}"] .badge')
    return rows[0].text if rows else ""


def test_the_page_lists_models_and_its_buttons_load_and_unload(tmp_path: Path,
                                                                driver: WebDriver) -> None:
    """Both models listed unloaded; a client request loads alpha and the page shows it
    loaded with its pid; the page's unload button unloads it, its load button loads beta;
    the page's limits line names --max-models."""
    config = "".join(model_table(n, FAKE, make_fake_model(tmp_path / f"{n}.gguf"))
                     for n in ("alpha", "beta"))
    with serving(tmp_path, FAKE, config=config, extra=["--max-models", "1"]) as s:
        driver.get(f"http://127.0.0.1:{s.api_port}/")
        wait_for(lambda: state_of(driver, "alpha") == "unloaded"
                 and state_of(driver, "beta") == "unloaded", 20, "both listed")
        assert "at most 1 loaded" in driver.find_element(By.ID, "limits").text
        assert s.complete("alpha").status_code == 200
        wait_for(lambda: state_of(driver, "alpha") == "loaded", 20, "alpha loaded")
        pid = str(s.model("alpha")["pid"])
        row = driver.find_element(By.CSS_SELECTOR, '#models tr[data-model="alpha"]')
        assert pid in row.text
        row.find_element(By.CSS_SELECTOR, 'button[data-model="alpha"]').click()
        wait_for(lambda: s.model("alpha")["state"] == "unloaded", 20, "unloaded by the page")
        wait_for(lambda: state_of(driver, "alpha") == "unloaded", 20, "the page shows it")
        driver.find_element(By.CSS_SELECTOR, 'button[data-model="beta"]').click()
        wait_for(lambda: s.model("beta")["state"] == "loaded", 20, "beta loaded by the page")
        wait_for(lambda: "alpha: 1 × admin" in driver.find_element(By.ID, "evictions").text,
                 20, "the eviction listed")
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs

"""Headless Debian chromium driven by selenium, for the page's tests and its screenshot.

:func:`chromium` says where the browser and its driver are, or why they cannot be used
(the tests skip with that reason); ``make setup-test`` installs them (``chromium``,
``chromium-driver``).
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
INSTALL = "install Debian's chromium and chromium-driver (make setup-test)"


def _which(names: tuple[str, ...], extra: tuple[str, ...] = ()) -> str | None:
    for name in names:
        if found := shutil.which(name):
            return found
    return next((p for p in extra if os.access(p, os.X_OK)), None)


def chromium() -> tuple[str, str] | str:
    """(browser, driver) paths, or why there are none."""
    browser = _which(BROWSERS)
    driver = _which(DRIVERS, ("/usr/lib/chromium/chromedriver",))
    if browser is None:
        return f"chromium not found on PATH: {INSTALL}"
    if driver is None:
        return f"chromedriver not found: {INSTALL}"
    return browser, driver


def start(width: int, height: int) -> webdriver.Chrome:
    """Headless chromium with a ``width`` x ``height`` CSS-pixel viewport."""
    found = chromium()
    if isinstance(found, str):
        raise RuntimeError(found)
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--hide-scrollbars",
                f"--window-size={width},{height}", "--force-device-scale-factor=1",
                "--lang=en-GB"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    # The viewport exactly (a desktop window has a minimum width; a phone has none).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    return driver


def screenshot(driver: webdriver.Chrome, path: Path, full_page: bool = False) -> Path:
    """The viewport (or the whole page) as a PNG at ``path``."""
    params: dict[str, object] = {"format": "png"}
    if full_page:
        size = driver.execute_script(
            "return [document.documentElement.scrollWidth,"
            " document.documentElement.scrollHeight]")
        params |= {"captureBeyondViewport": True,
                   "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", params)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path

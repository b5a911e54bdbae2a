"""Headless Chromium through selenium, for the page's test and its screenshot in docs/deploying.md."""

from __future__ import annotations

import shutil

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> tuple[str, str] | None:
    """(browser, chromedriver) paths, or None when either is not installed."""
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def headless_chromium(width: int = 1100, height: int = 640):
    from selenium import webdriver

    found = find_chromium()
    if found is None:
        raise RuntimeError("no Chromium with chromedriver found: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))


def classify_in_page(driver, url: str, image_path, timeout: float = 60) -> list[str]:
    """Open the page, choose `image_path` in its file input, return the class names it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    driver.find_element(By.ID, "file").send_keys(str(image_path))
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1"
        or "error" in (d.find_element(By.ID, "status").get_attribute("class") or ""))
    status = driver.find_element(By.ID, "status")
    if "error" in (status.get_attribute("class") or ""):
        raise AssertionError(f"the page shows an error: {status.text}")
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".class-name")]

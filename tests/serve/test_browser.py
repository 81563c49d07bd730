"""The web page in a real browser: the real server on a loopback port, headless Chromium (Debian's
`chromium` and `chromium-driver`; nothing is downloaded) typing a message and clicking."""

import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from loraft.serve.app import create_app

from .test_api import HAM, SPAM

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture
def server_url(served):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    server.should_exit = True
    thread.join(timeout=30)
    listener.close()


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), (
        "install the browser: apt-get install -y chromium chromium-driver"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def test_the_page_shows_spam_for_a_spam_message(server_url, browser):
    browser.get(server_url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "adapter").get_attribute("value") == "spam")
    assert "smollm2-135m" in browser.find_element(By.ID, "base").text
    browser.find_element(By.ID, "texts").send_keys(SPAM + "\n" + HAM)
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results td.label")) == 2)
    labels = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#results td.label")]
    percents = [float(cell.text.rstrip("%")) for cell in browser.find_elements(By.CSS_SELECTOR, "#results td.percent")]
    assert labels == ["spam", "ham"]
    assert min(percents) > 95
    assert browser.find_element(By.ID, "latency").text.startswith("2 texts in ")
    assert browser.find_element(By.ID, "error").text == ""
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "serve-page.png"))
    print(f"screenshot: {ARTIFACTS / 'serve-page.png'}")

    # A bad request shows the server's one-line error on the page.
    browser.find_element(By.ID, "texts").send_keys("\n" + "x" * 5000)
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == "texts[2] has 5000 characters; the limit is 4000"

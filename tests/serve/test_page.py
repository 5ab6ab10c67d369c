"""The chat page in a real headless Chromium (Selenium, the system chromium and chromedriver): type a message,
watch the answer stream in, see the model's text shown as text, and the system prompt and history sent along.
Skips with the reason where no browser is installed."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from alignkit.serve.server import BackgroundServer
from tests.serve.conftest import ScriptedScheduler, char_tokenizer, scripted_app

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")

# Markup in the model's answer must show up as characters, never become elements.
REPLY = "Sure: <b>bold</b> <img src=x onerror=alert(1)> & done."


def find_browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def start_chromium(width: int = 900, height: int = 700) -> Any:
    """Headless Chromium from the system's binaries (never a downloaded one); skips the test without them."""
    found = find_browser()
    if found is None:
        pytest.skip("no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--no-proxy-server"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=found[1]), options=options)


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("the page did not reach the expected state in time")


def test_page_streams_the_answer_as_text(browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    tokenizer = char_tokenizer()
    scheduler = ScriptedScheduler(reply=REPLY, step_delay=0.15)  # slow enough to see partial answers
    app, worker = scripted_app(tokenizer, scheduler)
    worker.start()
    try:
        with BackgroundServer(app) as server:
            browser.get(server.url + "/")
            wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny")
            browser.find_element(By.ID, "system").send_keys("Answer like a pirate.")
            box = browser.find_element(By.ID, "input")
            box.send_keys("Hello there")
            box.send_keys(Keys.ENTER)

            reply = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant"))[0]
            partials = set()
            while reply.get_attribute("data-state") == "streaming":
                partials.add(reply.find_element(By.CLASS_NAME, "content").text)
                time.sleep(0.03)
            assert reply.get_attribute("data-state") == "done", reply.text
            shown = reply.find_element(By.CLASS_NAME, "content").get_attribute("textContent")
            assert shown == REPLY
            partials.discard("")
            assert len(partials) >= 3 and all(REPLY.startswith(p) for p in partials), \
                f"the answer should appear piece by piece, saw {sorted(partials)}"
            assert not browser.find_elements(By.CSS_SELECTOR, "#messages b, #messages img"), "HTML was injected"
            user = browser.find_element(By.CSS_SELECTOR, ".msg.user .content").text
            assert user == "Hello there"

            # Second turn: the history (first answer included) and the system prompt go to the server.
            box.send_keys("And then?")
            box.send_keys(Keys.ENTER)
            wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]")) == 2)
            prompt = tokenizer.decode(scheduler.prompts[2])
            assert prompt == (f"<system>Answer like a pirate.\n<user>Hello there\n<assistant>{REPLY}\n"
                              "<user>And then?\n<assistant>")
    finally:
        worker.close()


def test_page_shows_server_errors(browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, worker = scripted_app(char_tokenizer(), ScriptedScheduler(), api_key="sk-page")
    worker.start()
    try:
        with BackgroundServer(app) as server:
            browser.get(server.url + "/")
            wait_for(lambda: "could not list models" in browser.find_element(By.ID, "model").text)
            browser.find_element(By.TAG_NAME, "summary").click()
            key = browser.find_element(By.ID, "api_key")
            key.send_keys("sk-page")
            key.send_keys(Keys.TAB)  # "change" event: the page lists the models again with the key
            wait_for(lambda: browser.find_element(By.ID, "model").text == "tiny")
            key.clear()
            key.send_keys("sk-wrong")
            box = browser.find_element(By.ID, "input")
            box.send_keys("hi")
            box.send_keys(Keys.ENTER)
            reply = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=error]"))[0]
            assert "API key is wrong" in reply.text
    finally:
        worker.close()

"""The chat page of `lmforge serve` in a real browser: headless Chromium driven by Selenium.

Loads the page, checks what it says about the model, asks a question about a story, reads the
answer as it streams in, asks a follow-up in the same conversation, and draws a built-in story.
The answers must equal the API's for the same conversation (greedy: the page's temperature is 0).

Needs `selenium` and Debian's `chromium` + `chromium-driver` (`.ci/run` installs them); skips
cleanly without them. A screenshot of the page is left in the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest
from test_serve import STORY, Server, reference_answer, tiny_runs

pytestmark = pytest.mark.browser

if os.environ.get("LMFORGE_STRICT_EXTRAS") == "1":
    import selenium  # noqa: F401 - the test extra has it: under CI its absence is a failure
selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)  # fmt: skip


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    runs = tiny_runs(tmp_path_factory)
    folder = tmp_path_factory.mktemp("browser")
    server = Server(runs["sft"], folder / "server.log")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Without these Chromium waits for the network (updates, sync, QUIC) on a closed machine.
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-sync",
        "--disable-component-update",
        "--disable-dev-shm-usage",
        "--window-size=1000,760",
        f"--user-data-dir={folder / 'profile'}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER,
                                      log_output=str(folder / "chromedriver.log"))  # fmt: skip
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        driver.get(server.url + "/")
        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true"
        )
        yield driver, server, runs, folder
    finally:
        driver.quit()
        server.stop()


def answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def ask(driver, question: str):
    """Type a question, send it, and wait for the answer's stream to end; returns its bubble
    and the lengths of the answer seen while it streamed."""
    box = driver.find_element(By.ID, "input")
    box.send_keys(question)
    n = len(answers(driver))
    driver.find_element(By.ID, "send").click()
    seen: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        bubbles = answers(driver)
        if len(bubbles) > n:
            # The state before the text: text read after "done" is the whole answer (read the
            # other way round, the stream can end between the two reads).
            done = bubbles[-1].get_attribute("data-state") == "done"
            seen.append(len(bubbles[-1].find_element(By.CLASS_NAME, "text").text))
            if done:
                return bubbles[-1], seen
        time.sleep(0.01)
    raise AssertionError("the answer never finished streaming")


def test_page_shows_the_model_and_streams_answers_in_one_conversation(page):
    import httpx

    driver, server, runs, folder = page
    assert driver.find_element(By.ID, "model-name").text == "tiny-sft"
    assert driver.find_element(By.ID, "phase").text == "SFT (chat)"
    info = driver.find_element(By.ID, "model-info").text
    assert "parameters" in info and "context 256" in info

    driver.find_element(By.ID, "story").send_keys(STORY)
    driver.find_element(By.ID, "max-tokens").send_keys("12")  # room for a follow-up
    first, seen = ask(driver, "Who lost the robot?")
    text = first.find_element(By.CLASS_NAME, "text").text
    print(
        f"page answer 1 ({first.get_attribute('data-chunks')} streamed pieces, "
        f"finish {first.get_attribute('data-finish')}): {text!r}"
    )
    assert first.get_attribute("data-error") is None
    # The page sends story + "\n" + question (greedy, at most 12 tokens).
    question = STORY + "\nWho lost the robot?"
    assert text == reference_answer(runs["sft"], question, 12).strip()
    assert int(first.get_attribute("data-chunks")) == len(text) > 1  # a piece per token
    assert seen[-1] == len(text)

    # A follow-up: the page sends the whole conversation; the answer equals the API's.
    second, _ = ask(driver, "Where was it found?")
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": text},
                {"role": "user", "content": "Where was it found?"}]  # fmt: skip
    body = {"messages": messages, "temperature": 0, "max_tokens": 12}
    api = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    second_text = second.find_element(By.CLASS_NAME, "text").text
    print(f"page answer 2: {second_text!r}")
    assert second_text == api["choices"][0]["message"]["content"].strip()
    shown = [m.text for m in driver.find_elements(By.CSS_SELECTOR, ".msg .text")]
    assert shown[0] == "Who lost the robot?" and shown[2] == "Where was it found?"
    assert len(shown) == 4
    driver.save_screenshot(str(folder / "chat.png"))


def test_a_built_in_story_and_its_questions(page):
    driver, server, runs, folder = page
    driver.find_element(By.ID, "new-story").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#questions button"))
    story = driver.find_element(By.ID, "story").get_attribute("value")
    assert story.endswith(".") and len(story) > 50
    assert answers(driver) == []  # a new story starts a new conversation
    question = driver.find_elements(By.CSS_SELECTOR, "#questions button")[0]
    asked = question.text
    question.click()
    WebDriverWait(driver, 60).until(
        lambda d: answers(d) and answers(d)[-1].get_attribute("data-state") == "done"
    )
    assert driver.find_elements(By.CSS_SELECTOR, ".msg.user .text")[0].text == asked
    assert answers(driver)[-1].get_attribute("data-error") is None

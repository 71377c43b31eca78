"""The page at ``/`` in a real headless browser (Debian's chromium and chromium-driver, driven
by selenium): type a question, click Ask, read the highlighted answer and its offsets."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from tests.serving.test_server import CONTEXT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "no chromium/chromedriver (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

#: code points outside the BMP before the answer: JavaScript counts them twice (UTF-16), the
#: server's offsets once
EMOJI_CONTEXT = "🙂🎉 " + CONTEXT


@pytest.fixture(scope="module")
def browser() -> Iterator:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def wait_for(browser, element_id: str):
    return WebDriverWait(browser, 30).until(
        expected_conditions.visibility_of_element_located((By.ID, element_id))
    )


def test_ask_highlights_the_answer(server, answerer, browser) -> None:
    question = "Who wrote the report?"
    browser.get(f"{server.url}/")
    browser.find_element(By.ID, "question").send_keys(question)
    context_box = browser.find_element(By.ID, "context")
    browser.execute_script("arguments[0].value = arguments[1]", context_box, EMOJI_CONTEXT)
    top_k = browser.find_element(By.ID, "top_k")
    top_k.clear()
    top_k.send_keys("3")
    browser.find_element(By.ID, "ask").click()
    mark = wait_for(browser, "best")
    want = answerer.answer([question], [EMOJI_CONTEXT], 3)[0]
    best = want[0]
    start, end = int(mark.get_attribute("data-start")), int(mark.get_attribute("data-end"))
    assert (start, end) == (best.start, best.end)
    assert mark.text == best.text.strip() and EMOJI_CONTEXT[start:end] == best.text
    assert browser.find_element(By.ID, "score").text == f"{best.score:.4f}"
    items = browser.find_elements(By.CSS_SELECTOR, "#answers li")
    assert [item.text.split(" (probability")[0] for item in items] == [a.text.strip() for a in want]
    assert browser.find_element(By.ID, "error").text == ""


def test_bad_request_shows_the_error(server, browser) -> None:
    browser.get(f"{server.url}/")
    browser.find_element(By.ID, "context").send_keys("Some context.")
    browser.find_element(By.ID, "ask").click()
    error = WebDriverWait(browser, 30).until(
        lambda driver: driver.find_element(By.ID, "error").text or None
    )
    assert error.startswith("Error 422") and "the question is empty" in error
    assert not browser.find_element(By.ID, "result").is_displayed()


def test_shared_link_fills_the_boxes_and_asks(server, answerer, browser) -> None:
    question = "Where was it published?"
    browser.get(f"{server.url}/?" + urlencode({"question": question, "context": CONTEXT}))
    mark = wait_for(browser, "best")
    best = answerer.answer([question], [CONTEXT], 3)[0][0]
    assert browser.find_element(By.ID, "question").get_attribute("value") == question
    assert int(mark.get_attribute("data-start")) == best.start
    assert int(mark.get_attribute("data-end")) == best.end

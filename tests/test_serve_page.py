"""The web page at `/`, in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium):
build a few-shot prompt with images, see the streamed answer (the API's greedy answer for the same conversation)
and its figures, chat with an attached image, attach images by drag and drop and by paste; a refused turn goes back
into the composer and the page says why (413, 400, a missing key, a file that is no image); screenshots are kept as
artifacts.

Skipped without Chromium, except under CI (the environment variable CI set), where it fails instead."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest

from flamingo.serve.app import ServeSettings
from flamingo.tiny import random_image

from serve_helpers import engine_for, running_server, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FLAMINGO_TEST_ARTIFACTS", ROOT / "test-artifacts"))
QUESTION = "Question: what is in the image? Short answer:"


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        chromium = None
    if not (chromium and driver):
        message = "the page test needs selenium, Debian's chromium and chromium-driver (see .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


DROP_AND_PASTE = """
const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
const files = () => {
  const t = new DataTransfer();
  t.items.add(new File([bytes], "x.png", {type: "image/png"}));
  return t;
};
const composer = document.getElementById("composer");
composer.dispatchEvent(new DragEvent("drop", {dataTransfer: files(), bubbles: true, cancelable: true}));
composer.dispatchEvent(new ClipboardEvent("paste", {clipboardData: files(), bubbles: true, cancelable: true}));
"""


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_page_few_shot_and_chat_in_headless_chromium(tmp_path, one_thread):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    demo, query = tmp_path / "demo.png", tmp_path / "query.png"
    random_image(1).save(demo)
    random_image(2).save(query)
    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=4, prefill_chunk=32)
    browser = _browser()
    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo")) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            max_tokens = browser.find_element(By.ID, "max-tokens")
            max_tokens.clear()
            max_tokens.send_keys("8")

            browser.find_element(By.ID, "tab-fewshot").click()
            browser.find_element(By.CSS_SELECTOR, "#demos .demo-file").send_keys(str(demo))
            browser.find_element(By.CSS_SELECTOR, "#demos .answer").send_keys("a red circle.")
            browser.find_element(By.ID, "query-file").send_keys(str(query))
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".media-slot img")) == 2)
            browser.find_element(By.ID, "run-fewshot").click()
            wait.until(lambda b: b.find_element(By.ID, "fewshot-output").get_attribute("data-done") == "true")
            answer = browser.execute_script("return document.getElementById('fewshot-output').textContent")
            stats = browser.find_element(By.ID, "fewshot-stats").text
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "serve-page-few-shot.png"))

            messages = [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(demo)}},
                                             {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": "a red circle."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(query)}},
                                             {"type": "text", "text": QUESTION}]},
            ]
            api = httpx.post(url + "/v1/chat/completions", timeout=60,
                             json={"messages": messages, "max_tokens": 8, "temperature": 0}).json()
            assert answer == api["choices"][0]["message"]["content"] and answer.strip()
            assert "time to first token" in stats and "tokens/s" in stats
            assert f"{api['usage']['completion_tokens']} tokens" in stats and "cached" not in stats
            cached = api["usage"]["prompt_tokens_details"]["cached_tokens"]  # the page's prompt, sent again
            assert cached > 0
            browser.find_element(By.ID, "run-fewshot").click()  # the same demonstration: its blocks are reused
            wait.until(lambda b: "cached" in b.find_element(By.ID, "fewshot-stats").text)
            assert f"{cached} of {api['usage']['prompt_tokens']} prompt tokens cached" in \
                browser.find_element(By.ID, "fewshot-stats").text

            # token probabilities: each shown token shaded by its probability, its alternatives in its title
            browser.find_element(By.ID, "show-probs").click()
            browser.find_element(By.ID, "run-fewshot").click()
            wait.until(lambda b: b.find_element(By.ID, "fewshot-output").get_attribute("data-done") == "true")
            spans = browser.execute_script("return Array.from(document.querySelectorAll('#fewshot-output .tok'))"
                                           ".map((s) => [s.textContent, s.dataset.logprob, s.title])")
            with_probs = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 5}).json()
            entries = with_probs["choices"][0]["logprobs"]["content"]
            assert spans and "".join(text for text, _, _ in spans) == answer
            shown = iter(e["logprob"] for e in entries)  # tokens with no visible text of their own have no span
            assert all(any(abs(float(lp) - v) < 1e-4 for v in shown) for _, lp, _ in spans)
            assert all("%" in title and title.count("\n") == 5 for _, _, title in spans)
            browser.save_screenshot(str(ARTIFACTS / "serve-page-token-probabilities.png"))

            browser.find_element(By.ID, "tab-chat").click()
            browser.find_element(By.ID, "chat-file").send_keys(str(query))
            browser.find_element(By.ID, "chat-input").send_keys(QUESTION)
            browser.find_element(By.ID, "chat-send").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
            reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
            assert "time to first token" in reply.find_element(By.CSS_SELECTOR, ".stats").text
            assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 1
            browser.save_screenshot(str(ARTIFACTS / "serve-page-chat.png"))

            # drag and drop, and paste, of an image onto the composer attach it
            browser.execute_script(DROP_AND_PASTE, base64.b64encode(query.read_bytes()).decode())
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#chat-attachments .chip img")) == 2)
    finally:
        browser.quit()
    assert (ARTIFACTS / "serve-page-few-shot.png").stat().st_size > 1000


KEY = "page-key"
DROP = """
const [name, type, b64] = arguments;
const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
const t = new DataTransfer();
t.items.add(new File([bytes], name, {type}));
t.items.add(new File(["not a picture"], "notes.txt", {type: ""}));
document.getElementById("composer").dispatchEvent(
  new DragEvent("drop", {dataTransfer: t, bubbles: true, cancelable: true}));
"""


def test_page_failed_turns_go_back_to_the_composer_and_errors_say_why(tmp_path, one_thread):
    """What the chat shows is what it sends next: a turn the server refuses (413: the conversation's images are too
    large together; 400: max tokens 0) leaves the conversation and goes back into the composer with its image, and
    the note says why; an empty max tokens is refused in the page; a 401 from /v1/models says the key is missing; a
    file the browser gives no type is attached by its extension (and sent as its type), another is named, not
    dropped silently."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    first, second = tmp_path / "first.png", tmp_path / "second.png"
    random_image(1).save(first)
    random_image(2).save(second)
    one_image = len(_data_url(first))
    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2, prefill_chunk=32)
    # one image per request fits the body limit, two do not
    settings = ServeSettings(model_name="tiny-flamingo", api_key=KEY, max_body_bytes=int(1.6 * one_image))
    browser = _browser()

    def count(selector):
        return len(browser.find_elements(By.CSS_SELECTOR, selector))

    def send(text=None):
        if text is not None:
            browser.find_element(By.ID, "chat-input").send_keys(text)
        before = count(".msg[data-done='true']")
        browser.find_element(By.ID, "chat-send").click()
        wait.until(lambda b: count(".msg[data-done='true']") > before or count(".msg.note") == 1)

    def set_max_tokens(value):
        browser.execute_script("document.getElementById('max-tokens').value = arguments[0]", value)

    def shown_equals_sent():  # the bubbles of the conversation are the turns the page sends next
        turns = browser.execute_script("return history.map((m) => m.role)")
        bubbles = browser.execute_script("return Array.from(document.querySelectorAll('#messages .msg'))"
                                         ".filter((m) => !m.classList.contains('note'))"
                                         ".map((m) => m.classList.contains('user') ? 'user' : 'assistant')")
        return turns == bubbles

    try:
        with running_server(engine, settings) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: "API key" in b.find_element(By.ID, "model-name").text)  # 401: no key yet
            browser.execute_script("const k = document.getElementById('api-key'); k.value = arguments[0];"
                                   "k.dispatchEvent(new Event('change'))", KEY)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            set_max_tokens("4")

            browser.find_element(By.ID, "chat-file").send_keys(str(first))
            wait.until(lambda b: count("#chat-attachments .chip img") == 1)
            send("first")
            assert count(".msg.assistant") == 1 and not count(".msg.note") and shown_equals_sent()

            browser.find_element(By.ID, "chat-file").send_keys(str(second))
            wait.until(lambda b: count("#chat-attachments .chip img") == 1)
            send("second")  # two images in the conversation: over the body limit
            note = browser.find_element(By.CSS_SELECTOR, ".msg.note").text
            assert "413" in note and "New chat" in note
            assert count(".msg.user") == 1 and shown_equals_sent()
            assert browser.find_element(By.ID, "chat-input").get_attribute("value") == "second"
            assert count("#chat-attachments .chip img") == 1  # the failed turn's image, back to send again
            browser.save_screenshot(str(ARTIFACTS / "serve-page-413.png"))

            browser.find_element(By.ID, "chat-clear").click()
            send()  # the restored turn alone fits
            assert count(".msg.user img") == 1 and count(".msg.assistant") == 1 and not count(".msg.note")
            assert shown_equals_sent()

            set_max_tokens("0")  # sent as typed: the server's error shows
            send("third")
            note = browser.find_element(By.CSS_SELECTOR, ".msg.note").text
            assert "400" in note and "max_tokens" in note
            assert browser.find_element(By.ID, "chat-input").get_attribute("value") == "third"
            assert count(".msg.user") == 1 and shown_equals_sent()
            set_max_tokens("")  # refused in the page
            send()
            assert "max tokens is empty" in browser.find_element(By.CSS_SELECTOR, ".msg.note").text
            assert browser.find_element(By.ID, "chat-input").get_attribute("value") == "third"
            assert count(".msg.note") == 1 and shown_equals_sent()

            set_max_tokens("4")
            browser.find_element(By.ID, "chat-clear").click()
            browser.execute_script(DROP, "photo.png", "", base64.b64encode(first.read_bytes()).decode())
            wait.until(lambda b: count("#chat-attachments .chip img") == 1)
            assert "notes.txt" in browser.find_element(By.ID, "notice").text
            send()  # the typeless file went as image/png: the server decoded it
            assert count(".msg.user img") == 1 and count(".msg.assistant") == 1 and not count(".msg.note")
    finally:
        browser.quit()

"""The web page at `/`, in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium):
build a few-shot prompt with images, see the streamed answer (the API's greedy answer for the same conversation)
and its figures, chat with an attached image, attach images by drag and drop and by paste; a refused turn goes back
into the composer and the page says why (413, 400, a missing key, a file that is no image); New chat during a turn
aborts it and keeps it out of the new chat; Stop (and Escape) ends an answer where it is and keeps it, marked (a Stop
after the answer's finish_reason leaves it complete); top p, sent when changed and checked by the server; the small
things (input methods' Enter, accessible names, no console errors, no empty demo sent, text drops, file types
the server cannot read and APNG, which it reads, a phone's screen, long words, number settings that are no number,
error answers that are no JSON, characters split over tokens); the chat following its answer unless the reader
scrolled up, the keyboard's focus when a remove button goes, and accessibility (contrast, ARIA tabs, focus rings on
invalid fields, headings, help and names); screenshots are kept as artifacts.

Skipped without Chromium, except under CI (the environment variable CI set), where it fails instead."""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for `browser.get_log`
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
                                           ".map((s) => [s.textContent, s.dataset.logprob, s.dataset.tokens, s.title])")
            with_probs = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 5}).json()
            entries = with_probs["choices"][0]["logprobs"]["content"]
            assert spans and "".join(text for text, *_ in spans) == answer
            # a span is the tokens its text came with (a token without text of its own, a byte of a character or
            # the leading space the chat drops, goes with the next piece): shaded by their joint probability
            used = 0
            for _, logprob, tokens, title in spans:
                joint = sum(e["logprob"] for e in entries[used:used + int(tokens)])
                assert abs(float(logprob) - joint) < 1e-4
                assert "%" in title and title.count("\n") == (5 if tokens == "1" else int(tokens))
                used += int(tokens)
            assert len(entries) - used <= 1  # the stop token, whose text the answer leaves out, has no span
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
            # a message, the composer and the few-shot fields each laid out in their own text's direction
            assert browser.execute_script(RIGHT_TO_LEFT) == ["rtl", "ltr", "rtl", "rtl", "rtl"]

            # drag and drop, and paste, of an image onto the composer attach it
            browser.execute_script(DROP_AND_PASTE, base64.b64encode(query.read_bytes()).decode())
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#chat-attachments .chip img")) == 2)
    finally:
        browser.quit()
    assert (ARTIFACTS / "serve-page-few-shot.png").stat().st_size > 1000


RIGHT_TO_LEFT = """
const message = addMessage("user", [], "\u05e9\u05d0\u05dc\u05d4?");  // Hebrew: its "?" at the left
const english = addMessage("assistant", [], "an answer");
const input = document.getElementById("chat-input"), query = document.getElementById("query-text");
const answer = document.querySelector("#demos .answer");
const before = [input.value, query.value, answer.value];
input.value = query.value = answer.value = "\u0645\u0631\u062d\u0628\u0627!";  // Arabic
const got = [message.querySelector(".text"), english.querySelector(".text"), input, query, answer].map(
  (el) => getComputedStyle(el).direction);
[input.value, query.value, answer.value] = before;
message.remove();
english.remove();
return got;
"""
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

            # a limit the conversation outgrows as a whole (its images, the model's positions) refuses a later turn
            # that alone would fit: the note says so (the server's 400 as a server over --max-images words it)
            browser.execute_script(OUTGROWN)
            send("fourth")
            note = browser.find_element(By.CSS_SELECTOR, ".msg.note").text
            assert "more than the 1 this server accepts per prompt" in note and "New chat" in note
    finally:
        browser.quit()


OUTGROWN = """
const realFetch = window.fetch;
window.fetch = function (url, options) {
  if (!String(url).endsWith("v1/chat/completions")) return realFetch.apply(this, arguments);
  const error = {message: "2 images/videos, more than the 1 this server accepts per prompt",
                 type: "invalid_request_error", param: "messages"};
  return Promise.resolve(new Response(JSON.stringify({error}), {status: 400,
                                                                 headers: {"Content-Type": "application/json"}}));
};
"""


# Every request the page sends, with its body, in `window.sent`.
RECORD = """
window.sent = [];
const fetchAsSent = window.fetch;
window.fetch = function (url, options) {
  window.sent.push({url: String(url), body: options && options.body});
  return fetchAsSent.apply(this, arguments);
};
"""


def _chat_bodies(browser) -> list[dict]:
    return [json.loads(r["body"]) for r in browser.execute_script("return window.sent")
            if r["url"].endswith("v1/chat/completions")]  # (a relative URL)


def test_page_new_chat_aborts_the_turn_on_its_way_and_keeps_it_out_of_the_new_chat(tmp_path, one_thread):
    """New chat while an answer streams: the request is aborted (the server cancels its job), Send works at once,
    the abandoned turn neither lands in the new chat's history nor restores its text or shows its error there, and
    the new chat's first request holds only its own message (its answer is the API's for that message alone)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # an answer (22 tokens) still streaming when New chat is clicked; each job the server queued, and the kinds of
    # the events the engine sent it
    engine, jobs, events = _slow_engine(tmp_path, 0.2)
    browser = _browser()

    def count(selector):
        return len(browser.find_elements(By.CSS_SELECTOR, selector))

    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo")) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            browser.execute_script(RECORD)
            browser.execute_script("document.getElementById('max-tokens').value = '400'")
            browser.find_element(By.ID, "chat-input").send_keys("hello")
            browser.find_element(By.ID, "chat-send").click()
            WebDriverWait(browser, 60, poll_frequency=0.05).until(lambda b: b.execute_script(
                "return document.querySelector('.msg.assistant .text').textContent.length > 0"))
            browser.find_element(By.ID, "chat-clear").click()
            assert browser.find_element(By.ID, "chat-send").is_enabled()  # at once, not when the old turn ends
            assert browser.execute_script("return history.length") == 0 and not count("#messages .msg")

            WebDriverWait(browser, 10).until(lambda b: jobs[0].cancelled.is_set())  # the server stopped it ...
            assert "done" not in events[0], events[0].count("delta")  # ... before its end
            time.sleep(0.3)  # time for the abandoned turn's handler to run (it must do nothing)
            assert browser.execute_script("return history.length") == 0 and not count("#messages .msg")
            assert browser.find_element(By.ID, "chat-input").get_attribute("value") == ""  # "hello" not restored
            assert browser.find_element(By.ID, "notice").text == ""

            browser.execute_script("document.getElementById('max-tokens').value = '4'")
            browser.find_element(By.ID, "chat-input").send_keys("second")
            browser.find_element(By.ID, "chat-send").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
            first, second = _chat_bodies(browser)
            assert first["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
            assert second["messages"] == [{"role": "user", "content": [{"type": "text", "text": "second"}]}]
            assert browser.execute_script("return history.map((m) => m.role)") == ["user", "assistant"]
            assert count("#messages .msg.user") == 1 and count("#messages .msg.assistant") == 1
            assert not count(".msg.note")
            shown = browser.execute_script("return document.querySelector('.msg.assistant .text').textContent")
            api = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": second["messages"], "max_tokens": 4, "temperature": 0}).json()
            assert shown == api["choices"][0]["message"]["content"]
            assert len(jobs) == 3 and jobs[1].prompt_ids.tolist() == jobs[2].prompt_ids.tolist()
    finally:
        browser.quit()


DROP_FILES = """
const [target, files] = arguments;
const t = new DataTransfer();
for (const [name, type, text] of files) t.items.add(new File([text], name, {type}));
return document.querySelector(target).dispatchEvent(
  new DragEvent("drop", {dataTransfer: t, bubbles: true, cancelable: true}));
"""
DROP_TEXT = """
const t = new DataTransfer();
t.setData("text/plain", "dragged words");
const input = document.getElementById("chat-input");
return ["dragover", "drop"].map((type) => input.dispatchEvent(
  new DragEvent(type, {dataTransfer: t, bubbles: true, cancelable: true})));
"""
ENTER = """
const input = document.getElementById("chat-input");
input.dispatchEvent(new KeyboardEvent("keydown", Object.assign(
  {key: "Enter", bubbles: true, cancelable: true}, arguments[0])));
"""


def _nameless(browser) -> list[tuple[str, str]]:
    """The text fields and buttons shown whose accessible name (Chromium's accessibility tree) says nothing."""
    nodes = browser.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    return [(n["role"]["value"], n.get("name", {}).get("value", "")) for n in nodes
            if not n.get("ignored") and n.get("role", {}).get("value") in ("textbox", "button")
            and n.get("name", {}).get("value", "").strip() in ("", "×")]


def test_page_input_methods_names_console_empty_demo_text_drops_and_file_types(tmp_path, one_thread):
    """An Enter that confirms an input method's composition does not send; every text field and button has a name
    (the × buttons say what they remove) and the few-shot answer is a live region; a load logs no console error
    (no favicon 404); the default demo, untouched, is not sent, and a demo with an image and no answer is refused
    in the page; dragged text drops into the composer (only file drags are taken), a file dropped beside the drop
    zones is not opened; SVG and HEIC files are not offered by the picker and are named, not attached."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "query.png"
    random_image(2).save(image)
    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2, prefill_chunk=32)
    browser = _browser()

    def count(selector):
        return len(browser.find_elements(By.CSS_SELECTOR, selector))

    def value(element_id):
        return browser.find_element(By.ID, element_id).get_attribute("value")

    def run_fewshot():
        browser.execute_script("document.getElementById('fewshot-output').dataset.done = 'false'")
        browser.find_element(By.ID, "run-fewshot").click()
        wait.until(lambda b: b.find_element(By.ID, "fewshot-output").get_attribute("data-done") == "true")

    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo")) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors  # the favicon is inline: no 404
            browser.execute_script(RECORD)
            browser.execute_script("document.getElementById('max-tokens').value = '2'")

            # Enter confirming a composition (isComposing; keyCode 229 where only that says so) is not sent
            browser.find_element(By.ID, "chat-input").send_keys("にほんご")
            browser.execute_script(ENTER, {"isComposing": True})
            browser.execute_script(ENTER, {"keyCode": 229})
            time.sleep(0.3)
            assert not count(".msg.user") and value("chat-input") == "にほんご"
            browser.execute_script(ENTER, {})  # a plain Enter sends
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
            assert count(".msg.user") == 1 and value("chat-input") == ""

            # dragged text is the browser's to drop (nothing cancels it); a file dropped off the zones is not opened
            browser.execute_script(DROP_FILES, "#composer", [["notes.txt", "text/plain", "words"]])
            assert "notes.txt" in browser.find_element(By.ID, "notice").text
            assert browser.execute_script(DROP_TEXT) == [True, True]  # not cancelled
            assert "notes.txt" in browser.find_element(By.ID, "notice").text  # a text drop leaves the notice
            assert browser.execute_script(DROP_FILES, "h1", [["x.png", "image/png", "x"]]) is False
            rect = browser.execute_script("return document.getElementById('chat-input').getBoundingClientRect()")
            x, y = rect["left"] + rect["width"] / 2, rect["top"] + rect["height"] / 2
            data = {"items": [{"mimeType": "text/plain", "data": "dragged words"}], "dragOperationsMask": 1}
            for kind in ("dragEnter", "dragOver", "drop"):  # a real drag, as Chromium's input gives it
                browser.execute_cdp_cmd("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
            wait.until(lambda b: value("chat-input") == "dragged words")

            # the pickers offer what the server reads; SVG and HEIC are named, with what to do about HEIC
            accept = browser.find_element(By.ID, "chat-file").get_attribute("accept")
            assert "image/png" in accept and "video/*" in accept and ".webp" in accept
            assert "image/*" not in accept and "svg" not in accept and "hei" not in accept
            browser.execute_script(DROP_FILES, "#composer", [["pic.svg", "image/svg+xml", "<svg></svg>"],
                                                             ["photo.heic", "", "ftypheic"]])
            notice = browser.find_element(By.ID, "notice").text
            assert "pic.svg" in notice and "photo.heic" in notice and "JPEG" in notice
            assert not count("#chat-attachments .chip")

            # names: the chat with an attachment, then the few-shot panel
            browser.find_element(By.ID, "chat-file").send_keys(str(image))
            wait.until(lambda b: count("#chat-attachments .chip img") == 1)
            label = browser.find_element(By.CSS_SELECTOR, "#chat-attachments .chip button").get_attribute("aria-label")
            assert label == "remove image 1 (query.png)"
            assert not _nameless(browser)
            browser.find_element(By.ID, "tab-fewshot").click()
            assert not _nameless(browser)
            assert browser.find_element(By.ID, "fewshot-output").get_attribute("aria-live") == "polite"

            # the default demo (no image, no answer) is left out; an image without an answer is refused
            browser.find_element(By.ID, "query-file").send_keys(str(image))
            wait.until(lambda b: count("#query .media-slot img") == 1)
            sent = len(_chat_bodies(browser))
            run_fewshot()
            assert len(_chat_bodies(browser)) == sent + 1
            assert [m["role"] for m in _chat_bodies(browser)[-1]["messages"]] == ["user"]
            browser.find_element(By.CSS_SELECTOR, "#demos .demo-file").send_keys(str(image))
            wait.until(lambda b: count("#demos .media-slot img") == 1)
            sent = len(_chat_bodies(browser))
            run_fewshot()
            assert "demo 1 has no answer" in browser.find_element(By.ID, "fewshot-output").text
            assert len(_chat_bodies(browser)) == sent
            browser.find_element(By.CSS_SELECTOR, "#demos .answer").send_keys("a dot.")
            run_fewshot()
            body = _chat_bodies(browser)[-1]["messages"]
            assert [m["role"] for m in body] == ["user", "assistant", "user"] and body[1]["content"] == "a dot."
            errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        browser.quit()


def _slow_engine(tmp_path, step_seconds: float):
    """A tiny engine whose decode steps sleep (an answer streams for seconds), and the jobs it was given with the kinds
    of the events each was sent."""
    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2, prefill_chunk=32)
    decode_step = engine._decode_step

    def slow_decode_step() -> None:
        time.sleep(step_seconds)
        decode_step()

    engine._decode_step = slow_decode_step
    return (engine, *_recording(engine))


def _recording(engine) -> tuple[list, list[list[str]]]:
    """The jobs the server gives `engine` from now on (their sampling parameters are what it received), and the kinds
    of the events each was sent."""
    jobs, events = [], []

    def submit_all(batch) -> None:
        for job in batch:
            jobs.append(job)
            events.append([])
            emit = job.emit
            job.emit = lambda event, emit=emit, kinds=events[-1]: (kinds.append(event.kind), emit(event))[1]
        queue_all(batch)

    queue_all, engine.submit_all = engine.submit_all, submit_all
    return jobs, events


# An answer of /v1/chat/completions whose stream holds after `window.held` (server-sent events) until the request is
# aborted, which fails its read as it fails the read of fetch's own streams: a Stop comes at a moment the test picks.
HELD = """
const fetchAsSent = window.fetch;
window.fetch = function (url, options) {
  if (!String(url).endsWith("v1/chat/completions") || !window.held) return fetchAsSent.apply(this, arguments);
  window.sent.push({url: String(url), body: options && options.body});
  const [held, signal] = [window.held, options.signal];
  const body = new ReadableStream({start(controller) {
    controller.enqueue(new TextEncoder().encode(held));
    signal.addEventListener("abort", () => controller.error(new DOMException("aborted", "AbortError")));
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {"content-type": "text/event-stream"}}));
};
"""


def test_page_stop_keeps_the_partial_answer_and_the_server_stops_generating(tmp_path, one_thread):
    """Stop, shown in place of Send (Run) while an answer streams: the request is aborted (the server cancels its job
    before its end), the answer so far stays, marked as stopped, and in the chat it is the assistant's turn sent with
    the next one; stopped before any text, the turn goes back into the composer. Escape stops the few-shot run. A
    Stop after the answer's finish_reason came (its usage and the stream's close still on their way) is too late to
    stop it: the answer is complete, not marked stopped."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    engine, jobs, events = _slow_engine(tmp_path, 0.2)
    browser = _browser()

    def shown(element_id):
        return browser.find_element(By.ID, element_id).is_displayed()

    def text_of(selector):
        return browser.execute_script("return document.querySelector(arguments[0]).textContent", selector)

    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo")) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            fast = WebDriverWait(browser, 60, poll_frequency=0.05)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            browser.execute_script(RECORD)
            browser.execute_script("document.getElementById('max-tokens').value = '400'")
            assert shown("chat-send") and not shown("chat-stop")
            browser.find_element(By.ID, "chat-input").send_keys("hello")
            browser.find_element(By.ID, "chat-send").click()
            fast.until(lambda b: text_of(".msg.assistant .text"))
            assert shown("chat-stop") and not shown("chat-send")
            focus = "return document.activeElement.id"  # the keyboard's focus follows the button shown in its place
            assert browser.execute_script(focus) == "chat-stop"
            browser.find_element(By.ID, "chat-stop").click()
            wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant").get_attribute("data-done") == "true")
            assert browser.execute_script(focus) == "chat-send"
            WebDriverWait(browser, 10).until(lambda b: jobs[0].cancelled.is_set())  # the server stopped it ...
            assert "done" not in events[0]  # ... before its end
            partial = text_of(".msg.assistant .text")
            reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant")
            assert partial and "stopped" in reply.get_attribute("class")
            assert text_of(".msg.assistant .stats").startswith("stopped by you")
            assert browser.execute_script("return history") == [
                {"role": "user", "content": [{"type": "text", "text": "hello"}]},
                {"role": "assistant", "content": partial}]
            assert shown("chat-send") and not shown("chat-stop") and not browser.find_elements(By.CSS_SELECTOR, ".note")

            browser.execute_script("document.getElementById('max-tokens').value = '2'")
            browser.find_element(By.ID, "chat-input").send_keys("next")
            browser.find_element(By.ID, "chat-send").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']")) == 2)
            assert _chat_bodies(browser)[-1]["messages"][1] == {"role": "assistant", "content": partial}

            # stopped before the answer began: the turn goes back into the composer
            browser.find_element(By.ID, "chat-input").send_keys("third")
            browser.execute_script("document.getElementById('chat-send').click();"
                                   "document.getElementById('chat-stop').click()")
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.note"))
            assert "Stopped before the answer began" in text_of(".msg.note")
            assert browser.find_element(By.ID, "chat-input").get_attribute("value") == "third"
            assert browser.execute_script("return history.length") == 4

            # few-shot: Escape stops the run
            browser.find_element(By.ID, "tab-fewshot").click()
            browser.execute_script("document.getElementById('max-tokens').value = '400'")
            browser.find_element(By.ID, "run-fewshot").click()
            fast.until(lambda b: text_of("#fewshot-output"))
            assert shown("stop-fewshot") and not shown("run-fewshot")
            ActionChains(browser).send_keys(Keys.ESCAPE).perform()
            wait.until(lambda b: b.find_element(By.ID, "fewshot-output").get_attribute("data-done") == "true")
            WebDriverWait(browser, 10).until(lambda b: jobs[-1].cancelled.is_set())
            assert "done" not in events[-1]
            assert "stopped" in browser.find_element(By.ID, "fewshot-output").get_attribute("class")
            assert text_of("#fewshot-output") and text_of("#fewshot-stats").startswith("stopped by you")
            assert shown("run-fewshot") and not shown("stop-fewshot")
            browser.save_screenshot(str(ARTIFACTS / "serve-page-stopped.png"))

            # Stop while the stream holds: before the answer's finish_reason it stops the answer, after it the answer
            # is complete (the usage and [DONE] that would follow do not come, as when Stop lands just before them)
            browser.find_element(By.ID, "tab-chat").click()
            browser.find_element(By.ID, "chat-clear").click()
            browser.execute_script(HELD)
            text = {"choices": [{"index": 0, "delta": {"content": "a cat"}, "finish_reason": None}]}
            end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
            for chunks, stopped in (([text], True), ([text, end], False)):
                held = "".join("data: " + json.dumps(c) + "\n\n" for c in chunks)
                browser.execute_script("window.held = arguments[0]", held)
                browser.find_element(By.ID, "chat-input").send_keys("again")
                browser.find_element(By.ID, "chat-send").click()
                fast.until(lambda b: text_of(".msg.assistant:last-child .text"))
                browser.find_element(By.ID, "chat-stop").click()
                wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant:last-child")
                           .get_attribute("data-done") == "true")
                reply = browser.find_element(By.CSS_SELECTOR, ".msg.assistant:last-child")
                stats = text_of(".msg.assistant:last-child .stats")
                assert ("stopped" in reply.get_attribute("class")) == stopped, (stopped, stats)
                assert stats.startswith("stopped by you") == stopped and stats.endswith("length") != stopped
                assert browser.execute_script("return history.at(-1)") == {"role": "assistant", "content": "a cat"}
    finally:
        browser.quit()


# Answers of /v1/chat/completions crafted in the page (what the tiny model or a proxy would rarely give): the body,
# status and content type set with `window.fake = [body, status, type]`; no reason phrase, as over HTTP/2.
FAKE = """
const fetchAsSent = window.fetch;
window.fetch = function (url, options) {
  if (!String(url).endsWith("v1/chat/completions") || !window.fake) return fetchAsSent.apply(this, arguments);
  window.sent.push({url: String(url), body: options && options.body});
  const [body, status, type] = window.fake;
  return Promise.resolve(new Response(body, {status, headers: {"content-type": type}}));
};
"""


def _sse(*chunks: dict) -> str:
    return "".join("data: " + json.dumps(c) + "\n\n" for c in chunks) + "data: [DONE]\n\n"


def _token_chunk(text: str, token: str, logprob: float, raw: list[int]) -> dict:
    entry = {"token": token, "logprob": logprob, "bytes": raw,
             "top_logprobs": [{"token": token, "logprob": logprob, "bytes": raw}]}
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None,
                         "logprobs": {"content": [entry]}}]}


def test_page_phones_apng_proxy_errors_long_words_bad_numbers_and_split_characters(tmp_path, one_thread):
    """On a phone (360 px, mobile emulation) the composer fits the screen; an APNG is attached and read by the server;
    an error answer without JSON (a proxy's HTML page, an empty 504) shows its status and what it says; a long word
    wraps in the few-shot output; a number setting that is no number is refused in the page with a note naming it;
    top p, beside temperature (on a phone too), is sent only when changed from 1 and reaches the server's sampling
    parameters, and one the server refuses (0) says so; a character split over tokens is one span shaded by its
    tokens' joint probability, its title listing them."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    apng = tmp_path / "clip.apng"
    frames = [random_image(1), random_image(2)]
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:], duration=500)
    assert Image.open(apng).n_frames == 2
    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2, prefill_chunk=32)
    jobs, _ = _recording(engine)
    browser = _browser()

    def count(selector):
        return len(browser.find_elements(By.CSS_SELECTOR, selector))

    def send(text="hi"):
        browser.find_element(By.ID, "chat-clear").click()
        browser.find_element(By.ID, "chat-input").send_keys(text)
        browser.find_element(By.ID, "chat-send").click()
        wait.until(lambda b: count(".msg.note") or count(".msg.assistant[data-done='true']"))

    def note():
        return browser.find_element(By.CSS_SELECTOR, ".msg.note .text").text

    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo")) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            browser.execute_script(RECORD)
            browser.execute_script("document.getElementById('max-tokens').value = '2'")

            # a phone: nothing of the composer or the settings out of the screen, where no scrolling reaches; top p
            # shows beside temperature
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})
            assert browser.find_element(By.ID, "top-p").is_displayed()
            assert browser.execute_script("const [t, p] = ['temperature', 'top-p'].map((id) => document"
                                          ".getElementById(id).closest('label'));"
                                          "return t.parentElement.matches('.settings') && t.nextElementSibling === p")
            outside = browser.execute_script("""
                return Array.from(document.querySelectorAll('#composer *, .settings *'))
                  .map((el) => [el, el.getBoundingClientRect()])
                  .filter(([el, r]) => r.width && (r.left < 0 || r.right > innerWidth)).map(([el]) => el.outerHTML)""")
            assert not outside, outside
            assert browser.execute_script("return document.documentElement.scrollWidth === innerWidth")
            browser.save_screenshot(str(ARTIFACTS / "serve-page-phone.png"))
            browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

            # an APNG (Chromium: image/apng) is attached, and the server reads it
            browser.find_element(By.ID, "chat-file").send_keys(str(apng))
            wait.until(lambda b: count("#chat-attachments .chip img") == 1)
            assert browser.find_element(By.ID, "notice").text == ""
            send()
            assert not count(".msg.note") and count(".msg.user img") == 1
            assert _chat_bodies(browser)[-1]["messages"][0]["content"][0]["image_url"]["url"].startswith(
                "data:image/apng;base64,")
            assert "top_p" not in _chat_bodies(browser)[-1] and jobs[-1].params.top_p == 1.0  # the default: not sent

            # number settings that are no number: refused in the page, the note names the field
            sent = len(_chat_bodies(browser))
            for field, name, good in (("temperature", "temperature is not a number", "0"),
                                      ("max-tokens", "max tokens is not", "2"),
                                      ("top-p", "top p is not a number", "1")):
                element = browser.find_element(By.ID, field)
                element.clear()
                element.send_keys("e")
                send()
                assert name in note() and element.get_attribute("aria-invalid") == "true"
                element.clear()
                element.send_keys(good)
                assert element.get_attribute("aria-invalid") is None  # edited: no longer marked
            for field, name, good in (("temperature", "temperature is empty", "0"), ("top-p", "top p is empty", "1")):
                element = browser.find_element(By.ID, field)
                element.clear()
                send()
                assert name in note() and element.get_attribute("aria-invalid") == "true"
                element.send_keys(good)
            assert len(_chat_bodies(browser)) == sent  # none of those was sent

            # top p: sent as typed when not the default, and what the server sampled with; over 1 is the server's to
            # refuse
            top_p = browser.find_element(By.ID, "top-p")
            top_p.clear()
            top_p.send_keys("0.5")
            send()
            assert not count(".msg.note") and _chat_bodies(browser)[-1]["top_p"] == 0.5
            assert jobs[-1].params.top_p == 0.5
            top_p.clear()
            top_p.send_keys("0")  # OpenAI's range is [0, 1]: 0, the likeliest token alone
            send()
            assert not count(".msg.note") and _chat_bodies(browser)[-1]["top_p"] == 0 and jobs[-1].params.top_p == 0
            top_p.clear()
            top_p.send_keys("1.5")
            send()
            assert note().startswith("400: ") and "top_p" in note() and _chat_bodies(browser)[-1]["top_p"] == 1.5
            top_p.clear()
            top_p.send_keys("1")

            # error answers without JSON: the status and what the body says, or where such an answer comes from
            browser.execute_script(FAKE)
            page = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body>"
            browser.execute_script("window.fake = arguments[0]", [page, 502, "text/html"])
            send()
            assert note().startswith("502: ") and "502 Bad Gateway nginx" in note()
            browser.execute_script("window.fake = arguments[0]", ["", 504, "text/plain"])
            send()
            assert note().startswith("504: ") and "proxy" in note()

            # a character split over tokens: its bytes come with no text of their own, then the whole character
            split = _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
                         _token_chunk("", "\ufffd", -0.5, [0xE2]), _token_chunk("", "\ufffd", -1.0, [0x82]),
                         _token_chunk("€", "\ufffd", -0.25, [0xAC]), _token_chunk("5", "5", -0.1, [0x35]),
                         {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            browser.find_element(By.ID, "show-probs").click()
            browser.execute_script("window.fake = arguments[0]", [split, 200, "text/event-stream"])
            send()
            spans = browser.execute_script("return Array.from(document.querySelectorAll('.msg.assistant .tok'))"
                                           ".map((s) => [s.textContent, +s.dataset.logprob, s.title])")
            assert [(text, round(logprob, 6)) for text, logprob, _ in spans] == [("€", -1.75), ("5", -0.1)]
            title = spans[0][2]
            assert title.startswith('"€" 17.4%: 3 tokens together') and all(b in title for b in ("e2", "82", "ac"))
            browser.find_element(By.ID, "show-probs").click()

            # a long word wraps in the few-shot output: the page does not scroll sideways
            word = "https://example.com/" + "a" * 300
            answer = _sse({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": "stop"}]})
            browser.execute_script("window.fake = arguments[0]", [answer, 200, "text/event-stream"])
            browser.find_element(By.ID, "tab-fewshot").click()
            browser.find_element(By.ID, "run-fewshot").click()
            wait.until(lambda b: b.find_element(By.ID, "fewshot-output").get_attribute("data-done") == "true")
            assert browser.find_element(By.ID, "fewshot-output").text == word
            assert browser.execute_script("const o = document.getElementById('fewshot-output');"
                                          "return [document.documentElement.scrollWidth - innerWidth,"
                                          "        o.scrollWidth - o.clientWidth]") == [0, 0]
    finally:
        browser.quit()


class _PrefixProxy:
    """A reverse proxy mounting `upstream` under `/flamingo/` (the prefix stripped, as nginx's `proxy_pass` with a
    path does), GET and POST, answers passed on whole."""

    def __init__(self, upstream: str):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                if not self.path.startswith("/flamingo/"):
                    self.send_error(404)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, upstream + self.path[len("/flamingo"):], headers=headers,
                                       content=body, timeout=60)
                self.send_response(answer.status_code)
                for k, v in answer.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward  # noqa: N815 (the base class's names)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/flamingo/"


def test_page_works_behind_a_proxy_that_mounts_the_server_under_a_prefix(tmp_path, one_thread):
    """Behind `/flamingo/`, the page's root-absolute URLs (`/static/app.js`, `fetch("/v1/models")`) reached the
    proxy's root: an unstyled page with no script. Its URLs are relative; `--root-path` keeps the server's own
    redirects under the prefix."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2, prefill_chunk=32)
    browser = _browser()
    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo"), root_path="/flamingo") as url:
            proxy = _PrefixProxy(url)
            try:
                browser.get(proxy.url)
                WebDriverWait(browser, 60).until(
                    lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
                loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
                assert {proxy.url + "static/app.js", proxy.url + "static/style.css", proxy.url + "v1/models"} <= \
                    set(loaded)
                moved = httpx.get(url + "/health/", follow_redirects=False)  # a trailing slash: redirected
                assert moved.status_code == 307 and moved.headers["location"] == "/flamingo/health"
                body = {"messages": [{"role": "user", "content": "Say:"}], "max_tokens": 1}
                assert httpx.post(proxy.url + "v1/chat/completions", json=body, timeout=60).status_code == 200
                with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True},
                                  timeout=60) as streamed:  # no proxy buffering (nginx holds a stream back else)
                    assert streamed.headers["x-accel-buffering"] == "no"
                    streamed.read()
                counted = httpx.get(url + "/metrics", timeout=60).text  # the prefix in uvicorn's path: still counted
                assert 'flamingo_requests_total{endpoint="/v1/chat/completions",status="200"} 2' in counted
            finally:
                proxy.httpd.shutdown()
                proxy.httpd.server_close()
    finally:
        browser.quit()


# An answer of /v1/chat/completions that streams the pieces the test gives it: `window.piece(text)` sends one,
# `window.piece(null)` ends the answer.
PIECES = """
const fetchAsSent = window.fetch;
window.fetch = function (url, options) {
  if (!String(url).endsWith("v1/chat/completions")) return fetchAsSent.apply(this, arguments);
  const encoder = new TextEncoder();
  const body = new ReadableStream({start(controller) {
    window.piece = (text) => {
      const delta = text === null ? {} : {content: text};
      const chunk = {choices: [{index: 0, delta, finish_reason: text === null ? "stop" : null}]};
      controller.enqueue(encoder.encode("data: " + JSON.stringify(chunk) + "\\n\\n"));
      if (text === null) controller.close();
    };
  }});
  return Promise.resolve(new Response(body, {status: 200, headers: {"content-type": "text/event-stream"}}));
};
"""
# Whether the reply streaming, its Stop and the composer are in view, and the page's scroll, once the page has drawn
# what came (it scrolls as it lays out, at its next frame).
IN_VIEW = """
const done = arguments[arguments.length - 1];
const bottom = (el) => el.getBoundingClientRect().bottom;
requestAnimationFrame(() => requestAnimationFrame(() => {
  const reply = [...document.querySelectorAll(".msg.assistant")].at(-1), stop = document.getElementById("chat-stop");
  done({reply: bottom(reply) <= innerHeight && bottom(reply) > 0,
        composer: bottom(document.getElementById("composer")) <= innerHeight,
        stop: stop.hidden || bottom(stop) <= innerHeight, y: scrollY});
}));
"""


def test_page_follows_the_answer_unless_scrolled_up_and_keeps_the_focus_on_removal(tmp_path, one_thread):
    """The chat follows its end while an answer streams (the reply, Stop and the composer in view, turn after turn),
    but a reader who scrolled up stays where they are until they scroll back to the end. Removing an attachment or a
    demo with the keyboard moves the focus to the next remove button, then to the message box (+ Add demo), not to
    the page's top."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "query.png"
    random_image(2).save(image)
    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2, prefill_chunk=32)
    browser = _browser()

    def text_of(selector):
        return browser.execute_script("return document.querySelector(arguments[0]).textContent", selector)

    def lines(first, last):  # pieces of the answer, each a line, until the page shows the last
        for i in range(first, last):
            browser.execute_script("window.piece(arguments[0])", f"line {i}\n")
        wait.until(lambda b: f"line {last - 1}\n" in text_of(".msg.assistant:last-child .text"))

    def focused():
        return browser.execute_script("const a = document.activeElement; return a.id || a.getAttribute('aria-label')")

    def press_enter_on(element):
        browser.execute_script("arguments[0].focus()", element)
        ActionChains(browser).send_keys(Keys.ENTER).perform()

    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo")) as url:
            browser.set_window_size(1100, 600)
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            browser.execute_script(PIECES)
            for turn in range(2):  # the second turn starts below the fold of the first
                browser.find_element(By.ID, "chat-input").send_keys(f"turn {turn}" + Keys.ENTER)
                lines(0, 20)
                view = browser.execute_async_script(IN_VIEW)
                assert view["reply"] and view["composer"] and view["stop"] and view["y"] > 0, (turn, view)
                assert focused() == "chat-input"
                browser.execute_script("window.piece(null)")
                wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant:last-child")
                           .get_attribute("data-done") == "true")
                assert browser.execute_async_script(IN_VIEW)["composer"]  # the figures line under the answer too

            # scrolled up to read: the view stays while the answer streams on, until the reader is back at the end
            browser.find_element(By.ID, "chat-input").send_keys("turn 2" + Keys.ENTER)
            lines(0, 5)
            browser.execute_script("scrollBy(0, -300)")
            time.sleep(0.2)  # the scroll event
            up = browser.execute_script("return scrollY")
            lines(5, 25)
            assert browser.execute_async_script(IN_VIEW)["y"] == up
            browser.execute_script("scrollTo(0, document.documentElement.scrollHeight)")
            time.sleep(0.2)
            lines(25, 45)
            view = browser.execute_async_script(IN_VIEW)
            assert view["reply"] and view["composer"] and view["y"] > up
            browser.execute_script("window.piece(null)")
            browser.find_element(By.ID, "chat-clear").click()

            # removing with the keyboard: the focus goes to the next remove button, then to the message box
            for _ in range(2):
                browser.find_element(By.ID, "chat-file").send_keys(str(image))
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#chat-attachments .chip button")) == 2)
            press_enter_on(browser.find_element(By.CSS_SELECTOR, "#chat-attachments .chip button"))
            assert focused() == "remove image 1 (query.png)"  # the second, now first
            ActionChains(browser).send_keys(Keys.ENTER).perform()
            assert not browser.find_elements(By.CSS_SELECTOR, "#chat-attachments .chip") and focused() == "chat-input"

            browser.find_element(By.ID, "tab-fewshot").click()
            browser.find_element(By.ID, "add-demo").click()
            press_enter_on(browser.find_element(By.CSS_SELECTOR, "#demos .remove"))
            assert focused() == "remove demo 1"  # the second demo's, renumbered
            ActionChains(browser).send_keys(Keys.ENTER).perform()
            assert not browser.find_elements(By.CSS_SELECTOR, "#demos .demo") and focused() == "add-demo"
    finally:
        browser.quit()


# Every shown text whose contrast with its background (the backgrounds under it blended, as a translucent token's
# shading is) is under WCAG AA's 4.5:1 (3:1 for large text); disabled buttons are exempt.
LOW_CONTRAST = """
const rgba = (c) => { const [r, g, b, a = 1] = c.match(/[\\d.]+/g).map(Number); return [r, g, b, a]; };
const over = ([r, g, b, a], [R, G, B]) => [r * a + R * (1 - a), g * a + G * (1 - a), b * a + B * (1 - a)];
const luminance = (rgb) => {
  const [r, g, b] = rgb.map((v) => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
};
const low = [];
for (const el of document.querySelectorAll("body *")) {
  const own = Array.from(el.childNodes).some((n) => n.nodeType === Node.TEXT_NODE && n.data.trim());
  if (!own || !el.checkVisibility() || el.closest(":disabled")) continue;
  const chain = [];
  for (let e = el; e; e = e.parentElement) chain.unshift(e);
  const bg = chain.reduce((under, e) => over(rgba(getComputedStyle(e).backgroundColor), under), [255, 255, 255]);
  const style = getComputedStyle(el);
  const [a, b] = [luminance(over(rgba(style.color), bg)), luminance(bg)].sort((x, y) => y - x);
  const ratio = (a + 0.05) / (b + 0.05);
  const size = parseFloat(style.fontSize), large = size >= 24 || (size >= 18.66 && +style.fontWeight >= 700);
  if (ratio < (large ? 3 : 4.5)) low.push(`${el.id || el.className || el.tagName}: ${ratio.toFixed(2)}`);
}
return low;
"""
# The heading levels of the page, in order.
HEADINGS = "return Array.from(document.querySelectorAll('h1, h2, h3, h4, h5, h6')).map((h) => +h.tagName[1])"


def _ax(browser, element_id: str) -> dict:
    """An element's node in Chromium's accessibility tree: role, name, description and properties."""
    nodes = browser.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    backend = browser.execute_cdp_cmd("DOM.describeNode", {"objectId": browser.execute_cdp_cmd(
        "Runtime.evaluate", {"expression": f"document.getElementById('{element_id}')"})["result"]["objectId"]})
    node = next(n for n in nodes if n.get("backendDOMNodeId") == backend["node"]["backendNodeId"])
    return {"role": node["role"]["value"], "name": node.get("name", {}).get("value"),
            "description": node.get("description", {}).get("value"),
            **{p["name"]: p["value"].get("value") for p in node.get("properties", [])}}


def test_page_contrast_tabs_focus_ring_headings_help_and_names(tmp_path, one_thread):
    """Text is AA contrast (4.5:1) in the chat, under an error note and in the few-shot tab; the tabs are ARIA tabs
    (selected one said, arrow keys) and the selected one shows under forced colours too; a field marked invalid still
    shows the keyboard's focus ring; headings do not skip a level; the help of top p and token probabilities is the
    fields' description and shows on focus; the chat box is named; every button and text field of the few-shot tab has
    a name of its own; Enter in the query runs it, and its figures are a live region."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2, prefill_chunk=32)
    browser = _browser()

    def tabs_look():
        return browser.execute_script(
            "return ['tab-chat', 'tab-fewshot'].map((id) => { const s = getComputedStyle(document.getElementById(id));"
            "  return [s.color, s.borderBottomColor, s.borderBottomWidth, s.backgroundColor, s.fontWeight]; })")

    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo")) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            browser.execute_cdp_cmd("Accessibility.enable", {})
            assert browser.execute_script(LOW_CONTRAST) == []

            # help and names read by a screen reader
            assert _ax(browser, "chat-input")["name"] == "message"
            assert "add up to this" in _ax(browser, "top-p")["description"]
            assert "alternatives" in _ax(browser, "show-probs")["description"]
            assert _ax(browser, "show-probs")["name"].strip() == "token probabilities"  # the help is not its name

            # a field marked invalid: the error note's contrast, and the focus ring when the keyboard reaches it
            browser.execute_script("document.getElementById('temperature').value = ''")
            browser.find_element(By.ID, "chat-input").send_keys("hi" + Keys.ENTER)
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.note"))
            assert browser.execute_script(LOW_CONTRAST) == []
            ring = ("const s = getComputedStyle(document.getElementById('temperature'));"
                    "return [s.outlineStyle, s.outlineWidth, s.outlineColor]")
            unfocused = browser.execute_script(ring)
            browser.execute_script("document.getElementById('max-tokens').focus()")
            ActionChains(browser).send_keys(Keys.TAB).perform()
            assert browser.execute_script("return document.activeElement.matches('#temperature:focus-visible')")
            assert browser.execute_script(ring) != unfocused and browser.execute_script(ring)[0] != "none"
            ActionChains(browser).send_keys(Keys.TAB).perform()  # on to top p: its help shows
            assert browser.find_element(By.ID, "top-p-help").is_displayed()
            browser.find_element(By.ID, "temperature").send_keys("0")

            # the tabs: which is selected, said and shown (forced colours too); the arrow keys select
            assert [(_ax(browser, t)["role"], _ax(browser, t)["selected"]) for t in ("tab-chat", "tab-fewshot")] == \
                [("tab", True), ("tab", False)]
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                    {"features": [{"name": "forced-colors", "value": "active"}]})
            chat_look, fewshot_look = tabs_look()
            assert chat_look != fewshot_look
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
            browser.execute_script("document.getElementById('tab-chat').focus()")
            ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
            assert browser.find_element(By.ID, "fewshot").is_displayed()
            assert _ax(browser, "tab-fewshot")["selected"] and not _ax(browser, "tab-chat")["selected"]
            assert browser.execute_script("return document.activeElement.id") == "tab-fewshot"

            # the few-shot tab: contrast, headings, a name of its own for each control with two demos
            browser.find_element(By.ID, "add-demo").click()
            assert browser.execute_script(LOW_CONTRAST) == []
            levels = browser.execute_script(HEADINGS)
            assert levels[0] == 1 and all(b <= a + 1 for a, b in zip(levels, levels[1:])), levels
            nodes = browser.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
            names = [n.get("name", {}).get("value") for n in nodes
                     if not n.get("ignored") and n.get("role", {}).get("value") in ("button", "textbox", "tab")]
            assert len(names) == len(set(names)) and "remove demo 2" in names, names

            # Enter in the query runs it; its figures are announced
            assert browser.find_element(By.ID, "fewshot-stats").get_attribute("aria-live") == "polite"
            browser.execute_script("document.getElementById('max-tokens').value = '2'")
            browser.find_element(By.ID, "query-text").send_keys(Keys.ENTER)
            wait.until(lambda b: b.find_element(By.ID, "fewshot-output").get_attribute("data-done") == "true")
            assert "tokens/s" in browser.find_element(By.ID, "fewshot-stats").text
    finally:
        browser.quit()


BUSY_WHILE_ADDED = """
// each change under the chat's live region, with whether it was aria-busy then: the answer's pieces come in busy
window.busyLog = [];
new MutationObserver((changes) => {
  for (const c of changes) {
    if (c.type === "childList" && c.target.closest(".msg.assistant .text")) {
      window.busyLog.push(document.getElementById("messages").getAttribute("aria-busy"));
    }
  }
}).observe(document.getElementById("messages"), {childList: true, subtree: true});
"""


def test_page_token_alternatives_by_keyboard_and_the_answer_busy_while_it_streams(tmp_path, one_thread):
    """With token probabilities on, an answer's tokens are one Tab stop: the focused token shows its alternatives (its
    title, shown on hover only) in a tooltip that is its description, the arrow keys, Home and End move between the
    answer's tokens, Tab leaves the answer and Shift+Tab comes back to the token last visited, Escape hides the
    tooltip; the chat's live region is aria-busy while an answer streams (a screen reader says it whole), and the
    few-shot answer's too."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    engine = engine_for(save_tiny_model(tmp_path / "model"), max_batch=2, prefill_chunk=32)
    browser = _browser()

    def focused() -> list:
        return browser.execute_script(
            "const a = document.activeElement, tokens = Array.from(document.querySelectorAll('.msg .tok'));"
            "return [a.id, tokens.indexOf(a)]")

    def press(*keys) -> None:
        ActionChains(browser).send_keys(*keys).perform()

    tip = "return document.getElementById('token-tip')"
    try:
        with running_server(engine, ServeSettings(model_name="tiny-flamingo")) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "model-name").text == "tiny-flamingo")
            browser.execute_cdp_cmd("Accessibility.enable", {})
            browser.execute_script("document.getElementById('max-tokens').value = '6'")
            browser.find_element(By.ID, "show-probs").click()
            browser.execute_script(BUSY_WHILE_ADDED)
            browser.find_element(By.ID, "chat-input").send_keys("hi" + Keys.ENTER)
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
            log = browser.execute_script("return window.busyLog")
            assert log and set(log) == {"true"}, log  # every piece added while busy
            assert browser.find_element(By.ID, "messages").get_attribute("aria-busy") is None
            titles = browser.execute_script("return Array.from(document.querySelectorAll('.msg .tok'), (t) => t.title)")
            assert len(titles) >= 3, titles
            assert not browser.find_element(By.ID, "token-tip").is_displayed()

            # Tab from the selected tab reaches the answer's first token, whose alternatives show and describe it
            browser.execute_script("document.getElementById('tab-chat').focus()")
            press(Keys.TAB)
            assert focused() == ["", 0]
            assert browser.find_element(By.ID, "token-tip").is_displayed()
            assert browser.execute_script(tip + ".textContent") == titles[0] and "%" in titles[0]
            assert browser.execute_script("return document.activeElement.matches(':focus-visible')")
            browser.execute_script("document.activeElement.id = 'token-now'")
            assert _ax(browser, "token-now")["description"].replace("\n", " ") == " ".join(titles[0].split("\n"))
            browser.execute_script("document.activeElement.removeAttribute('id')")
            assert browser.execute_script(LOW_CONTRAST) == []
            # the arrow keys, End and Home move within the answer, the tooltip following
            press(Keys.ARROW_RIGHT)
            assert focused() == ["", 1] and browser.execute_script(tip + ".textContent") == titles[1]
            press(Keys.END)
            assert focused() == ["", len(titles) - 1]
            press(Keys.ARROW_RIGHT)  # no further than the last
            assert focused() == ["", len(titles) - 1]
            press(Keys.HOME)
            press(Keys.ARROW_DOWN)
            press(Keys.ARROW_DOWN)
            press(Keys.ARROW_LEFT)
            assert focused() == ["", 1]
            assert browser.execute_script("return document.querySelectorAll('.msg .tok[tabindex=\"0\"]').length") \
                == 1  # one Tab stop an answer
            # Escape hides the tooltip (nothing streams to stop); Tab leaves the answer, Shift+Tab comes back
            press(Keys.ESCAPE)
            assert not browser.find_element(By.ID, "token-tip").is_displayed()
            press(Keys.TAB)
            assert focused() == ["chat-input", -1] and not browser.find_element(By.ID, "token-tip").is_displayed()
            ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
            assert focused() == ["", 1] and browser.find_element(By.ID, "token-tip").is_displayed()

            # the few-shot answer: busy while it streams, its tokens reached the same way
            browser.find_element(By.ID, "tab-fewshot").click()
            browser.execute_script(
                "window.outputBusy = []; const out = document.getElementById('fewshot-output');"
                "new MutationObserver(() => window.outputBusy.push(out.getAttribute('aria-busy')))"
                ".observe(out, {childList: true});")
            browser.find_element(By.ID, "run-fewshot").click()
            wait.until(lambda b: b.find_element(By.ID, "fewshot-output").get_attribute("data-done") == "true")
            assert set(browser.execute_script("return window.outputBusy")) == {"true"}
            assert browser.find_element(By.ID, "fewshot-output").get_attribute("aria-busy") is None
            browser.execute_script("document.querySelector('#fewshot-output .tok').focus()")
            press(Keys.ARROW_RIGHT)
            assert browser.execute_script(
                "return Array.from(document.querySelectorAll('#fewshot-output .tok')).indexOf(document.activeElement)"
            ) == 1
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "serve-page-token-keyboard.png"))
    finally:
        browser.quit()

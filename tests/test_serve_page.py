"""The web page at `/`, in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium):
build a few-shot prompt with images, see the streamed answer (the API's greedy answer for the same conversation)
and its figures, chat with an attached image, attach images by drag and drop and by paste; screenshots are kept as
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

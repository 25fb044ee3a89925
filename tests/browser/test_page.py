"""The chat page (GET /) in headless Chromium: real clicks and key presses, a real server."""

import json
import os
import re
import shutil

import pytest

from tests.browser.cdp import Browser
from tests.browser.conftest import ScriptedServer, open_page, post_json
from tests.server.conftest import Server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.browser
REPLY = "[...document.querySelectorAll('#log .turn.assistant')].at(-1)"
ERROR = "!document.getElementById('error').hidden && document.getElementById('error').textContent"
STATS = re.compile(r"^(\d+) tokens? · first token \d+ ms · [\d.]+ tok/s")


def settings(b: Browser, temperature: str, max_tokens: str, system: str = "") -> None:
    for sel, value in (
        ("#temperature", temperature),
        ("#max-tokens", max_tokens),
        ("#system-prompt", system),
    ):
        b.eval(f"document.querySelector('{sel}').value = {json.dumps(value)}")


def send(b: Browser, text: str) -> None:
    b.type("#input", text)
    b.press_enter()


def reply_state(b: Browser, *states: str) -> str:
    """Wait until the last reply is in one of ``states``; return it."""
    cond = " || ".join(f"s === '{s}'" for s in states)
    return b.wait(f"(s => ({cond}) && s)({REPLY}?.dataset.state)")


def test_key_asked_once_then_a_streamed_reply(browser, page_server, chat_ckpt):
    browser.open(page_server.url + "/")
    browser.eval("sessionStorage.clear()")
    browser.open(page_server.url + "/")
    model = "document.getElementById('model').dataset.state"
    assert browser.wait(model) == "key"
    browser.type("#api-key", "wrong")
    browser.click("#key-form button")
    assert "Error 401" in browser.wait(ERROR)
    open_page(browser, page_server.url)  # the right key this time
    assert browser.eval("document.getElementById('model').textContent") == chat_ckpt  # from /v1/models
    browser.open(page_server.url + "/")  # the tab keeps the key: not asked again
    assert browser.wait(f"{model} !== undefined && {model}") == "ready"
    assert browser.eval("document.getElementById('key-form').hidden")

    settings(browser, "0", "100")
    browser.eval(
        "window.lengths = []; new MutationObserver(() => window.lengths.push("
        f"{REPLY}?.querySelector('.body').textContent.length))"
        ".observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})"
    )
    before = page_server.metrics()
    browser.type("#input", "<b>bold?</b> line one")
    browser.press_enter(shift=True)  # a new line, not a send
    assert browser.eval(f"{REPLY} === undefined")
    send(browser, "line two <img src=x onerror='window.pwned = 1'>")
    assert reply_state(browser, "done") == "done"
    user = browser.eval("document.querySelector('#log .turn.user .body').textContent")
    assert user == "<b>bold?</b> line one\nline two <img src=x onerror='window.pwned = 1'>"
    assert browser.eval("document.querySelectorAll('#log b, #log img').length") == 0
    assert browser.eval("window.pwned") is None
    lengths = [n for n in browser.eval("window.lengths") if n]
    assert len(set(lengths)) > 2, f"the reply did not grow piece by piece: {lengths}"
    meta = browser.eval(f"{REPLY}.querySelector('.meta').textContent")
    tokens = int(STATS.match(meta).group(1))
    after = page_server.wait_idle()
    assert tokens == after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]


def test_stop_aborts_the_request_on_the_server(page, page_server):
    idle = page_server.wait_idle()
    settings(page, "0", "960")  # greedy on the tiny model runs to the limit: a long reply
    send(page, "tell me a long story")
    page.wait(f"{REPLY}.querySelector('.body').textContent.length > 0")
    page.click("#stop")
    assert reply_state(page, "stopped", "done") == "stopped"
    assert page.eval("document.getElementById('send').hidden") is False
    after = page_server.wait_idle()
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == idle["vllm:kv_cache_usage_perc"]
    generated = after["vllm:generation_tokens_total"] - idle["vllm:generation_tokens_total"]
    assert generated < 960, "the request ran to its end: the server did not see the Stop"


def test_new_chat_clears_the_conversation(page, page_server):
    settings(page, "0", "8")
    send(page, "first question")
    reply_state(page, "done")
    send(page, "second question")
    assert (
        page.wait(f"{REPLY}.dataset.state === 'done' && document.querySelectorAll('#log .turn').length") == 4
    )
    page.click("#new-chat")
    assert page.eval("document.getElementById('log').children.length") == 0
    before = page_server.wait_idle()
    send(page, "a fresh start")
    reply_state(page, "done")
    after = page_server.wait_idle()
    # The server was sent the new message alone: the old turns are gone from the request too.
    alone = post_json(
        page_server.url + "/tokenize", {"messages": [{"role": "user", "content": "a fresh start"}]}
    )
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == alone["count"]
    assert page.eval("document.querySelectorAll('#log .turn').length") == 2


def test_a_400_is_shown_and_the_page_stays_usable(page):
    settings(page, "0", "5000")  # beyond the 1024-token context
    send(page, "hello")
    error = page.wait(ERROR)
    assert "Error 400" in error and "maximum context length is 1024" in error and "max_tokens" in error
    assert page.eval("document.querySelectorAll('#log .turn').length") == 0
    assert page.eval("document.getElementById('input').value") == "hello"  # given back to edit
    settings(page, "0", "4")
    page.eval("document.getElementById('input').focus()")
    page.press_enter()
    assert reply_state(page, "done") == "done"
    assert page.eval("document.getElementById('error').hidden")


@pytest.fixture(scope="module")
def scripted():
    s = ScriptedServer(
        {
            "markup": [
                "<script>window.pwned = 1</script>",
                " <img src=x onerror='window.pwned = 2'>\n```html\n<b>not bold</b>\n",
                "```\nand `x < y` after",
            ],
            "busy": 503,
            "cut": None,
        }
    )
    yield s
    s.close()


def test_model_output_is_shown_as_text(browser, scripted):
    open_page(browser, scripted.url)
    send(browser, "markup")
    assert reply_state(browser, "done") == "done"
    body = f"{REPLY}.querySelector('.body')"
    assert browser.eval(f"{body}.querySelectorAll('script, img, b').length") == 0
    assert browser.eval("window.pwned") is None
    text = browser.eval(f"{body}.querySelector('span.text').textContent")
    assert text == "<script>window.pwned = 1</script> <img src=x onerror='window.pwned = 2'>"
    assert browser.eval(f"{body}.querySelector('pre code').textContent") == "<b>not bold</b>"
    assert browser.eval(f"{body}.querySelector('pre .lang').textContent") == "html"
    assert browser.eval(f"{body}.querySelector('code.inline').textContent") == "x < y"
    assert browser.eval(f"{body}.textContent").endswith("</b>and x < y after")
    font = browser.eval(f"getComputedStyle({body}.querySelector('pre code')).fontFamily")
    assert "mono" in font.lower()
    assert STATS.match(browser.eval(f"{REPLY}.querySelector('.meta').textContent")).group(1) == "3"
    assert browser.errors == []


def test_busy_and_lost_connection_are_shown(browser, scripted):
    open_page(browser, scripted.url)
    send(browser, "busy")
    assert browser.wait(ERROR) == "Error 503: the server is busy (retry in 1 s)×"
    browser.eval("document.getElementById('input').value = ''")
    send(browser, "cut")
    assert "closed before the reply finished" in browser.wait(
        f"({ERROR} || '').includes('closed') && {ERROR}"
    )
    assert browser.eval("document.querySelectorAll('#log .turn').length") == 0
    browser.eval("document.getElementById('input').value = ''")
    send(browser, "markup")  # still usable
    assert reply_state(browser, "done") == "done"
    assert browser.eval("document.getElementById('error').hidden")
    assert [r["messages"][-1]["content"] for r in scripted.requests][-3:] == ["busy", "cut", "markup"]
    assert browser.errors == []


def test_unreachable_server_is_shown(browser):
    gone = ScriptedServer({})
    open_page(browser, gone.url)
    gone.close()
    send(browser, "anyone there?")
    assert "Cannot reach the server" in browser.wait(ERROR)
    assert browser.eval("document.getElementById('input').value") == "anyone there?"
    assert browser.eval("document.getElementById('send').hidden") is False
    assert browser.errors == []


def test_screenshot_of_a_finished_exchange(browser, page_server, tmp_path):
    """A PNG of a finished exchange. NANOVLLM_UPDATE_SCREENSHOT=1 takes it with the bundled SmolLM2
    (so that the reply reads as language; about a minute on a CPU) and writes it to docs/chat.png."""
    update = bool(os.environ.get("NANOVLLM_UPDATE_SCREENSHOT"))
    server = Server(None, "--max-model-len", "1024") if update else None
    try:
        open_page(browser, (server or page_server).url)
        settings(browser, "0", "96" if update else "24", "You are a helpful assistant.")
        send(browser, "What is the capital of France?")
        assert reply_state(browser, "done") == "done"
        send(browser, "Write a Python function that adds two numbers.")
        assert reply_state(browser, "done") == "done"
        meta = browser.eval(f"{REPLY}.querySelector('.meta').textContent")
        assert STATS.match(meta), meta
        path = tmp_path / "chat.png"
        browser.screenshot(str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if update:
            os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
            shutil.copy(path, os.path.join(ROOT, "docs", "chat.png"))
    finally:
        assert server is None or server.stop() == 0

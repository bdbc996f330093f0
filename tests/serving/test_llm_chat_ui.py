"""`modelpress chat`: the Gradio page over our OpenAI endpoint, driven in headless Chromium (Debian's, through
Playwright's `executable_path`: no browser download). One streamed exchange against stories260k on 127.0.0.1.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.needs_data
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

MODEL = "stories260k"
SYSTEM = "You tell short stories."
QUESTION = "Tell me about a cat."
MAX_TOKENS = 24
BROWSER_TIMEOUT_MS = 30_000  # page load and one short reply on a loaded 2-core machine take a few seconds
# Records every text the last reply shows, as it changes (the page streams: a growing prefix, then the whole reply).
WATCH_REPLY = """() => {
  window.__replies = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chatbot .bot.message');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText.trim();
    if (window.__replies[window.__replies.length - 1] !== text) window.__replies.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def chromium_path() -> str:
    from .test_dashboard import _find_or_install_chromium

    path, why = _find_or_install_chromium()
    if path is None:
        pytest.skip(why)
    return path


def _words(text: str) -> str:
    return " ".join(text.split())  # the page renders Markdown: compare the words, not the whitespace


# Gradio's queue summarises its events with pandas after each one (gradio/queueing.py, _get_df): it sets an option
# and passes a keyword that pandas 3 deprecates. Library code, in Gradio's worker thread.
@pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated:pandas.errors.Pandas4Warning")
@pytest.mark.filterwarnings("ignore:The copy keyword is deprecated:pandas.errors.Pandas4Warning")
def test_the_chat_page_streams_a_reply(llm_server, chromium_path):
    from modelpress.chat import ChatClient, conversation, launch

    _, url = llm_server
    client = ChatClient(url)
    assert client.models() == [MODEL]
    expected = "".join(client.stream(MODEL, conversation(QUESTION, [], SYSTEM), temperature=0, max_tokens=MAX_TOKENS))
    assert expected.strip()

    app = launch(url, temperature=0, max_tokens=MAX_TOKENS, block=False)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, headless=True, args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.set_default_timeout(BROWSER_TIMEOUT_MS)
                page.goto(app.local_url)
                box = page.locator("#message textarea")
                box.wait_for()
                page.evaluate(WATCH_REPLY)
                page.locator("#system textarea").fill(SYSTEM)
                box.fill(QUESTION)
                box.press("Enter")
                page.wait_for_function("want => window.__replies.some(t => t.split(/\\s+/).join(' ') === want)", arg=_words(expected))
                replies = [_words(t) for t in page.evaluate("() => window.__replies")]
                user_turns = page.locator("#chatbot .user.message").all_inner_texts()
            finally:
                browser.close()
    finally:
        app.close()
    assert [_words(t) for t in user_turns] == [QUESTION]
    final = _words(expected)
    partial = [t for t in replies if t and t != final and final.startswith(t)]
    assert len(partial) >= 2, f"the reply did not stream in pieces: {replies}"  # it grew on screen, token by token

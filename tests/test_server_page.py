"""The server's web page in a real browser: Debian's Chromium, headless, driven by Playwright, against a real
`hybridrag serve` process. It asks a question, watches the answers stream in for two methods side by side, and
reads the answers and the attention bars off the page; they must be what the API answers. A screenshot is saved
(and copied to $HYBRIDRAG_SCREENSHOT when set: the README's picture)."""
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from pydoc_data.topics import topics
from server_process import Server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
QUESTION = "What does an assert statement raise when its condition is false?"
METHODS = ("hybrid", "base_rag")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    docs = root / "docs"
    docs.mkdir()
    for name in ("assert", "for", "while", "pass"):
        (docs / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    config = root / "config.json"
    config.write_text(json.dumps({"encoder": "hashing-256", "retriever": {"top_k": 2},
                                  "generation": {"max_new_tokens": 8}}))
    running = Server(root / "state", docs=docs, config=config)
    yield running
    running.stop()


def test_the_page_streams_each_methods_answer_and_shows_the_attention_bars(server, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(server.url + "/")
        assert page.title() == "hybridrag"
        # count the answer's text changes while it streams, before any column is done
        page.evaluate("""() => {
            window.streamed = {};
            new MutationObserver((changes) => {
                for (const change of changes) {
                    const column = change.target.parentElement?.closest?.("section") ||
                                   change.target.closest?.("section");
                    if (column && column.dataset.state === "streaming" &&
                        (change.target.classList?.contains("answer") || change.target.parentElement?.classList
                            .contains("answer"))) {
                        window.streamed[column.dataset.method] = (window.streamed[column.dataset.method] || 0) + 1;
                    }
                }
            }).observe(document.getElementById("columns"), {subtree: true, childList: true, characterData: true});
        }""")
        page.fill("#question", QUESTION)
        page.click("#submit")
        for method in METHODS:
            page.wait_for_selector(f"section[data-method={method}][data-state=done]", timeout=180_000)
        assert page.query_selector_all("section[data-state=error]") == []
        shown = {}
        for method in METHODS:
            column = f"section[data-method={method}]"
            bars = page.eval_on_selector_all(f"{column} .passage", """rows => rows.map(row => [row.dataset.id,
                parseFloat(row.dataset.mass), parseFloat(row.querySelector('.bar > div').style.width)])""")
            shown[method] = (page.inner_text(f"{column} .answer"), bars)
        streamed = page.evaluate("window.streamed")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    if os.environ.get("HYBRIDRAG_SCREENSHOT"):
        shutil.copyfile(tmp_path / "page.png", os.environ["HYBRIDRAG_SCREENSHOT"])

    for method in METHODS:
        answer, bars = shown[method]
        assert streamed.get(method, 0) >= 2, streamed  # the text came in pieces, not at once
        api = httpx.post(server.url + "/query", json={"question": QUESTION, "method": method}, timeout=180).json()
        assert answer == api["response"] and answer.strip()
        assert [bar[0] for bar in bars] == [p["id"] for p in api["passages"]]
        for (_, mass, width), passage in zip(bars, api["passages"]):
            assert mass == pytest.approx(passage["attention_mass"], abs=1e-4)
            assert width == pytest.approx(100 * mass, abs=0.05)  # the bar is as long as the share
        assert 0 < sum(bar[1] for bar in bars) <= 1 + 1e-6

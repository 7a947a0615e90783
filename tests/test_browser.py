"""The chat page of ``loramoe serve`` and the lab's report.html in a real headless Chromium: Debian's
``chromium`` package driven by Playwright's Python client (never Playwright's own browser
download). A machine without chromium fails here with a message; scripts/install.sh installs it."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from loramoe.lab import lab
from tests.conftest import save_tiny
from tests.lab_checks import TINY_LAB
from tests.serving import LORA, MOE, request, server_fixture

server = server_fixture()

QUESTION = "w5 w6"
GROUP_RGB = {"knowledge": (31, 119, 180), "task": (255, 127, 14)}
"""The page's colours of the two groups (the paper's router figure)."""
SHARE = re.compile(r"(\w+) ([\d.]+)%")

TINY_LAB_ARMS = dict(variants="""\
  lora: {method: lora, lr: 1.0e-3, seeds: [0]}
  loramoe: {method: loramoe, lr: 1.0e-3, seeds: [0]}""", contrasts="""\
  - {name: mixture, a: loramoe, b: lora, question: "Does the mixture keep more?"}""")
"""A lab of one LoRA and one LoRAMoE run (seconds on the tiny model): every figure kind of the
report, the router's included."""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("the browser tests need Debian's chromium package on PATH: run scripts/install.sh "
                    "(or apt-get install chromium)")
    with sync_playwright() as playwright:
        # --no-sandbox: containers (CI's included) run as root, where Chromium's sandbox refuses to start
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


def _open(browser: Browser, url: str) -> tuple[Page, list[str], list[str]]:
    """A new page at ``url``, with the console errors (uncaught exceptions included) and the URL of
    every request it makes, as they come."""
    page = browser.new_page()
    errors: list[str] = []
    urls: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    page.on("request", lambda sent: urls.append(sent.url))
    page.goto(url)
    return page, errors, urls


def _chat_page(browser: Browser, server) -> tuple[Page, list[str], list[str]]:
    """The chat page, once its model list has loaded."""
    page, errors, urls = _open(browser, f"{server.url}/")
    page.wait_for_selector("#model option", state="attached")
    return page, errors, urls


def _rgb(style: str) -> tuple[int, ...]:
    return tuple(int(c) for c in re.search(r"rgba?\((\d+), (\d+), (\d+)", style).groups())


def _mixed(shares: dict[str, float]) -> tuple[float, ...]:
    total = sum(shares.values())
    return tuple(sum(GROUP_RGB[g][c] * v for g, v in shares.items()) / total for c in range(3))


def test_a_typed_question_streams_an_answer_coloured_by_routing_with_one_strip_cell_per_token(browser, server):
    page, errors, urls = _chat_page(browser, server)
    options = page.locator("#model option").all_text_contents()
    assert options == [f"{server.base} (base)", f"{LORA} (lora)", f"{MOE} (loramoe)"]
    assert page.input_value("#model") == MOE  # a LoRAMoE model first: the routing view is the page's point
    assert page.is_visible("#legend") and "knowledge" in page.inner_text("#legend")

    with page.expect_response(f"{server.url}/v1/chat/completions") as answered:
        page.fill("#prompt", QUESTION)
        page.press("#prompt", "Enter")
    response = answered.value
    assert response.request.post_data_json == {"model": MOE, "messages": [{"role": "user", "content": QUESTION}],
                                               "stream": True, "temperature": 0, "loramoe": {"routing": True}}
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
    page.wait_for_selector(".msg.assistant .meta:not(:empty)")

    # the same question without streaming, greedy as the page asked it: the reference answer
    status, reference = request(server, "POST", "/v1/chat/completions", {
        "model": MOE, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
        "loramoe": {"routing": True}})
    assert status == 200
    routing = reference["loramoe"]["routing"]
    assert len(routing) > 5  # enough tokens for the counts below to mean something
    assert page.inner_text(".msg.assistant .text") == reference["choices"][0]["message"]["content"]
    cells, tokens = page.locator(".msg.assistant .route-cell"), page.locator(".msg.assistant .tok")
    assert cells.count() == tokens.count() == len(routing)
    assert page.inner_text(".msg.assistant .meta") == \
        f"{len(routing)} tokens · finish: {reference['choices'][0]['finish_reason']}"
    for i, shares in enumerate(routing):
        title = cells.nth(i).get_attribute("title")
        assert title == tokens.nth(i).get_attribute("title")
        assert title.startswith(f'"{reference["loramoe"]["tokens"][i]}": ')
        shown = {g: float(v) / 100 for g, v in SHARE.findall(title)}
        assert shown == pytest.approx(shares, abs=6e-4)
        for element in (cells.nth(i), tokens.nth(i)):
            assert _rgb(element.get_attribute("style")) == pytest.approx(_mixed(shares), abs=1)
    assert errors == []
    assert all(url.startswith(server.url) for url in urls), urls  # nothing from a CDN: the page works offline


def test_an_api_error_is_shown_in_the_page_and_the_question_kept(browser, server):
    page, errors, _ = _chat_page(browser, server)
    page.fill("#temperature", "5")
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not(:empty)")
    status, body = request(server, "POST", "/v1/chat/completions", {
        "model": MOE, "messages": [{"role": "user", "content": QUESTION}], "temperature": 5, "stream": True,
        "loramoe": {"routing": True}})
    assert status == 422 and page.inner_text("#error") == body["error"]["message"]
    assert page.input_value("#prompt") == QUESTION and page.locator(".msg").count() == 0
    assert len(errors) == 1 and "status of 422" in errors[0]  # Chromium logs the failed request itself


def test_the_api_key_is_sent_as_a_bearer_token_and_kept_for_the_session(browser, server):
    page, errors, _ = _chat_page(browser, server)
    with page.expect_request(f"{server.url}/v1/models") as listed:
        page.fill("#key", "sk-test")
        page.dispatch_event("#key", "change")
    assert listed.value.headers["authorization"] == "Bearer sk-test"
    page.reload()
    assert page.input_value("#key") == "sk-test" and errors == []


def test_the_lab_report_shows_every_figure(browser, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("LORAMOE_CACHE", str(tmp_path / "cache"))  # the lab's pace file stays in the test's folder
    save_tiny(tmp_path / "model")
    config = tmp_path / "lab.yaml"
    config.write_text(TINY_LAB.format(model=tmp_path / "model", **TINY_LAB_ARMS))
    lab(lab_config=config, output=tmp_path / "out")
    report = tmp_path / "out" / "report.html"

    page, errors, urls = _open(browser, report.as_uri())
    page.wait_for_load_state("load")
    figures = page.evaluate("Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(figures) == report.read_text().count("data:image/png;base64,") >= 3
    assert all(complete and width > 0 and height > 0 for complete, width, height in figures), figures
    shot = tmp_path / "report.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    assert errors == []
    assert all(url.startswith(("file:", "data:")) for url in urls), urls

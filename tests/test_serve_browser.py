"""The web page in a real browser: Debian's headless chromium, driven by selenium through /usr/bin/chromedriver,
offline, against a loopback server on a tiny checkpoint.

It uploads a generated wav, asks a preset question, and the streamed answer must appear and equal the API's;
then a follow-up (multi-turn) and a think-mode question whose reasoning shows collapsed under the answer. A
screenshot is saved in the test's tmp_path. Without chromium the test is skipped, except in CI (CI=true), where
it fails: `make apt` installs chromium and chromium-driver.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_serve import MODEL, client, running_server, user_turn
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import MusicFlamingo, MusicFlamingoProcessor
from musicflamingo.checkpoint import stop_token_ids
from musicflamingo.serve import ServeSettings, create_app
from musicflamingo.serve.text import ThinkFormat

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1000",
)
DESCRIBE = (
    "Describe this track in full detail - tell me the genre, tempo, and key, then dive into the instruments, "
    "production style, and overall mood it creates."
)
MAX_TOKENS = 16
TIMEOUT = 90


def _require_browser() -> None:
    missing = [
        name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if path is None
    ]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver, or make apt)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture
def driver(tmp_path):
    _require_browser()
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    d = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    d.set_page_load_timeout(TIMEOUT)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)
    model = MusicFlamingo.from_pretrained(ckpt, dtype=torch.float32, device="cpu").eval()
    processor = MusicFlamingoProcessor.from_pretrained(ckpt)
    return create_app(
        model, processor, ServeSettings(model_name=MODEL, max_batch=2), stop_token_ids(ckpt, model.config)
    )


def _answers(d) -> list:
    return d.find_elements("css selector", ".turn.assistant")


def _ask(d, wait, question: str | None = None, preset: str | None = None) -> object:
    """Ask through the form; returns the new assistant turn once its answer is done."""
    from selenium.webdriver.support.ui import Select

    before = len(_answers(d))
    if preset is not None:
        Select(d.find_element("id", "preset")).select_by_value(preset)
        assert d.find_element("id", "question").get_attribute("value") == DESCRIBE
    if question is not None:
        d.find_element("id", "question").send_keys(question)
    d.find_element("id", "send").click()
    wait.until(lambda _: len(_answers(d)) == before + 1)
    turn = _answers(d)[-1]
    answer = turn.find_element("css selector", ".answer")
    wait.until(lambda _: answer.get_attribute("data-state") in ("done", "error"))
    assert answer.get_attribute("data-state") == "done", answer.get_attribute("textContent")
    return turn


def test_page_uploads_a_song_and_streams_answers(driver, app, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    song = write_audio(tmp_path / "song.wav", make_tone(440, 1.5))
    state = app.state.server
    with running_server(app) as base:
        api = client(base)
        first = [user_turn(DESCRIBE, song)]
        want1 = api.chat.completions.create(model=MODEL, messages=first, max_tokens=MAX_TOKENS)
        want1 = want1.choices[0].message.content
        assert want1.strip()
        followup = [*first, {"role": "assistant", "content": want1}, user_turn("And the tempo?")]
        want2 = api.chat.completions.create(model=MODEL, messages=followup, max_tokens=MAX_TOKENS)
        want2 = want2.choices[0].message.content

        wait = WebDriverWait(driver, TIMEOUT)
        driver.get(base + "/")
        wait.until(lambda d: d.find_element("id", "model").text.startswith(MODEL))
        driver.find_element("css selector", "#settings summary").click()
        tokens = driver.find_element("id", "maxtokens")
        tokens.clear()
        tokens.send_keys(str(MAX_TOKENS))
        driver.find_element("id", "file").send_keys(str(song))
        wait.until(lambda d: "song.wav (wav" in d.find_element("id", "song-name").text)

        turn = _ask(driver, wait, preset="describe")
        assert turn.find_element("css selector", ".answer").get_attribute("textContent") == want1
        assert "prompt tokens" in turn.find_element("css selector", ".usage").text
        driver.save_screenshot(str(tmp_path / "page.png"))

        turn = _ask(driver, wait, question="And the tempo?")
        assert turn.find_element("css selector", ".answer").get_attribute("textContent") == want2
        assert not turn.find_elements("css selector", "details.reasoning")

        # Think mode: the tiny model writes no think tags, so the server's tags are taken from its own greedy
        # answer (read per request), making its opening the "reasoning" the page must fold under the answer.
        driver.find_element("id", "reset").click()
        driver.find_element("id", "think").click()
        think = (
            api.chat.completions.create(
                model=MODEL,
                messages=[user_turn("Why?", song)],
                max_tokens=MAX_TOKENS,
                extra_body={"think": True},
            )
            .choices[0]
            .message.content.lstrip()
        )
        assert len(think) >= 8, think
        state.think_format = ThinkFormat(think[:2], think[5:7], "\x00<a>", "\x00</a>")
        split = (
            api.chat.completions.create(
                model=MODEL,
                messages=[user_turn("Why?", song)],
                max_tokens=MAX_TOKENS,
                extra_body={"think": True},
            )
            .choices[0]
            .message
        )
        assert split.reasoning_content and split.content
        turn = _ask(driver, wait, question="Why?")
        assert turn.find_element("css selector", ".answer").get_attribute("textContent") == split.content
        details = turn.find_element("css selector", "details.reasoning")
        assert details.get_attribute("open") is None  # collapsed
        assert (
            details.find_element("css selector", "pre").get_attribute("textContent")
            == split.reasoning_content
        )
        assert driver.execute_script(
            "return arguments[0].compareDocumentPosition(arguments[1]) & Node.DOCUMENT_POSITION_FOLLOWING",
            turn.find_element("css selector", ".answer"),
            details,
        )
        driver.save_screenshot(str(tmp_path / "page-think.png"))

    shot = Path(tmp_path / "page.png")
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 5000
    print(f"screenshots: {shot} {tmp_path / 'page-think.png'}")

"""A second look at review round 19's serve and eval-parsing commits, with inputs that broke them.

A lead-in letter ("Based on the audio, B.") read as a claim beside the stated ones and before the option texts
turned descriptions of the music ("Key: D.", "the tonic, C.") into answers: a stated letter became ambiguous and an
answer naming its option's text scored as the described letter. A 500 from a server with cors_origins carried no
Access-Control-Allow-Origin (its handler ran outside the CORS middleware), so a browser page saw a CORS failure
instead of the error. A shutting-down 503 had no Retry-After; the page showed "up to 0 min of audio" for a short
max_audio_seconds.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess
from pathlib import Path

import httpx
import pytest
from test_serve import MODEL, loaded, running_server, user_turn  # noqa: F401  (loaded: a fixture)
from tiny_checkpoint import write_tiny_checkpoint

import musicflamingo.serve.app as serve_app
from musicflamingo.eval.parsing import ChoiceParse, parse_choice
from musicflamingo.serve import ServeConfigError, ServeSettings, create_app
from musicflamingo.serve.app import check_listen

LOGGER = "musicflamingo.serve.app"

GENRES = ["Rock", "Jazz", "Blues", "Pop"]


# ---- eval parsing: a lead-in letter is the last rule ---------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        # a stated claim beside a described key (was ambiguous: the key's letter counted as a second claim)
        ("The track is in the key: D. I think it's B.", ChoiceParse(1, "ok", "claim")),
        ("Key: D\nTempo: 120 BPM\nI'd go with B.", ChoiceParse(1, "ok", "claim")),
        # an option's text beside a described key or tonic (was the letter D / A, a wrong answer)
        ("Key: D. The genre is Jazz.", ChoiceParse(1, "ok", "text")),
        ("Tempo: 96 BPM. Key: A.\nGenre: Jazz", ChoiceParse(1, "ok", "text")),
        ("It ends on the tonic, A. It is a jazz piece.", ChoiceParse(1, "ok", "text")),
        ("Key: D.\n(B) Jazz", ChoiceParse(1, "ok", "letter")),
        # still read where nothing else names an option, or the texts name only that letter's option
        ("Based on the audio, B.", ChoiceParse(1, "ok", "claim")),
        ("Based on the audio, B. Jazz drumming throughout.", ChoiceParse(1, "ok", "claim")),
        ("Based on the audio, B. Actually, C.", ChoiceParse(None, "ambiguous", "claim")),
    ],
)
def test_a_lead_in_letter_is_read_only_where_nothing_else_names_an_option(answer, parsed):
    assert parse_choice(answer, GENRES) == parsed


# ---- serve: a 500 reaches a cors_origins page; a shutting-down 503 says when to retry --------------------------
PAGE = "http://localhost:3000"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):  # the checkpoint test_serve's `loaded` reads
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _body() -> dict:
    return {"model": MODEL, "messages": [user_turn("hi")], "max_tokens": 1}


def test_an_internal_error_reaches_a_cors_page_as_the_api_error(loaded, monkeypatch, caplog):  # noqa: F811
    """Starlette answers an `Exception` handler's 500 outside the middleware, so it had no
    Access-Control-Allow-Origin: the page's browser hid the status and message behind a CORS failure."""
    model, processor = loaded

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    settings = ServeSettings(model_name=MODEL, max_batch=1, cors_origins=[PAGE])
    with running_server(create_app(model, processor, settings, stop_ids=())) as base:
        monkeypatch.setattr(serve_app, "parse_chat_request", broken)
        with caplog.at_level(logging.ERROR):
            r = httpx.post(f"{base}/v1/chat/completions", json=_body(), headers={"Origin": PAGE}, timeout=60)
        monkeypatch.undo()
    assert r.status_code == 500 and r.headers.get("access-control-allow-origin") == PAGE, r.headers
    err = r.json()["error"]
    assert err["code"] == "internal_error" and "RuntimeError: a bug" in err["message"], err
    tracebacks = [rec for rec in caplog.records if rec.exc_info]  # ours; uvicorn's second one is gone
    assert len(tracebacks) == 1 and tracebacks[0].name == LOGGER, [
        (t.name, t.getMessage()) for t in tracebacks
    ]


def test_a_shutting_down_503_says_when_to_retry(loaded):  # noqa: F811
    """The busy 503 had Retry-After and the shutting-down one none (OpenAI's clients wait what it says); a page of
    a cors_origins origin could not read it (no CORS-safelisted header, and not exposed)."""
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=1, retry_after_s=3, cors_origins=[PAGE])
    app = create_app(model, processor, settings, stop_ids=())
    with running_server(app) as base:
        app.state.server.worker.drain(0.0)
        r = httpx.post(f"{base}/v1/chat/completions", json=_body(), headers={"Origin": PAGE}, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down", r.text
    assert r.headers.get("retry-after") == "3", r.headers
    exposed = r.headers.get("access-control-expose-headers", "").lower().replace(" ", "").split(",")
    assert "retry-after" in exposed, r.headers


@pytest.mark.skipif(shutil.which("node") is None, reason="node runs the page's script")
@pytest.mark.parametrize(("seconds", "shown"), [(20, "20 s"), (3.0, "3 s"), (90, "90 s"), (600, "10 min")])
def test_the_page_shows_a_short_audio_limit_in_seconds(seconds, shown):
    """The page's header said "up to 0 min of audio" for a server with max_audio_seconds under 30."""
    script = (Path(serve_app.__file__).parent / "static" / "app.js").read_text(encoding="utf-8")
    function = re.search(r"^function audioSpan\(.*?^\}\n", script, re.S | re.M).group(0)
    out = subprocess.run(
        ["node", "-e", f"{function}\nprocess.stdout.write(audioSpan({seconds}))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout == shown


def test_a_host_with_one_address_not_on_this_machine_still_listens(monkeypatch):
    """'localhost' is also ::1 where IPv6 is off: asyncio (from Python 3.12) skips an address the machine lacks and
    listens on the others, but check_listen refused the host. Refused only when no address binds."""

    def addresses(host, port, *args, **kwargs):  # 192.0.2.1: TEST-NET, on no machine
        other = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("192.0.2.1", port))
        mine = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))
        return [other, mine] if host == "both" else [other]

    monkeypatch.setattr(serve_app.socket, "getaddrinfo", addresses)
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    check_listen("both", port)  # 127.0.0.1 binds
    with pytest.raises(
        ServeConfigError, match=rf"^host=192.0.2.1 port={port}: cannot listen on 192.0.2.1:{port}: "
    ):
        check_listen("192.0.2.1", port)

"""Review round 20, a second look at the round's serve and infer commits.

serve decodes a song's base64 in 1-MiB pieces (3f1b388): a stray '=' after a whole group was refused only where it
fell on a piece's edge, accepted elsewhere, as the whole-string decode before it accepted it everywhere. An integer
past float's range (JSON's ints have no bound) in a number field was a 500 (OverflowError) instead of its field's
400, the new repetition_penalty included. `serve.py --help` was still Hydra's list of every config group.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_infer_review6 import make_cfg
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

import musicflamingo.serve.audio as serve_audio
from musicflamingo.inference import infer
from musicflamingo.serve import ServeSettings
from musicflamingo.serve.errors import APIError
from musicflamingo.serve.protocol import parse_chat_request

PARAM = "messages[0].content[0].input_audio.data"
ROOT = Path(__file__).resolve().parents[1]


def _whole(text: str) -> bytes | str:
    """What the decoder did before it went piecewise: one strict decode of the text without its whitespace (the
    bytes, else 'ERR <binascii's message>'); non-ASCII is refused either way."""
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError) as e:
        return f"ERR {e}"


def _pieces(text: str, url: bool = False) -> bytes | str:
    try:
        if url:
            return serve_audio.parse_data_url(f"data:audio/wav;base64,{text}", PARAM)[0]
        return serve_audio.decode_base64(text, PARAM)
    except APIError as e:
        assert e.status == 400 and e.param == PARAM, e.body()
        if e.message == f"{PARAM}: decodes to 0 bytes":
            return b""
        return "ERR " + e.message.removeprefix(f"{PARAM}: not valid base64 (").removesuffix(")")


def test_a_stray_pad_on_a_piece_edge_is_taken_as_anywhere_else():
    """A song's base64 whose 1-MiB first piece is whole groups, then a stray '=': refused ('Leading padding not
    allowed'), where one character more or less before it (no edge there) was accepted, as it was before."""
    raw = random.Random(0).randbytes(3 * serve_audio.B64_PIECE // 4)
    text = base64.b64encode(raw).decode()
    assert len(text) == serve_audio.B64_PIECE and not text.endswith("=")
    for tail in ("=", "==", "\n=\n", "==="):
        assert serve_audio.decode_base64(text + tail, PARAM) == raw, tail
    assert serve_audio.decode_base64(text[:-4] + "\n" + text[-4:] + "=", PARAM) == raw  # the edge before it
    for tail, words in (("=A", "Discontinuous padding"), ("=AAAA", "Discontinuous padding")):
        with pytest.raises(APIError, match=words):
            serve_audio.decode_base64(text + tail, PARAM)


def test_pieces_accept_refuse_and_say_what_the_whole_string_decode_did(monkeypatch):
    """Fuzzed against the whole-string decode, with pieces of 1 to 12 characters so that every edge falls
    everywhere: the same bytes, and the same refusal (binascii's words; the count of data characters the whole
    string's, not the piece's), with whitespace, stray and missing padding and a data: URL around it."""
    rng = random.Random(20)
    extras = [
        "=",
        "==",
        "===",
        " ",
        "\n",
        "\r\n",
        "\t",
        "\x0b",
        "\x1c",
        "\u3000",
        "A",
        "AAAA",
        "AA==",
        "=\n=",
        "-",
    ]
    checked = 0
    for _ in range(1500):
        chars = list(base64.b64encode(rng.randbytes(rng.randint(0, 14))).decode())
        for _ in range(rng.randint(0, 4)):
            chars.insert(rng.randint(0, len(chars)), rng.choice(extras))
        if chars and rng.random() < 0.1:
            del chars[rng.randrange(len(chars))]
        text = "".join(chars)
        if not text:
            continue
        expected = _whole(text)
        for piece in (1, 2, 3, 4, 5, 7, 8, 12):
            monkeypatch.setattr(serve_audio, "B64_PIECE", piece)
            assert _pieces(text) == expected, (text, piece)
            checked += 1
        assert _pieces(text, url=True) == expected, text
    assert checked > 10000
    monkeypatch.setattr(serve_audio, "B64_PIECE", 4)
    assert _pieces("QUJD QUJDR") == "ERR " + (  # 9 data characters, not the last piece's 1
        "Invalid base64-encoded string: number of data characters (9) cannot be 1 more than a multiple of 4"
    )
    with pytest.raises(APIError, match="Only base64 data"):  # non-ASCII (not whitespace): refused, as before
        serve_audio.decode_base64("QUJD\u3000QUJDé===", PARAM)


@pytest.mark.parametrize(
    "field",
    ["temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"],
)
@pytest.mark.parametrize("sign", [1, -1])
def test_an_integer_past_floats_range_is_its_fields_400(field, sign):
    """`"temperature": 1000...0` (400 digits: valid JSON, a Python int) raised OverflowError in math.isfinite, a
    500 'internal error' naming no field."""
    settings = ServeSettings(model_name="m").resolve(32768, 1200)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: sign * 10**400}
    with pytest.raises(APIError) as e:
        parse_chat_request(body, settings)
    assert e.value.status == 400 and e.value.param == field and e.value.message.startswith(f"{field}: ")


def test_serve_py_help_prints_the_usage_and_every_setting_with_its_comment():
    """`serve.py --help` was Hydra's: every config group of configs/ (benchmark, experiment, trainer: none read by
    serve.py) and the settings without their comments. It is now the usage and configs/serve.yaml as written (as
    infer.py's), every setting serve.py takes in it, and no torch import for it."""
    code = (
        "import contextlib, io, runpy, sys\n"
        "sys.argv = ['serve.py', '--help']\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    runpy.run_path('serve.py', run_name='__main__')\n"
        "print(out.getvalue())\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert (
        text.startswith("Serve Music Flamingo over an OpenAI-compatible API")
        and "python serve.py ckpt=DIR" in text
    )
    assert "max_batch: 8            # requests decoded together" in text and "# continuous batching" in text
    assert "Configuration groups" not in text and "benchmark" not in text and "experiment" not in text
    assert "No run folders" not in text  # the hydra block's comment goes with it
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("serve")
    settings = {line.split(":")[0] for line in text.splitlines() if re.match(r"^\w+:", line)}
    assert settings == set(cfg), settings ^ set(cfg)
    assert text.rstrip().endswith("torch imported: False")


# ---------------------------------------------------------------------------------------------- infer: items' fields
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_a_rerun_says_when_reused_rows_hold_other_item_fields(ckpt, tmp_path, caplog):
    """An items.jsonl's fields go into its rows as "item", but a rerun reuses a row by audio and prompt: after an id
    was corrected (or over rows written before rows kept them) the file held the old id, or none, and the run said
    only that everything was answered; a join on the ids paired answers with the wrong items, without a word. The
    rows are kept as written (nothing in the file is rewritten); the rerun says how many differ and where."""
    songs = [str(write_audio(tmp_path / f"{n}.wav", make_tone(f, 1.0))) for n, f in (("a", 440), ("b", 330))]
    items = tmp_path / "items.jsonl"
    out = tmp_path / "answers.jsonl"

    def run(*lines: dict) -> list[str]:
        items.write_text("".join(json.dumps(x) + "\n" for x in lines))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="musicflamingo.inference"):
            return infer(
                make_cfg(f"ckpt={ckpt}", f"audio={items}", "max_new_tokens=2", f"output={out}"),
                out=io.StringIO(),
            )

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "items.jsonl fields" in r.getMessage()]

    lines = [{"audio": songs[0], "id": "q1", "score": float("nan")}, {"audio": songs[1], "id": "q2"}]
    first = run(*lines)
    assert run(*lines) == first and not said(), caplog.text  # (a NaN read back is not equal to itself)
    rows = out.read_text()
    assert run(lines[0], {"audio": songs[1], "id": "q7"}) == first
    (warning,) = said()
    number = 1 + [json.loads(line)["audio"] for line in rows.splitlines()].index(songs[1])
    assert "1 reused answers' rows" in warning
    assert f'(line {number}, {songs[1]}: {{"id": "q2"}}; now {{"id": "q7"}})' in warning, warning
    assert out.read_text() == rows  # kept as written
    # rows written before rows kept the fields: none there
    out.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(r).items() if k != "item"}) + "\n"
            for r in rows.splitlines()
        )
    )
    assert run(*lines) == first and "2 reused answers' rows" in said()[0]

"""Review round 14 of the server and audio decoding (serve-audio journey): a request whose audio cannot fit the
server's token bounds is refused from the audio's header before it is decoded and featurised (soundfile's length,
else the container's by ffprobe); integral floats in integer fields (`max_tokens: 2.0`) and an assistant turn
that is OpenAI's refusal (`content: null` beside `refusal`) are accepted as OpenAI's chat schema has them; a NaN in
the resampler's margin past a segment no longer refuses the segment; files only ffmpeg decodes say a segment past
their end as the others do."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_serve import MODEL, audio_part, loaded  # noqa: F401  (loaded: a fixture)
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

import musicflamingo.audio.io as audio_io
import musicflamingo.serve.audio as serve_audio
from musicflamingo.audio.io import AudioError, load_audio
from musicflamingo.serve import ServeSettings
from musicflamingo.serve.errors import APIError
from musicflamingo.serve.protocol import parse_chat_request, prepare

CONTEXT = 32768
STOP = (299,)


@pytest.fixture(scope="module")  # the checkpoint test_serve's `loaded` reads
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _needs_ffmpeg() -> None:
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.skip("needs Debian's ffmpeg and ffprobe (make setup)")


def _body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def _song_request(path: Path, **fields) -> dict:
    turn = {"role": "user", "content": [audio_part(path), {"type": "text", "text": "What is the tempo?"}]}
    return _body(messages=[turn], **fields)


def _file_request(path: Path) -> dict:
    part = {"type": "audio_url", "audio_url": {"url": path.as_uri()}}
    return _body(messages=[{"role": "user", "content": [part, {"type": "text", "text": "Key?"}]}])


def _spy_decoding(monkeypatch) -> list:
    """The files serve decodes (their paths), recorded."""
    decoded, real = [], serve_audio.load_audio

    def spy(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        decoded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(serve_audio, "load_audio", spy)
    return decoded


# ---------------------------------------------------------------------------------------------- refused early
@pytest.mark.parametrize("bound", ["max_prompt_tokens", "max_cached_tokens"])
def test_audio_over_the_token_bounds_is_refused_from_its_header_before_it_is_decoded(
    loaded,  # noqa: F811
    tmp_path,
    monkeypatch,
    bound,
):
    """A 20-minute song under a server whose prompt or cache bound it cannot fit was decoded and featurised (2.4 s
    of a prepare thread; 30,000 tokens) before the 400 said so. Its header gives the length, so the token count:
    the request is refused with the same error, the exact count the decoded audio gives, and nothing decoded."""
    _, processor = loaded
    song = write_audio(tmp_path / "song.wav", make_tone(440, 40.0))
    settings = ServeSettings(model_name=MODEL, **{bound: 600}).resolve(CONTEXT, processor.kept_seconds)
    req = parse_chat_request(_song_request(song), settings)
    decoded = _spy_decoding(monkeypatch)
    with pytest.raises(APIError) as e:
        prepare(req, processor, settings, CONTEXT, STOP)
    assert decoded == [], "the audio was decoded before the request was refused"
    assert e.value.status == 400 and e.value.param == "messages" and e.value.code == "context_length_exceeded"
    conv = [
        {
            "role": "user",
            "content": [{"type": "audio", "path": str(song)}, {"type": "text", "text": "What is the tempo?"}],
        }
    ]
    n = int(processor.apply_chat_template([conv])["input_ids"].shape[1])  # the count decoding gives
    assert n > 600
    assert f"the prompt is {n} tokens (audio included)" in e.value.message, e.value.message
    # a song that fits is still decoded and answered with that count
    short = write_audio(tmp_path / "short.wav", make_tone(440, 2.0))
    p = prepare(parse_chat_request(_song_request(short), settings), processor, settings, CONTEXT, STOP)
    assert len(decoded) == 1 and p.audio_tokens == 50 and p.audio_seconds == pytest.approx(2.0)


def test_a_file_only_ffmpeg_reads_is_refused_from_its_containers_length(loaded, tmp_path, monkeypatch):  # noqa: F811
    """An m4a (file:// under audio_root) has no length soundfile reads: over the duration limit it was decoded to
    one second past the limit, over the token bound wholly, before the 400. ffprobe reads the container's length:
    both are refused undecoded (the token count a lower bound: the container's length is not the samples')."""
    _needs_ffmpeg()
    _, processor = loaded
    wav = write_audio(tmp_path / "wav" / "song.wav", make_tone(440, 40.0))
    m4a = tmp_path / "song.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    decoded = _spy_decoding(monkeypatch)
    # over the token bound (no duration limit crossed)
    settings = ServeSettings(model_name=MODEL, audio_root=str(tmp_path), max_prompt_tokens=600)
    settings.resolve(CONTEXT, processor.kept_seconds)
    with pytest.raises(APIError) as e:
        prepare(parse_chat_request(_file_request(m4a), settings), processor, settings, CONTEXT, STOP)
    assert decoded == [] and e.value.code == "context_length_exceeded" and e.value.param == "messages"
    assert (
        "the prompt is at least " in e.value.message and "over this server's limit of 600" in e.value.message
    )
    # over the duration limit
    settings = ServeSettings(model_name=MODEL, audio_root=str(tmp_path), max_audio_seconds=30.0)
    settings.resolve(CONTEXT, processor.kept_seconds)
    with pytest.raises(APIError) as e:
        prepare(parse_chat_request(_file_request(m4a), settings), processor, settings, CONTEXT, STOP)
    assert (
        decoded == []
        and e.value.code == "audio_too_long"
        and e.value.param == "messages[0].content[0].audio_url.url"
    )
    assert "longer than the limit of 30 s (its container says 40.0 s)" in e.value.message
    # within both: decoded, the length the samples give
    settings = ServeSettings(model_name=MODEL, audio_root=str(tmp_path), max_audio_seconds=60.0)
    settings.resolve(CONTEXT, processor.kept_seconds)
    p = prepare(parse_chat_request(_file_request(m4a), settings), processor, settings, CONTEXT, STOP)
    assert decoded and p.audio_seconds == pytest.approx(40.0, abs=0.1)


def test_container_duration_says_a_containers_length_and_nothing_for_guesses(tmp_path):
    """ffprobe's length of a container's audio stream; None for a raw AAC stream (ffprobe guesses it from the bit
    rate), a non-audio file, a missing one."""
    _needs_ffmpeg()
    wav = write_audio(tmp_path / "tone.wav", make_tone(440, 2.0))
    for suffix, codec in ((".m4a", "aac"), (".opus", "libopus"), (".mkv", "flac")):
        out = tmp_path / f"tone{suffix}"
        subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", codec, str(out)], check=True)
        assert audio_io.container_duration(out) == pytest.approx(2.0, abs=0.05), suffix
    raw = tmp_path / "tone.aac"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", "-f", "adts", str(raw)], check=True
    )
    assert audio_io.container_duration(raw) is None
    (tmp_path / "junk.m4a").write_bytes(b"not audio at all")
    assert audio_io.container_duration(tmp_path / "junk.m4a") is None
    assert audio_io.container_duration(tmp_path / "missing.m4a") is None


# ---------------------------------------------------------------------------------------------- request fields
def test_integral_floats_are_integers_as_json_has_them(loaded):  # noqa: F811
    """`max_tokens: 2.0` (Python clients send it after arithmetic; json.dumps writes 2.0) was a 400 'must be an
    integer'. JSON has one number type; JSON Schema's "integer" (which OpenAI's API validated with: its errors read
    '139.75 is not of type integer') and pydantic (vLLM) take 2.0; a fraction is still refused."""
    _, processor = loaded
    settings = ServeSettings(model_name=MODEL).resolve(CONTEXT, processor.kept_seconds)
    req = parse_chat_request(_body(max_tokens=2.0, seed=7.0, top_k=5.0, top_logprobs=0.0), settings)
    assert (req.max_tokens, req.seed, req.top_k) == (2, 7, 5)
    assert all(type(v) is int for v in (req.max_tokens, req.seed, req.top_k))
    req = parse_chat_request(_body(max_completion_tokens=3.0), settings)
    assert req.max_tokens == 3 and req.max_tokens_param == "max_completion_tokens"
    assert prepare(req, processor, settings, CONTEXT, STOP).params.max_new_tokens == 3
    for field, value in (("max_tokens", 2.5), ("max_tokens", 0.0), ("seed", 1.5), ("top_k", 2.5)):
        with pytest.raises(APIError) as e:
            parse_chat_request(_body(**{field: value}), settings)
        assert e.value.param == field


def test_an_assistant_turn_that_is_openais_refusal_is_its_words(loaded):  # noqa: F811
    """OpenAI answers a refused request with `content: null` beside `refusal`, and its SDK's message sends both
    back as history; an assistant's content parts may be refusal parts. Both were 400s ('must be a string or a
    non-empty list'); now the refusal is what the assistant said, rendered as its content would be."""
    _, processor = loaded
    settings = ServeSettings(model_name=MODEL).resolve(CONTEXT, processor.kept_seconds)
    said = "I cannot help with that."

    def ids(assistant: dict) -> list[int]:
        messages = [{"role": "user", "content": "hi"}, assistant, {"role": "user", "content": "why?"}]
        req = parse_chat_request(_body(messages=messages), settings)
        return prepare(req, processor, settings, CONTEXT, STOP).input_ids.tolist()

    plain = ids({"role": "assistant", "content": said})
    assert ids({"role": "assistant", "content": None, "refusal": said}) == plain
    assert ids({"role": "assistant", "content": [{"type": "refusal", "refusal": said}]}) == plain
    for bad, param in (
        ({"role": "assistant", "content": None}, "messages[1].content"),
        (
            {"role": "assistant", "content": [{"type": "refusal", "refusal": 3}]},
            "messages[1].content[0].refusal",
        ),
        ({"role": "user", "content": [{"type": "refusal", "refusal": said}]}, "messages[1].content[0].type"),
    ):
        with pytest.raises(APIError) as e:
            ids(bad)
        assert e.value.param == param, e.value.body()


# ---------------------------------------------------------------------------------------------- audio decoding
def test_a_nan_in_the_resamplers_margin_does_not_refuse_the_segment(tmp_path):
    """A segment [1, 2) s of a 44.1-kHz float WAV with a NaN at 2.2 s (or 0.8 s) was refused ('non-finite samples,
    first at 2.200 s'): the reader reads 0.5 s around a segment for the resampler's filter, and counted those. The
    NaN is outside the segment: it is heard as silence (the samples are those of the file with a 0 there); one
    inside is still refused, named by its time."""
    sr = 44100
    x = (np.random.default_rng(0).standard_normal(4 * sr) * 0.1).astype(np.float32)
    for at in (2.2, 0.8):
        bad, silent = x.copy(), x.copy()
        bad[int(at * sr)], silent[int(at * sr)] = np.nan, 0.0
        sf.write(str(tmp_path / "bad.wav"), bad, sr, subtype="FLOAT")
        sf.write(str(tmp_path / "silent.wav"), silent, sr, subtype="FLOAT")
        got = load_audio(tmp_path / "bad.wav", offset=1.0, duration=1.0)
        assert got.shape == (16000,) and np.isfinite(got).all()
        np.testing.assert_array_equal(got, load_audio(tmp_path / "silent.wav", offset=1.0, duration=1.0))
    inside = x.copy()
    inside[int(1.5 * sr)] = np.nan
    sf.write(str(tmp_path / "inside.wav"), inside, sr, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"1 non-finite samples \(NaN or inf\), first at 1\.500 s"):
        load_audio(tmp_path / "inside.wav", offset=1.0, duration=1.0)


def test_a_segment_past_the_end_of_a_file_only_ffmpeg_reads_is_said(tmp_path, caplog):
    """A WAV segment past its file's end warned ('runs past the end'), an m4a's was quietly shorter: now both
    warn, naming where the audio ends."""
    _needs_ffmpeg()
    wav = write_audio(tmp_path / "tone.wav", make_tone(440, 2.0))
    m4a = tmp_path / "tone.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    for path in (wav, m4a):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
            y = load_audio(path, offset=1.0, duration=3.0)
        assert y.shape[0] == pytest.approx(16000, abs=1000), path  # (AAC pads its last frame)
        said = [
            r.getMessage() for r in caplog.records if "runs past the end of the audio (2." in r.getMessage()
        ]
        assert len(said) == 1, (path, caplog.text)
    caplog.clear()  # a segment within the file says nothing
    with caplog.at_level(logging.WARNING, logger="musicflamingo.audio.io"):
        load_audio(m4a, offset=0.5, duration=1.0)
    assert not caplog.records, caplog.text

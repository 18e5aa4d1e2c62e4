"""infer.py / musicflamingo.inference: batch captions end to end, streaming text, errors, and the cached chat."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from tiny_assets import TINY_IDS, make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import MusicFlamingo, MusicFlamingoProcessor
from musicflamingo.checkpoint import stop_token_ids
from musicflamingo.engine import SamplingParams
from musicflamingo.inference import (
    DEFAULT_PROMPT,
    USER_ERRORS,
    ChatSession,
    InferenceError,
    infer,
    sampling_params,
)
from musicflamingo.model.layers import KVCache
from musicflamingo.reasoning import parse_think
from musicflamingo.runtime import RuntimeConfigError
from musicflamingo.tokenizer import IncrementalDecoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def audios(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("audio")
    return [
        write_audio(d / "tone_a.wav", make_tone(440, 1.0)),
        write_audio(d / "tone_b.flac", make_tone(220, 1.7)),
    ]


@pytest.fixture(scope="module")
def loaded(ckpt):
    return MusicFlamingo.from_pretrained(
        ckpt, dtype=torch.float32, device="cpu"
    ), MusicFlamingoProcessor.from_pretrained(ckpt)


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("infer", overrides=["device=cpu", *overrides])


def user(text, audio=None):
    return [
        {
            "role": "user",
            "content": ([{"type": "audio", "path": str(audio)}] if audio else [])
            + [{"type": "text", "text": text}],
        }
    ]


# ------------------------------------------------------------------------------------------------ batch
def test_infer_two_files_end_to_end(ckpt, audios, loaded, capsys):
    cfg = make_cfg(f"ckpt={ckpt}", f"audio=[{audios[0]},{audios[1]}]", "max_new_tokens=6")
    texts = infer(cfg)
    out = capsys.readouterr().out
    assert len(texts) == 2 and all(texts)
    for f, t in zip(audios, texts):
        assert f"== {f} ==" in out and t in out
    # Same answers as a plain batched generate on the same inputs.
    model, processor = loaded
    inputs = processor.apply_chat_template([user(DEFAULT_PROMPT, a) for a in audios])
    ids = model.generate(**inputs, max_new_tokens=6)[:, inputs["input_ids"].shape[1] :]
    expected = [
        processor.decode([t for t in row if t not in (TINY_IDS.eos_token_id, TINY_IDS.pad_token_id)])
        for row in ids.tolist()
    ]
    assert texts == expected


def test_infer_quantize_loads_quantized_linears_and_answers(ckpt, audios, capsys, caplog, tmp_path):
    """`quantize=int8|int4`: the model is loaded with quantized linears (logged), answers every file, and its memory
    plan counts their bytes (int4 below int8 below bf16); an unknown method is refused by name before anything is
    loaded."""
    import logging

    from musicflamingo.model.quantize import Int4Linear, Int8Linear
    from musicflamingo.settings import SettingsError

    base = [f"ckpt={ckpt}", f"audio=[{audios[0]},{audios[1]}]", "max_new_tokens=4", "stream=false"]
    for method in ("int8", "int4"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="musicflamingo"):
            texts = infer(make_cfg(*base, f"quantize={method}"))
        assert (
            len(texts) == 2
            and all(texts)
            and f"{method} linears" in caplog.text
            and "bfloat16" in caplog.text
        )
    weights = {}
    for method in ("null", "int8", "int4"):
        infer(make_cfg(*base, "plan=true", f"quantize={method}"))
        out = capsys.readouterr().out
        weights[method] = next(line for line in out.splitlines() if line.strip().startswith("weights"))
    assert len(set(weights.values())) == 3, weights  # the weights row differs per method
    with pytest.raises(SettingsError, match="quantize"):
        infer(make_cfg(*base, "quantize=int3"))
    from musicflamingo.inference import load_model

    model, _ = load_model(ckpt, "cpu", "auto", "int8")
    assert any(isinstance(m, Int8Linear) for m in model.modules()) and model.dtype == torch.bfloat16
    model, _ = load_model(ckpt, "cpu", "auto", "int4")
    assert any(isinstance(m, Int4Linear) for m in model.modules()) and model.dtype == torch.bfloat16


def test_infer_compile_gives_the_same_text(ckpt, audios, capsys):
    """`compile=true` decodes through torch.compile (static KV cache) and prints the same answers."""
    from torch._dynamo.utils import counters

    base = [f"ckpt={ckpt}", f"audio=[{audios[0]},{audios[1]}]", "max_new_tokens=6", "stream=false"]
    eager = infer(make_cfg(*base))
    graphs = counters["stats"]["unique_graphs"]
    compiled = infer(make_cfg(*base, "compile=true"))
    assert counters["stats"]["unique_graphs"] > graphs
    assert compiled == eager and all(compiled)
    capsys.readouterr()


def test_prompt_per_file_sampling_is_seeded(ckpt, audios, capsys):
    base = [
        f"ckpt={ckpt}",
        f"audio=[{audios[0]},{audios[1]}]",
        "prompt=[What key?,What tempo?]",
        "max_new_tokens=5",
    ]
    sampled = [infer(make_cfg(*base, "do_sample=true", "seed=3", "top_k=50", "top_p=0.9")) for _ in range(2)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 2
    one_by_one = infer(make_cfg(*base, "batch_size=1", "stream=false"))
    assert len(one_by_one) == 2
    with pytest.raises(InferenceError, match="3 prompts for 2 audio files"):
        infer(make_cfg(*base[:2], "prompt=[a,b,c]"))
    capsys.readouterr()


def test_incremental_decoder_keeps_multibyte_characters(loaded):
    tok = loaded[1].tokenizer
    text = "Café ♪ 音楽 — naïve 🎸 tempo 128 BPM"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 2  # characters split over several byte-level tokens
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


# ------------------------------------------------------------------------------------------------ errors
def _copy_without(src: Path, dst: Path, drop: str) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.name != drop:
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_bad_checkpoint_and_audio_messages(ckpt, audios, tmp_path):
    wrong = _copy_without(ckpt, tmp_path / "wrong", "config.json")
    cfg_json = json.loads((ckpt / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg_json, "model_type": "whisper"}))
    cases = {
        "ckpt is not set": None,
        "is not a folder": tmp_path / "missing",
        "no config.json": _copy_without(ckpt, tmp_path / "noconfig", "config.json"),
        "model_type='whisper'": wrong,
        "no tokenizer": _copy_without(ckpt, tmp_path / "notok", "tokenizer.json"),
    }
    for message, path in cases.items():
        with pytest.raises(USER_ERRORS, match=message):
            infer({"ckpt": None if path is None else str(path), "audio": str(audios[0]), "device": "cpu"})
    with pytest.raises(USER_ERRORS, match="nope.wav: audio file not found"):
        infer({"ckpt": str(ckpt), "audio": [str(audios[0]), str(tmp_path / "nope.wav")]})
    with pytest.raises(InferenceError, match="top_p"):
        sampling_params({"top_p": 0.0})


def test_infer_refuses_weights_larger_than_memory_before_loading(ckpt, audios, monkeypatch):
    """The entry point runs `runtime.resolve_device_dtype`'s memory check (tested in test_runtime.py) before
    loading: the tiny checkpoint against 1 kB of memory."""
    import musicflamingo.runtime as runtime

    monkeypatch.setattr(runtime, "available_memory", lambda device: 1000)
    with pytest.raises(RuntimeConfigError, match="the model's weights need"):
        infer({"ckpt": str(ckpt), "audio": str(audios[0]), "device": "cpu", "stream": False})


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), f"ckpt={tmp_path / 'no_such_ckpt'}", "audio=x.wav"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ckpt=") and lines[0].endswith(
        "no_such_ckpt is not a folder (expected a checkpoint folder with config.json)"
    )
    assert list(tmp_path.iterdir()) == []  # Hydra made no run folder


@pytest.mark.slow
def test_cli_batch_and_chat(ckpt, audios, tmp_path):
    """The real command line: two files batched, then a chat fed through stdin."""
    cmd = [sys.executable, str(ROOT / "infer.py"), f"ckpt={ckpt}", "device=cpu", "max_new_tokens=5"]
    batch = subprocess.run(
        [*cmd, f"audio=[{audios[0]},{audios[1]}]"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert batch.returncode == 0, batch.stderr
    assert all(f"== {a} ==" in batch.stdout for a in audios)
    chat = subprocess.run(
        [*cmd, f"audio={audios[0]}", "interactive=true"],
        input="What key?\nAnd the tempo?\n",
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("assistant> ") == 2
    assert list(tmp_path.iterdir()) == []


def test_chat_survives_a_line_of_invalid_utf8(ckpt, audios, tmp_path):
    """A line of bytes that are not UTF-8 on stdin is refused as one error; the conversation goes on."""
    cmd = [sys.executable, str(ROOT / "infer.py"), f"ckpt={ckpt}", "device=cpu", "max_new_tokens=3"]
    chat = subprocess.run(
        [*cmd, f"audio={audios[0]}", "interactive=true"],
        input=b"What key?\n\xff\xfe tempo?\nAnd the metre?\n",
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    out = chat.stdout.decode("utf-8", "replace")
    assert chat.returncode == 0, chat.stderr.decode()
    assert out.count("error:") == 1 and out.count("assistant> ") == 3


# ------------------------------------------------------------------------------------------------ chat
def _count_encodes(monkeypatch, model) -> list[int]:
    calls = [0]
    original = model.encode_audio

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode_audio", counting)
    return calls


@pytest.mark.parametrize("case", ["cut_by_max_new_tokens", "stop_token", "audio_in_turn_2"])
def test_chat_cache_matches_full_recompute(case, loaded, ckpt, audios, monkeypatch):
    """Turn 2 with the continued cache == greedy generate over the whole 2-turn conversation from scratch."""
    model, processor = loaded
    stops = stop_token_ids(ckpt, model.config)
    first = processor.apply_chat_template([user("What key is it in?", audios[1])])
    session = ChatSession(model, processor, SamplingParams(max_new_tokens=6, stop_ids=stops))
    if case == "stop_token":  # end turn 1 on the token greedy decoding emits 3rd, treated as end of turn
        probe = model.generate(**first, max_new_tokens=3, stop_token_ids=[])[0, -1].item()
        session.stops = [probe]
        session.end_of_turn_id = probe
    calls = _count_encodes(monkeypatch, model)

    a1 = session.ask("What key is it in?", audio=str(audios[1]))
    gen1 = list(session.last_new_ids)
    audio2 = str(audios[0]) if case == "audio_in_turn_2" else None
    a2 = session.ask("And the tempo?", audio=audio2)
    assert calls[0] == (2 if audio2 else 1)  # each audio is encoded once, in the turn that brings it

    # The history is the chat template over the whole conversation, the first answer's own tokens included.
    closing = [] if gen1[-1] == session.end_of_turn_id else [TINY_IDS.eos_token_id]
    turn2 = processor(
        "\n<|im_start|>user\n"
        + ("<sound>" if audio2 else "")
        + "And the tempo?<|im_end|>\n<|im_start|>assistant\n",
        audio=[audio2] if audio2 else None,
    )
    prompt2 = first["input_ids"][0].tolist() + gen1 + closing + turn2["input_ids"][0].tolist()
    assert session.history_ids == prompt2 + session.last_new_ids
    if case == "stop_token":
        assert gen1[-1] == session.end_of_turn_id and closing == []
    else:
        assert len(gen1) == 6 and closing == [TINY_IDS.eos_token_id]

    feats, mask = first["input_features"], first["input_features_mask"]
    if audio2:  # from scratch, both audios go through the encoder together
        feats = torch.cat([feats, turn2["input_features"]])
        mask = torch.cat([mask, turn2["input_features_mask"]])
    n = calls[0]
    full = model.generate(
        torch.tensor([prompt2]),
        input_features=feats,
        input_features_mask=mask,
        max_new_tokens=6,
        stop_token_ids=session.stops,
    )
    assert full[0, len(prompt2) :].tolist() == session.last_new_ids
    assert calls[0] == n + 1  # the from-scratch run encodes the audio again

    # The cache itself (keys carry their RoPE positions) equals one uncached pass over the whole history.
    L = len(session.ids)
    cache = session.engine.cache
    assert cache.lengths == [L] and session.history_ids[:L] == session.ids
    ref = KVCache.for_config(model.config.text, 1, L, model.dtype, "cpu")
    with torch.inference_mode():
        view = ref.view_prefill(0, L)
        model(torch.tensor([session.ids]), input_features=feats, input_features_mask=mask, cache=view)
    torch.testing.assert_close(cache.keys[:, :, :, :L], ref.keys[:, :, :, :L], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.values[:, :, :, :L], ref.values[:, :, :, :L], atol=1e-5, rtol=1e-5)
    assert a1 == processor.decode([t for t in gen1 if t not in session.stops]) and isinstance(a2, str)


def test_chat_turn_ending_on_another_stop_id_keeps_the_rendered_history(loaded, audios):
    """A turn that stops on a stop id other than <|im_end|> (a checkpoint's <|endoftext|>) is closed as the
    template closes it: the next turn's cached prompt is the from-scratch render (it held both ids)."""
    model, proc = loaded
    first = user("What key is it in?", audios[0])
    probe = model.generate(**proc.apply_chat_template([first]), max_new_tokens=3, stop_token_ids=[])[
        0, -1
    ].item()
    assert probe != TINY_IDS.eos_token_id
    session = ChatSession(
        model, proc, SamplingParams(max_new_tokens=6, stop_ids=(TINY_IDS.eos_token_id, probe))
    )
    answer = session.ask("What key is it in?", audio=str(audios[0]))
    assert session.last_new_ids[-1] == probe  # it stopped on the other id
    session.ask("And the tempo?")
    conversation = first[0:1] + [{"role": "assistant", "content": answer}] + user("And the tempo?")
    scratch = proc.apply_chat_template([conversation])["input_ids"][0].tolist()
    cached = session.history_ids[: len(session.history_ids) - len(session.last_new_ids)]
    assert cached == scratch


def test_interactive_prompt_then_typed_lines_answers_as_it_reads(ckpt, audios):
    """`prompt=` and typed lines: each line is read after the answer before it (stdin was drained first, so a
    person at a terminal saw nothing until end of input)."""
    out = io.StringIO()

    def typed():
        for q in ("And the tempo?", "Which instruments?"):
            out.write(f"[typed] {q}\n")
            yield q

    cfg = make_cfg(
        f"ckpt={ckpt}", f"audio={audios[0]}", "interactive=true", "max_new_tokens=2", "prompt=What key?"
    )
    infer(cfg, lines=typed(), out=out)
    events = [x.split(" ")[0] for x in out.getvalue().splitlines() if x.startswith(("[typed]", "assistant>"))]
    assert events == ["assistant>", "[typed]", "assistant>", "[typed]", "assistant>"]


def test_interactive_infer_reads_lines(ckpt, audios, monkeypatch):
    calls = [0]
    original = MusicFlamingo.encode_audio

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MusicFlamingo, "encode_audio", counting)
    out = io.StringIO()
    cfg = make_cfg(f"ckpt={ckpt}", f"audio={audios[0]}", "interactive=true", "max_new_tokens=4")
    lines = [
        "What key?",
        "",
        "And the tempo?",
        "/audio /no/such.wav",
        "/reset",
        "What key?",
        "/quit",
        "never read",
    ]
    answers = infer(cfg, lines=lines, out=out)
    text = out.getvalue()
    assert len(answers) == 3 and text.count("assistant> ") == 3
    assert calls[0] == 2  # once per conversation, not per turn
    assert answers[2] == answers[0]  # /reset starts the same conversation again (greedy)
    assert "error: /no/such.wav: audio file not found" in text and "(new conversation)" in text


# ------------------------------------------------------------------------------------------------ review fixes
def test_zero_token_tail_is_cut_in_batch_and_chat(ckpt, tmp_path):
    """30 s + 1..320 samples (every GTZAN clip: 661794 samples at 22.05 kHz) ended in a window of 0 audio tokens:
    an IndexError in RoTE, exit 1, the chat ended. The tail is cut (as training does): the answer is the trimmed
    file's, and the chat goes on."""
    tone = make_tone(440, 30.0)
    tailed = write_audio(tmp_path / "gtzan_like.wav", np.concatenate([tone, tone[:200]]))
    trimmed = write_audio(tmp_path / "trimmed.wav", tone)
    base = [f"ckpt={ckpt}", "max_new_tokens=3", "stream=false"]
    assert infer(make_cfg(*base, f"audio={tailed}")) == infer(make_cfg(*base, f"audio={trimmed}"))
    out = io.StringIO()
    answers = infer(
        make_cfg(*base, f"audio={tailed}", "interactive=true"), lines=["Genre?", "Tempo?"], out=out
    )
    assert len(answers) == 2 and "error" not in out.getvalue()


def test_broken_pipe_exits_quietly(tmp_path):
    """`infer.py ... | head -c 50`: the reader leaves; exit 141 (128 + SIGPIPE) without a traceback."""
    code = "from musicflamingo.cli import run_cli\nrun_cli(lambda: [print('answer ' * 999) for _ in range(10**4)])"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.read(50)
    proc.stdout.close()
    assert proc.wait(timeout=60) == 141 and proc.stderr.read() == b""


def _chat(ckpt, lines, *overrides):
    out = io.StringIO()
    cfg = make_cfg(f"ckpt={ckpt}", "interactive=true", "max_new_tokens=2", *overrides)
    return infer(cfg, lines=lines, out=out), out.getvalue()


def test_chat_drops_an_attachment_that_fails(ckpt, audios, tmp_path):
    """A file that cannot be decoded is reported once and not kept: the next question is answered, also after
    /reset when it was the initial audio=. /audio takes the quoted or backslash-escaped path a drag and drop pastes."""
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    answers, text = _chat(ckpt, ["/audio " + str(bad), "Key?", "Tempo?"])
    assert len(answers) == 1 and text.count("error:") == 1 and "is not attached" in text
    answers, text = _chat(ckpt, ["Key?", "Tempo?", "/reset", "Key?"], f"audio={bad}")
    assert len(answers) == 2 and text.count("error:") == 1
    spaced = write_audio(tmp_path / "my song.wav", make_tone(330, 0.5))
    escaped = str(spaced).replace(" ", "\\ ")
    answers, text = _chat(ckpt, [f"/audio '{spaced}'", "Key?", f"/audio {escaped}", "Tempo?"])
    assert len(answers) == 2 and "error" not in text and text.count(f"(attached {spaced} ") == 2


def test_header_waits_for_the_audio_and_skip_bad_audio(ckpt, audios, tmp_path):
    """batch_size=1, streaming: a file's header is printed once its audio is read, not before its decode fails.
    skip_bad_audio=true: the file is reported in turn and skipped (answer None), the batch goes on."""
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    base = [f"ckpt={ckpt}", f"audio=[{audios[0]},{nan},{audios[1]}]", "batch_size=1", "max_new_tokens=2"]
    out = io.StringIO()
    with pytest.raises(USER_ERRORS, match="nan.wav: audio has 8000 non-finite samples"):
        infer(make_cfg(*base), out=out)
    assert f"== {audios[0]} ==" in out.getvalue() and "nan.wav" not in out.getvalue()
    out = io.StringIO()
    answers = infer(
        make_cfg(*base, "skip_bad_audio=true", f"audio=[{audios[0]},{nan},{tmp_path / 'gone.wav'}]"), out=out
    )
    assert answers[0] and answers[1:] == [None, None]
    assert (
        f"== {nan} == [2/3]\n(skipped: {nan}: audio has" in out.getvalue()
        and "gone.wav: audio file not found" in out.getvalue()
    )


def test_hydra_unreadable_values_get_a_quoting_hint(capsys):
    """café.flac, it's.flac, `[Remix]`, x=y, a,b: Hydra's lexer refuses them; the entry point says how to quote, and
    the quoted form it prints is read back by Hydra as the value typed."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from musicflamingo.cli import check_overrides

    check_overrides(["audio=a.flac", "prompt=What is the key?", "--cfg", "job", "-m", "audio=a,b.flac"])
    for arg in [
        "audio=café.flac",
        "audio=it's.flac",
        "audio=Song (feat. X) [Remix].flac",
        "audio=x=y.flac",
        "audio=a,b.flac",
        "prompt=What's the key?",
        "audio=~/a.flac",
    ]:
        with pytest.raises(SystemExit) as e:
            check_overrides(["max_new_tokens=3", arg])
        assert e.value.code == 2
        hint = capsys.readouterr().err.splitlines()[-1].split("shell quotes: ", 1)[1]
        (word,) = shlex.split(hint)
        assert OverridesParser.create().parse_overrides([word])[0].value() == arg.split("=", 1)[1]


def test_cli_reads_quoted_music_file_names(ckpt, tmp_path):
    """The README's quoting, through the real command line."""
    names = ["café.flac", "Artist - Song (feat. X) [Remix].flac", "x=y.flac", "a,b.flac"]
    for n in names:
        write_audio(tmp_path / n, make_tone(440, 0.3))
    quoted = ",".join(f'"{tmp_path / n}"' for n in names)
    cmd = [sys.executable, str(ROOT / "infer.py"), f"ckpt={ckpt}", "device=cpu", "max_new_tokens=2"]
    proc = subprocess.run(
        [*cmd, f"audio=[{quoted}]", 'prompt="What\'s the key?"'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert all(f"== {tmp_path / n} ==" in proc.stdout for n in names)


def test_numbers_and_booleans_are_text_mappings_refused(ckpt, audios):
    base = [f"ckpt={ckpt}", f"audio={audios[0]}", "max_new_tokens=2", "stream=false"]
    assert infer(make_cfg(*base, "prompt=2024")) == infer(make_cfg(*base, "prompt='2024'"))
    assert infer(make_cfg(*base, "prompt=true", "system_prompt=1"))
    with pytest.raises(InferenceError, match=r"prompt=\{'a': 1\}: expected text or a list of texts"):
        infer(make_cfg(*base, "prompt={a:1}"))
    with pytest.raises(USER_ERRORS, match="123: audio file not found"):
        infer(make_cfg(*base, "audio=123"))


def test_seeded_samples_of_one_song_differ_whatever_the_batch(ckpt, audios):
    """audio=[s,s,s] do_sample=true seed=0: three different answers (each input samples from (seed, its index)),
    the same with batch_size=1; the first is the one-file run's."""
    s = audios[0]
    base = [f"ckpt={ckpt}", "max_new_tokens=8", "do_sample=true", "seed=0", "stream=false"]
    three = infer(make_cfg(*base, f"audio=[{s},{s},{s}]"))
    assert len(set(three)) == 3
    assert infer(make_cfg(*base, f"audio=[{s},{s},{s}]", "batch_size=1")) == three
    assert infer(make_cfg(*base, f"audio={s}")) == three[:1]


def test_output_jsonl_appends_and_resumes(ckpt, audios, tmp_path, monkeypatch):
    """output=FILE: one JSON object per input, written as each answer is done; a rerun asks only what the file
    lacks (a last line cut by a crash is redone), and returns every answer in input order."""
    from musicflamingo import inference

    asked = []
    original = inference.generate_answers

    def spy(model, processor, convs, labels, *args, **kwargs):
        asked.extend(labels)
        return original(model, processor, convs, labels, *args, **kwargs)

    monkeypatch.setattr(inference, "generate_answers", spy)
    a, b = (str(x) for x in audios)
    path = tmp_path / "runs" / "answers.jsonl"
    base = [f"ckpt={ckpt}", "max_new_tokens=3", "stream=false", f"output={path}"]
    first = infer(make_cfg(*base, f"audio=[{a},{b}]"))
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted((r["audio"], r["prompt"], r["answer"]) for r in rows) == sorted(
        [(a, DEFAULT_PROMPT, first[0]), (b, DEFAULT_PROMPT, first[1])]
    )
    path.write_text(path.read_text() + '{"audio": "' + a[:5])  # a crash mid-write
    asked.clear()
    again = infer(make_cfg(*base, f"audio=[{a},{b},{a}]"))
    assert asked == [a] and again[:2] == first and len(path.read_text().splitlines()) == 3
    assert infer(make_cfg(*base, f"audio=[{a},{b},{a}]")) == again and asked == [a]  # nothing left to ask
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"id": 1}\n')
    with pytest.raises(
        InferenceError, match="notes.jsonl:1: expected a JSON object with audio, prompt and answer"
    ):
        infer(make_cfg(*base[:-1], f"output={foreign}", f"audio={a}"))
    assert foreign.read_text() == '{"id": 1}\n'
    think = tmp_path / "think.jsonl"  # think mode: the reasoning and the answer apart, and the whole text
    (text,) = infer(make_cfg(*base[:-1], f"output={think}", f"audio={a}", "think=true"))
    row = json.loads(think.read_text())
    assert row["text"] == text and row["answer"] == parse_think(text).answer and "thinking" in row


def test_audio_folder_or_pattern(ckpt, audios, tmp_path):
    d = tmp_path / "music"
    for n in ["b.flac", "a.wav", ".hidden.wav", "notes.txt"]:
        (d / n).parent.mkdir(exist_ok=True)
        if n.endswith(".txt"):
            (d / n).write_text("x")
        else:
            write_audio(d / n, make_tone(440, 0.3))
    out = io.StringIO()
    base = [f"ckpt={ckpt}", "max_new_tokens=2", "stream=false"]
    assert len(infer(make_cfg(*base, f"audio={d}"), out=out)) == 2
    assert out.getvalue().index(f"== {d / 'a.wav'} ==") < out.getvalue().index(f"== {d / 'b.flac'} ==")
    out = io.StringIO()
    assert (
        len(infer(make_cfg(*base, f"audio={tmp_path}/**/*.flac"), out=out)) == 1
        and "b.flac" in out.getvalue()
    )
    with pytest.raises(USER_ERRORS, match=r"\*.mp3: no file matches this pattern"):
        infer(make_cfg(*base, f"audio={d}/*.mp3"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(USER_ERRORS, match="empty: folder holds no audio files"):
        infer(make_cfg(*base, f"audio={tmp_path / 'empty'}"))


def test_max_new_tokens_past_the_context_window_is_refused(ckpt, audios):
    with pytest.raises(
        InferenceError, match=r"max_new_tokens=100000000 is more than the model's context window, 32768"
    ):
        infer(make_cfg(f"ckpt={ckpt}", f"audio={audios[0]}", "max_new_tokens=100000000", "plan=true"))


def test_answers_ending_at_the_token_limit_are_named(loaded, audios, caplog):
    """An answer that stops at `max_new_tokens` (no end token) may be cut mid-sentence: the files are named in a
    warning; an answer ending at a stop id is not."""
    import logging

    from musicflamingo.inference import generate_answers

    model, processor = loaded
    convs = [user(DEFAULT_PROMPT, a) for a in audios]
    labels = [a.name for a in audios]
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        texts = generate_answers(model, processor, convs, labels, SamplingParams(max_new_tokens=3))
    assert len(texts) == 2 and "2 of 2 answers ended at the token limit" in caplog.text
    assert all(a.name in caplog.text for a in audios)
    # stop at the first token each answer produced: both end at a stop id, so nothing is said
    ids = model.generate(**processor.apply_chat_template(convs), max_new_tokens=1)[:, -1].tolist()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        generate_answers(
            model, processor, convs, labels, SamplingParams(max_new_tokens=3, stop_ids=tuple(ids))
        )
    assert "token limit" not in caplog.text


def test_max_new_tokens_null_is_the_checkpoints_generation_config_value(ckpt, tmp_path):
    """The release's generation_config.json says 2048 (what the reference's generate uses); `max_new_tokens: null`
    took 1024 whatever the file said. Without the value: 1024; either way at most the context window."""
    import shutil

    from musicflamingo.inference import _decoding

    window = json.loads((ckpt / "config.json").read_text())["text_config"]["max_position_embeddings"]
    assert _decoding({"max_new_tokens": None}, ckpt)["max_new_tokens"] == min(1024, window)
    copy = Path(shutil.copytree(ckpt, tmp_path / "ck"))
    gen = json.loads((copy / "generation_config.json").read_text())
    for value, want in ((7, 7), (10**6, window)):
        (copy / "generation_config.json").write_text(json.dumps({**gen, "max_new_tokens": value}))
        assert _decoding({"max_new_tokens": None}, copy)["max_new_tokens"] == want
        assert _decoding({"max_new_tokens": 5}, copy)["max_new_tokens"] == 5  # a given value wins

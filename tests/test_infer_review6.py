"""infer.py journey, review 6: checkpoint folder variants, system prompts, resumable output, decoding settings."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_assets import (
    PROCESSOR_CHAT_TEMPLATE,
    SYSTEM_PROMPT,
    make_tone,
    write_audio,
    write_reference_processor,
)
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import MusicFlamingo, MusicFlamingoProcessor
from musicflamingo.chat import conversation
from musicflamingo.cli import user_error_line
from musicflamingo.engine import SamplingParams
from musicflamingo.inference import ChatSession, InferenceError, infer

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = "You are a DJ. Answer in one line."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def song(tmp_path_factory) -> str:
    return str(write_audio(tmp_path_factory.mktemp("audio") / "song.wav", make_tone(440, 1.0)))


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("ref_proc")
    write_reference_processor(d)
    return d


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("infer", overrides=["device=cpu", "dtype=float32", "stream=false", *overrides])


def _variant(src: Path, dst: Path, **files: str | bytes) -> Path:
    shutil.copytree(src, dst)
    for name, data in files.items():
        path = dst / name.replace("__", ".")
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    return dst


def _one_tag_a_line(template: str) -> str:
    """The same template laid out for reading: every block tag on a line of its own, indented."""
    lines = template.replace("%}", "%}\n").split("\n")
    return "\n".join("    " + x if x.startswith("{%") else x for x in lines) + "\n"


# ------------------------------------------------------------------------------------------------ chat template
@pytest.mark.parametrize(
    "layout",
    [lambda t: t + "\n", lambda t: t.replace("\n", "\r\n") + "\r\n", _one_tag_a_line],
    ids=["final-newline", "crlf", "one-tag-a-line"],
)
def test_chat_template_jinja_as_an_editor_saves_it_keeps_its_system_prompt(ref_dir, tmp_path, layout, caplog):
    """A chat_template.jinja with a custom system prompt that an editor saved with a final newline (or CRLF, or laid
    out a tag a line) renders the same in transformers (Jinja drops that whitespace); it was taken as a foreign
    template and the built-in system prompt used instead: every answer asked with the wrong system turn."""
    import transformers

    template = layout(PROCESSOR_CHAT_TEMPLATE.replace(SYSTEM_PROMPT, CUSTOM))
    d = _variant(ref_dir, tmp_path / "proc", chat_template__jinja=template)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Key?"}]}]
    expected = transformers.MusicFlamingoProcessor.from_pretrained(str(d)).apply_chat_template(
        conv, tokenize=False, add_generation_prompt=True
    )
    assert CUSTOM in expected
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        ours = MusicFlamingoProcessor.from_pretrained(d)
    assert ours.default_system_prompt == CUSTOM
    assert ours.apply_chat_template(conv, tokenize=False) == expected
    assert not [r for r in caplog.records if "chat template differs" in r.getMessage()]


def test_a_template_that_renders_differently_is_still_foreign(ref_dir, tmp_path, caplog):
    """Whitespace Jinja keeps (a newline inside the text of a turn) is another template: warned, not accepted."""
    template = PROCESSOR_CHAT_TEMPLATE.replace(SYSTEM_PROMPT, CUSTOM).replace(
        "<|im_end|>\n", "<|im_end|>\n\n"
    )
    d = _variant(ref_dir, tmp_path / "proc", chat_template__jinja=template)
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        ours = MusicFlamingoProcessor.from_pretrained(d)
    assert ours.default_system_prompt == SYSTEM_PROMPT
    assert any("chat template differs" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------------ bad files
@pytest.mark.parametrize(
    "name, data, message",
    [
        ("tokenizer_config.json", "[1, 2]", r"tokenizer_config\.json: expected a JSON object, got list"),
        ("tokenizer_config.json", b"\xff\xfe{}", r"tokenizer_config\.json: invalid JSON \(not UTF-8"),
        (
            "tokenizer_config.json",
            '{"eos_token": 5}',
            r"tokenizer_config\.json: eos_token=5: expected a token",
        ),
        ("chat_template.jinja", b"\xff\xfe", r"chat_template\.jinja: not UTF-8 text"),
    ],
)
def test_unreadable_tokenizer_files_are_one_line_errors_naming_the_file(
    ckpt, tmp_path, song, name, data, message
):
    """These were a bare TypeError / UnicodeDecodeError traceback from inside the loader, naming no file."""
    d = _variant(ckpt, tmp_path / "ckpt", **{name.replace(".", "__"): data})
    with pytest.raises(ValueError, match=message) as e:
        infer(make_cfg(f"ckpt={d}", f"audio={song}", "max_new_tokens=2"))
    line = user_error_line(e.value)  # what infer.py prints (exit 2) instead of a traceback
    assert line is not None and str(d / name) in line


# ------------------------------------------------------------------------------------------------ system prompt
def test_empty_system_prompt_is_an_empty_system_turn_as_the_reference(ref_dir, ckpt, song):
    """system_prompt="" (system_prompt= on the command line) asked with the default system prompt instead of
    none; the reference renders a system message of "" as an empty system turn."""
    import transformers

    ref = transformers.MusicFlamingoProcessor.from_pretrained(str(ref_dir))
    ours = MusicFlamingoProcessor.from_pretrained(ref_dir)
    conv = conversation("Key?", None, "")
    expected = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert expected.startswith("<|im_start|>system\n<|im_end|>\n")
    assert ours.apply_chat_template(conv, tokenize=False) == expected
    assert SYSTEM_PROMPT in ours.apply_chat_template(conversation("Key?", None, None), tokenize=False)

    model = MusicFlamingo.from_pretrained(ckpt, dtype=torch.float32, device="cpu")
    session = ChatSession(model, MusicFlamingoProcessor.from_pretrained(ckpt), system_prompt="")
    session.params = SamplingParams(max_new_tokens=2, stop_ids=session.stops)
    session.ask("Key?")
    text = session.processor.tokenizer.decode(session.history_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nKey?")


# ------------------------------------------------------------------------------------------------ output=
def test_output_rerun_reuses_only_answers_asked_the_same_way(ckpt, song, tmp_path, monkeypatch):
    """A rerun with think=true (or another system_prompt) on the same output file returned the earlier plain answers
    as if they were its own, asking nothing: no reasoning, another question's answers. Now those rows are kept and
    the input asked again; a rerun with the same settings still resumes."""
    from musicflamingo import inference

    asked = []
    original = inference.generate_answers

    def spy(model, processor, convs, labels, *args, **kwargs):
        asked.append(json.dumps(convs))
        return original(model, processor, convs, labels, *args, **kwargs)

    monkeypatch.setattr(inference, "generate_answers", spy)
    path = tmp_path / "answers.jsonl"
    base = [f"ckpt={ckpt}", f"audio={song}", "max_new_tokens=3", f"output={path}"]
    (plain,) = infer(make_cfg(*base))
    (thought,) = infer(make_cfg(*base, "think=true"))
    assert len(asked) == 2 and "<think>" in asked[1]  # asked again, with the think suffix
    (brief,) = infer(make_cfg(*base, "system_prompt=Be brief."))
    assert len(asked) == 3 and "Be brief." in asked[2]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 3 and [("thinking" in r, r.get("system_prompt")) for r in rows] == [
        (False, None),
        (True, None),
        (False, "Be brief."),
    ]
    # each setting resumes from its own rows, and nothing is asked again
    assert infer(make_cfg(*base)) == [plain]
    assert infer(make_cfg(*base, "think=true")) == [thought]
    assert infer(make_cfg(*base, "system_prompt=Be brief.")) == [brief]
    assert len(asked) == 3 and len(path.read_text().splitlines()) == 3


def test_unwritable_output_is_refused_before_the_model_loads(ckpt, song, tmp_path, monkeypatch):
    """An output= path that cannot be opened (here a link into a folder that does not exist) failed only when the
    first answer was done, after loading the model, and that answer was lost with a bare OSError line."""
    from musicflamingo import inference

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before output= was checked")

    monkeypatch.setattr(inference, "load_model", no_load)
    link = tmp_path / "answers.jsonl"
    link.symlink_to(tmp_path / "gone" / "answers.jsonl")
    with pytest.raises(InferenceError, match=r"output=.*answers\.jsonl: cannot write there"):
        infer(make_cfg(f"ckpt={ckpt}", f"audio={song}", "max_new_tokens=2", f"output={link}"))


# ------------------------------------------------------------------------------------------------ decoding
def test_sampling_settings_without_do_sample_are_named(ckpt, song, caplog):
    """temperature/top_p/top_k without do_sample=true were silently unused (greedy answers taken for samples)."""
    base = [f"ckpt={ckpt}", f"audio={song}", "max_new_tokens=2", "plan=true"]
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        infer(make_cfg(*base, "temperature=0.7", "top_p=0.9"))
    msgs = [r.getMessage() for r in caplog.records if "used only when sampling" in r.getMessage()]
    assert msgs and "temperature=0.7 top_p=0.9" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        infer(make_cfg(*base, "do_sample=true", "temperature=0.7", "top_p=0.9"))
        infer(make_cfg(*base))
    assert not [r for r in caplog.records if "used only when sampling" in r.getMessage()]

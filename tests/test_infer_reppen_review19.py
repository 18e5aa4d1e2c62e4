"""Review round 19: infer.py's `repetition_penalty` (the engine applies it as the reference's generate() since e66c81d).

infer.py had no such setting (`repetition_penalty=1.3` was an unknown key), and a checkpoint whose
generation_config.json set one was warned about as a field "infer.py does not implement". It is a decoding setting
now (`configs/infer.yaml`, 1 = off, greedy or sampled), an `output=` row names the penalty it was decoded under and
is reused only under the same one (a row without it: 1), and the file's penalty is named as one infer.py's own
setting replaces, as the file's do_sample/temperature are.
"""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
import torch
from test_infer import audios, ckpt, loaded, make_cfg, user  # noqa: F401
from test_infer2_review17 import once  # noqa: F401
from tiny_assets import TINY_IDS

from musicflamingo import MusicFlamingo, MusicFlamingoProcessor, inference
from musicflamingo.inference import DEFAULT_PROMPT, InferenceError, infer


def _generated(model, processor, files, **kwargs) -> list[str]:
    """`generate`'s answers to the default prompt about `files`, as infer.py decodes them (stop and pad ids left out)."""
    inputs = processor.apply_chat_template([user(DEFAULT_PROMPT, f) for f in files])
    ids = model.generate(**inputs, max_new_tokens=8, **kwargs)[:, inputs["input_ids"].shape[1] :]
    drop = (TINY_IDS.eos_token_id, TINY_IDS.pad_token_id)
    return [processor.decode([t for t in row if t not in drop]) for row in ids.tolist()]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_infer_with_a_penalty_equals_generate_with_it(ckpt, audios, loaded, once):  # noqa: F811
    model, processor = loaded
    base = [f"ckpt={ckpt}", f"audio=[{audios[0]},{audios[1]}]", "max_new_tokens=8", "stream=false"]
    penalized = infer(make_cfg(*base, "repetition_penalty=1.5"), out=io.StringIO())
    assert penalized == _generated(model, processor, audios, repetition_penalty=1.5)
    # the penalty changes these answers: the comparison above is not the unpenalized one twice
    plain = infer(make_cfg(*base), out=io.StringIO())
    assert plain == _generated(model, processor, audios) and plain != penalized


def test_a_resume_under_another_penalty_asks_again(ckpt, audios, once, tmp_path):  # noqa: F811
    out = tmp_path / "caps.jsonl"
    base = [f"ckpt={ckpt}", f"audio={audios[0]}", "max_new_tokens=8", "stream=false", f"output={out}"]
    penalized = infer(make_cfg(*base, "repetition_penalty=1.5"), out=io.StringIO())
    assert _rows(out)[0]["repetition_penalty"] == 1.5
    # the same penalty: already answered
    assert infer(make_cfg(*base, "repetition_penalty=1.5"), out=io.StringIO()) == penalized
    assert len(_rows(out)) == 1
    # no penalty: asked again (was handed the penalized answer), and its row names none
    plain = infer(make_cfg(*base), out=io.StringIO())
    assert plain != penalized and len(_rows(out)) == 2 and "repetition_penalty" not in _rows(out)[1]
    assert infer(make_cfg(*base), out=io.StringIO()) == plain
    # another penalty, sampled or not, is another question
    infer(make_cfg(*base, "repetition_penalty=1.2"), out=io.StringIO())
    infer(make_cfg(*base, "repetition_penalty=1.5", "do_sample=true", "seed=0"), out=io.StringIO())
    assert [r.get("repetition_penalty") for r in _rows(out)] == [1.5, None, 1.2, 1.5]
    assert _rows(out)[3]["do_sample"] is True


def test_rows_written_before_the_field_were_decoded_without_a_penalty(ckpt, audios, once, tmp_path):  # noqa: F811
    out = tmp_path / "caps.jsonl"
    base = [f"ckpt={ckpt}", f"audio={audios[0]}", "max_new_tokens=8", "stream=false", f"output={out}"]
    out.write_text(
        json.dumps({"audio": str(audios[0]), "prompt": DEFAULT_PROMPT, "answer": "an old caption"}) + "\n"
    )
    assert infer(make_cfg(*base), out=io.StringIO()) == ["an old caption"]
    assert infer(make_cfg(*base, "repetition_penalty=1.0"), out=io.StringIO()) == ["an old caption"]
    assert infer(make_cfg(*base, "repetition_penalty=1.3"), out=io.StringIO()) != ["an old caption"]
    assert len(_rows(out)) == 2


@pytest.mark.parametrize("value", ["0", "-1", "x", "null", "inf", "true"])
def test_a_bad_penalty_is_refused_naming_it_before_the_model_loads(ckpt, audios, monkeypatch, value):  # noqa: F811
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(inference, "load_model", load)
    cfg = make_cfg(f"ckpt={ckpt}", f"audio={audios[0]}", f"repetition_penalty={value}")
    with pytest.raises(InferenceError, match=r"^repetition_penalty must be a number > 0 \(1 = off\), got "):
        infer(cfg, out=io.StringIO())


def test_the_checkpoints_penalty_is_named_as_replaced_not_unimplemented(ckpt, audios, tmp_path, caplog):  # noqa: F811
    """generation_config.json's repetition_penalty was named as a field infer.py does not implement; it is one
    infer.py's own setting replaces now (as do_sample/temperature), and passing it decodes as generate() does."""
    folder = shutil.copytree(ckpt, tmp_path / "ckpt")
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": 1.5}))
    base = [f"ckpt={folder}", f"audio=[{audios[0]},{audios[1]}]", "max_new_tokens=8", "stream=false"]
    with caplog.at_level(logging.WARNING, logger="musicflamingo.inference"):
        plain = infer(make_cfg(*base), out=io.StringIO())
    assert (
        "sets repetition_penalty=1.5: infer.py decodes with its own, repetition_penalty=1.0; pass "
        "repetition_penalty=1.5 to decode as the file says" in caplog.text
    )
    assert "does not implement" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.inference"):
        as_the_file = infer(make_cfg(*base, "repetition_penalty=1.5"), out=io.StringIO())
    assert "repetition_penalty" not in caplog.text
    model = MusicFlamingo.from_pretrained(folder, dtype=torch.float32, device="cpu").eval()
    processor = MusicFlamingoProcessor.from_pretrained(folder)
    assert as_the_file == _generated(model, processor, audios) != plain  # generate() reads the file's

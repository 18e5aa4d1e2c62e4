"""Think answers ended by a `</answer>` stop string, review 16: infer, chat and eval read them as complete.

The engine cuts an answer before its stop string, so with `stop='</answer>'` (or a checkpoint whose
generation_config.json has stop_strings ["</answer>"]) a think answer reads `<think>..</think><answer>..` without
its closing tag. `reasoning.parse_think(text, stop=...)` reads such a text as `ok`; infer.py's display and chat
printed it as "(broken think/answer tags)", and eval.py counted it broken (results.json `think`, per_item.jsonl
`think_status`), as predictions.jsonl did not keep which stop string ended an answer.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from test_infer_review6 import make_cfg
from test_reasoning import _eval_cfg, _mcq_benchmark
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo.engine import Engine, SamplingParams
from musicflamingo.inference import ChatSession, infer, load_model, run_chat

THINKING, ANSWER = "two beats a second", "120 BPM"
SAID = f"<think>{THINKING}</think><answer>{ANSWER}</answer> and more"
CUT = f"<think>{THINKING}</think><answer>{ANSWER}"  # what the engine gives: cut before the stop string


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return str(write_audio(tmp_path_factory.mktemp("audio") / "song.wav", make_tone(440, 1.0)))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt, "cpu", "float32")


@pytest.fixture
def scripted(monkeypatch, loaded):
    """The engine (infer's, chat's and eval's model.generate) picks the tokens of `SAID`, in order, whatever the
    tiny model's logits (its stop strings and stop ids still end the answer as they would)."""
    ids = loaded[1].tokenizer.encode(SAID)
    force_tokens(monkeypatch, ids)
    return ids


def force_tokens(monkeypatch, ids: list[int]) -> None:  # noqa: ANN001
    """The engine picks `ids` in order whatever the tiny model's logits (stop ids and strings still end it)."""
    accept = Engine._accept

    def forced(self, slots, logits):
        one_hot = torch.full_like(logits, -1e4)
        for row, slot in enumerate(slots):
            one_hot[row, ids[min(len(slot.tokens), len(ids) - 1)]] = 0.0
        return accept(self, slots, one_hot)

    monkeypatch.setattr(Engine, "_accept", forced)


def test_infer_shows_a_think_answer_cut_by_its_stop_string_as_complete(ckpt, song, scripted, tmp_path):
    """infer.py think=true stop='</answer>': the answer line said "(broken think/answer tags)"."""
    path = tmp_path / "answers.jsonl"
    printed = io.StringIO()
    base = [f"audio={song}", "prompt=Tempo?", "think=true", "max_new_tokens=60", f"output={path}"]
    got = infer(make_cfg(f"ckpt={ckpt}", *base, "stop='</answer>'"), out=printed)
    assert got == [CUT]
    assert f"answer: {ANSWER}\n" in printed.getvalue() and "broken" not in printed.getvalue()
    (row,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert (row["thinking"], row["answer"], row["text"], row["stop"]) == (
        THINKING,
        ANSWER,
        CUT,
        ["</answer>"],
    )
    # ended by the token limit inside the answer: still broken (the stop string did not end it)
    printed = io.StringIO()
    cut = infer(make_cfg(f"ckpt={ckpt}", *base[:-2], "max_new_tokens=34", "stop='</answer>'"), out=printed)
    assert "</answer>" not in cut[0] and "(broken think/answer tags)" in printed.getvalue()


def test_chat_shows_a_think_answer_cut_by_its_stop_string_as_complete(loaded, scripted):
    model, processor = loaded
    params = SamplingParams(max_new_tokens=60, stop_ids=(299,), stop_strings=("</answer>",))
    out = io.StringIO()
    answers = run_chat(ChatSession(model, processor, params), ["Tempo?"], out=out, think=True)
    assert answers == [CUT]
    assert f"answer: {ANSWER}\n" in out.getvalue() and "broken" not in out.getvalue()


def _predictions(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_eval_think_counts_answers_cut_by_their_stop_string_ok(ckpt, scripted, tmp_path):
    """eval.py think=true stop='</answer>' with a checkpoint: every item was counted broken."""
    _mcq_benchmark(tmp_path)
    cfg = [
        "think=true",
        f"ckpt={ckpt}",
        "device=cpu",
        "dtype=float32",
        "max_new_tokens=60",
        "stop='</answer>'",
    ]
    results = evaluate_cfg(tmp_path, *cfg)
    t = results["think"]
    assert (t["n"], t["ok"], t["broken"]) == (4, 4, 0)
    assert results["tasks"]["mcq"]["accuracy"] == 1.0
    rows = _predictions(tmp_path / "out" / "predictions.jsonl")
    assert [(r["prediction"], r["stop"]) for r in rows] == [(CUT, "</answer>")] * 4
    per_item = _predictions(tmp_path / "out" / "per_item.jsonl")
    assert {r["think_status"] for r in per_item} == {"ok"}
    # a finished run re-reports from the file (no model): the same counts
    assert evaluate_cfg(tmp_path, *cfg)["think"]["ok"] == 4


def evaluate_cfg(root, *overrides):
    from musicflamingo.eval.runner import evaluate

    return evaluate(_eval_cfg(root, *overrides))


def test_eval_resumes_over_predictions_without_the_stop_field(tmp_path):
    """Old predictions.jsonl rows (no "stop") still read, as before: unknown ending, the parse as it is; new rows
    a stop string ended (a `Prediction` naming it) count ok; an answer that no stop string ended stays broken."""
    from musicflamingo.eval.runner import Prediction, evaluate, load_predictions

    _mcq_benchmark(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps({"id": "q0", "prediction": CUT}) + "\n")
    asked = []

    def predict(batch):
        asked.extend(it.id for it in batch)
        return [Prediction(CUT, "</answer>") if it.id != "q3" else CUT for it in batch]

    results = evaluate(_eval_cfg(tmp_path, "think=true"), predict_fn=predict)
    assert sorted(asked) == ["q1", "q2", "q3"]
    t = results["think"]
    assert (t["n"], t["ok"], t["broken"]) == (4, 2, 2)
    rows = {r["id"]: r for r in _predictions(out / "predictions.jsonl")}
    assert "stop" not in rows["q0"] and "stop" not in rows["q3"] and rows["q1"]["stop"] == "</answer>"
    stops: dict[str, str] = {}
    assert load_predictions(out / "predictions.jsonl", stops=stops)["q1"] == CUT
    assert stops == {"q1": "</answer>", "q2": "</answer>"}
    per_item = {r["id"]: r["think_status"] for r in _predictions(out / "per_item.jsonl")}
    assert per_item == {"q0": "broken", "q1": "ok", "q2": "ok", "q3": "broken"}

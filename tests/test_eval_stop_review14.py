"""Review round 14, eval stop strings: eval.py applies the checkpoint's generation_config.json `stop_strings` as
infer.py does (it called `model.generate` without the tokenizer, so they were ignored with a warning and its
predictions ran past them: other answers than infer.py's for the same checkpoint and prompt), records them in
run.json, and refuses to resume a folder whose predictions were made without them."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from omegaconf import OmegaConf
from test_eval_runner import _cfg, _write_mcq_fixture
from test_infer_review6 import ckpt, make_cfg  # noqa: F401  (fixtures)
from test_infer_review14 import _with_generation

from musicflamingo.eval import EvalConfigError, evaluate
from musicflamingo.eval.benchmarks import build_benchmark
from musicflamingo.inference import infer
from musicflamingo.reasoning import parse_think

MODEL = ("device=cpu", "dtype=float32", "max_new_tokens=16", "memory_check=false")


def _predictions(out) -> dict[str, str]:
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return {r["id"]: r["prediction"] for r in rows}


def _eval(root, folder, out, *extra):
    return evaluate(_cfg(root, f"ckpt={folder}", f"output_dir={out}", *MODEL, *extra))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmau")
    _write_mcq_fixture(root)
    return root


@pytest.fixture(scope="module")
def free(ckpt, bench, tmp_path_factory):  # noqa: F811
    """The tiny checkpoint's predictions without stop strings, a stop string that cuts the first one inside it, and a copy of the checkpoint whose generation_config.json sets it."""
    out = tmp_path_factory.mktemp("free") / "out"
    _eval(bench, ckpt, out)
    preds = _predictions(out)
    p = preds["q0"]  # the first two letters after its third character that first appear there
    stop = next(
        p[k : k + 2] for k in range(3, len(p)) if p[k : k + 2].isalnum() and p.find(p[k : k + 2]) == k
    )
    folder = _with_generation(ckpt, tmp_path_factory.mktemp("stop") / "ckpt", stop_strings=[stop])
    return preds, stop, folder


def _infer_answers(bench, folder, *extra):
    """infer.py's answers for the benchmark's items (same audio, same prompt text), stripped as eval stores them."""
    cfg = _cfg(bench)
    items = build_benchmark(OmegaConf.to_container(cfg.benchmark, resolve=True)).items
    icfg = make_cfg(f"ckpt={folder}", "max_new_tokens=16", *extra)
    icfg.audio = [it.audio for it in items]
    icfg.prompt = [it.prompt for it in items]
    return {it.id: a.strip() for it, a in zip(items, infer(icfg))}


def test_eval_cuts_predictions_at_generation_config_stop_strings_as_infer_does(free, bench, tmp_path, caplog):
    preds, stop, folder = free
    want = {k: (p[: p.find(stop)].strip() if stop in p else p) for k, p in preds.items()}
    assert want["q0"] != preds["q0"]  # the stop string cuts this answer
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        _eval(bench, folder, out)
    assert "stop_strings" not in caplog.text  # no "need the tokenizer ... run past them" warning
    got = _predictions(out)
    assert got == want
    assert all(stop not in p for p in got.values())
    assert got == _infer_answers(bench, folder)
    assert json.loads((out / "run.json").read_text())["stop_strings"] == [stop]


def test_think_mode_parses_the_cut_predictions(free, bench, tmp_path):
    _, stop, folder = free
    out = tmp_path / "out"
    results = _eval(bench, folder, out, "think=true")
    got = _predictions(out)
    assert got == _infer_answers(bench, folder, "think=true")
    assert all(stop not in p for p in got.values())
    statuses = [parse_think(p).status for p in got.values()]
    think = results["think"]
    assert think["n"] == 4 and [think[s] for s in ("ok", "missing", "broken")] == [
        statuses.count(s) for s in ("ok", "missing", "broken")
    ]


def test_a_folder_of_predictions_made_without_the_stop_strings_is_not_resumed(free, bench, tmp_path):
    preds, stop, folder = free
    out = tmp_path / "out"
    _eval(bench, folder, out, "limit=2")
    # run.json as eval.py wrote it before it applied stop strings: its predictions ran past them
    path = out / "run.json"
    old = json.loads(path.read_text())
    del old["stop_strings"]
    path.write_text(json.dumps(old))
    before = (out / "predictions.jsonl").read_bytes()
    with pytest.raises(
        EvalConfigError, match=r"differs in: stop_strings\) \(its predictions were made without"
    ):
        _eval(bench, folder, out)
    assert (out / "predictions.jsonl").read_bytes() == before


def test_a_run_json_without_stop_strings_of_a_checkpoint_without_them_resumes(free, bench, ckpt, tmp_path):  # noqa: F811
    preds, _, _ = free
    out = tmp_path / "out"
    _eval(bench, ckpt, out, "limit=2")
    path = out / "run.json"
    old = json.loads(path.read_text())
    assert "stop_strings" not in old
    for key in ("dtype", "weights"):  # older still
        old.pop(key)
    path.write_text(json.dumps(old))
    results = _eval(bench, ckpt, out)
    assert results["num_scored"] == 4 and _predictions(out) == preds


def test_a_bad_stop_strings_value_names_the_file(ckpt, bench, tmp_path):  # noqa: F811
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    gen = folder / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "stop_strings": [""]}))
    with pytest.raises(EvalConfigError, match=r"generation_config.json: .*empty stop string"):
        _eval(bench, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()

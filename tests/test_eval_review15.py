"""Review round 15, eval `stop=`: eval.py takes infer.py's `stop` setting (a text or a list, `\\n` typed is a newline,
`[]` none, null the checkpoint's generation_config.json stop_strings), read by infer's own helper, checked before
the checkpoint or the benchmark is read, recorded in run.json as `stop_strings`; a resume with other stop strings is refused naming `stop`.
eval.py had no such setting (`stop=` was an unknown key): a benchmark could not be scored as infer.py answers with
`stop=`, nor without a checkpoint's stop strings."""

from __future__ import annotations

import json

import pytest
from test_eval_runner import _cfg
from test_eval_stop_review14 import _eval, _infer_answers, _predictions, bench, free  # noqa: F401  (fixtures)
from test_infer_review6 import ckpt  # noqa: F401  (fixture)

from musicflamingo.eval import EvalConfigError, evaluate
from musicflamingo.settings import check_eval_settings


def _cut(preds: dict[str, str], stop: str) -> dict[str, str]:
    return {k: (p[: p.find(stop)].strip() if stop in p else p) for k, p in preds.items()}


def test_stop_setting_cuts_predictions_as_infer_does(free, bench, ckpt, tmp_path):  # noqa: F811
    preds, stop, _ = free
    out = tmp_path / "out"
    _eval(bench, ckpt, out, f"stop='{stop}'")  # a checkpoint without stop strings of its own
    got = _predictions(out)
    assert got == _cut(preds, stop) and got["q0"] != preds["q0"]
    assert got == _infer_answers(bench, ckpt, f"stop='{stop}'")
    assert json.loads((out / "run.json").read_text())["stop_strings"] == [stop]


def test_stop_empty_list_drops_the_checkpoints_stop_strings(free, bench, tmp_path):  # noqa: F811
    preds, _, folder = free  # folder's generation_config.json sets the stop string
    out = tmp_path / "out"
    _eval(bench, folder, out, "stop=[]")
    assert _predictions(out) == preds == _infer_answers(bench, folder, "stop=[]")
    assert "stop_strings" not in json.loads((out / "run.json").read_text())


def test_a_resume_with_other_stop_strings_is_refused_naming_stop(free, bench, ckpt, tmp_path):  # noqa: F811
    preds, stop, _ = free
    out = tmp_path / "out"
    _eval(bench, ckpt, out, f"stop='{stop}'", "limit=2")
    before = (out / "predictions.jsonl").read_bytes()
    for other in ("stop=zzqq", "stop=null"):
        with pytest.raises(EvalConfigError, match=r"differs in: stop_strings\).*stop="):
            _eval(bench, ckpt, out, other)
        assert (out / "predictions.jsonl").read_bytes() == before
    _eval(bench, ckpt, out, f"stop=['{stop}']")  # the same stop strings, as a list: resumed
    assert _predictions(out) == _cut(preds, stop)


def test_an_older_run_json_without_stop_strings_resumes_with_stop_empty(free, bench, tmp_path):  # noqa: F811
    """A folder eval.py wrote before it applied the checkpoint's stop strings ran past them: stop=[] resumes it."""
    preds, _, folder = free
    out = tmp_path / "out"
    _eval(bench, folder, out, "stop=[]", "limit=2")
    path = out / "run.json"
    old = json.loads(path.read_text())
    for key in ("dtype", "weights"):  # as an older eval.py wrote it
        old.pop(key)
    path.write_text(json.dumps(old))
    with pytest.raises(
        EvalConfigError, match="its predictions were made without the checkpoint's stop_strings"
    ):
        _eval(bench, folder, out)  # stop=null: the checkpoint's, which these predictions ran past
    _eval(bench, folder, out, "stop=[]")
    assert _predictions(out) == preds


def test_stop_is_read_as_infer_reads_it():
    from musicflamingo.eval.runner import eval_stop_strings

    assert eval_stop_strings({"stop": "a\\nb"}, None) == ("a\nb",)  # \n typed is a newline
    assert eval_stop_strings({"stop": ["x", 42]}, None) == ("x", "42")
    assert eval_stop_strings({"stop": []}, None) == () == eval_stop_strings({"stop": None}, None)


@pytest.mark.parametrize("value", [{"a": 1}, [""], [["x"]]])
def test_bad_stop_is_refused_before_anything_is_read_naming_it(value, bench, tmp_path):  # noqa: F811
    cfg = _cfg(bench, f"ckpt={tmp_path / 'none'}", f"output_dir={tmp_path / 'out'}")
    cfg.stop = value
    with pytest.raises(EvalConfigError, match=r"^stop"):  # before the (missing) checkpoint is read
        evaluate(cfg)
    assert not (tmp_path / "out").exists()


def test_stop_is_a_known_eval_setting():
    check_eval_settings({"stop": ["\\n\\n", "Q:"]})  # configs/eval.yaml defines it: not an unknown key

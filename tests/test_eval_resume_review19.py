"""Review round 19, resuming with `limit`: `limit=N` takes the items already answered in the folder's
predictions.jsonl first, so a limited run resumed after its benchmark's order changed (a Jam-ALT run begun on
v1.2's metadata.jsonl alone, resumed once metadata.csv's order is used; a data file rewritten) asks and reports the
items it began with instead of N others; the report says so, and the read before the lock repairs nothing."""

from __future__ import annotations

import json
import shutil

import pytest
from test_eval_release_formats import _cfg as _release_cfg
from test_eval_review18 import REVISED, _songs, make_jam_alt_v12
from test_eval_runner import CountingPredictor, _cfg, _write_mcq_fixture, ids_in

from musicflamingo.eval import EvalItem, evaluate
from musicflamingo.eval.runner import EvalFolderInUseError, EvalLock, limit_items


def _per_item_ids(out) -> list[str]:
    return [
        json.loads(line)["id"] for line in (out / "per_item.jsonl").read_text(encoding="utf-8").splitlines()
    ]


# ---- the rule ----------------------------------------------------------------------------------------------------
def test_limit_takes_answered_items_first_in_the_items_order():
    items = [EvalItem(f"i{k}", f"/a/{k}.wav", "Q?", "mcq", answer="x") for k in range(6)]
    ids = lambda chosen: [it.id for it in chosen]  # noqa: E731
    # nothing answered, or the answers a prefix: the first N, as a fresh folder
    assert (ids(limit_items(items, 3)[0]), limit_items(items, 3)[1]) == (["i0", "i1", "i2"], 0)
    assert limit_items(items, 3, {"i0", "i1"}) == (items[:3], 0)
    # a killed run asked longest first (i2 of the first 3): the same 3 again
    assert limit_items(items, 3, {"i2"}) == (items[:3], 0)
    # answers past the first N (asked in another order): kept, the rest from the current order, order kept
    chosen, kept = limit_items(items, 3, {"i5", "i4"})
    assert (ids(chosen), kept) == (["i0", "i4", "i5"], 2)
    # more answered than N: the first N of them
    assert (
        ids(limit_items(items, 2, {"i1", "i3", "i5"})[0]),
        limit_items(items, 2, {"i1", "i3", "i5"})[1],
    ) == (
        ["i1", "i3"],
        1,
    )
    # an answered id the benchmark no longer has is no item; limit past the end: every item
    assert limit_items(items, 2, {"gone"}) == (items[:2], 0)
    assert limit_items(items, 9, {"i5"}) == (items, 0)
    assert limit_items(items, 0, {"i5"}) == ([], 0)


# ---- Jam-ALT: begun on metadata.jsonl's order, resumed in metadata.csv's ---------------------------------------
@pytest.mark.parametrize("killed_after", [None, 1], ids=["finished", "killed-after-one"])
def test_jam_alt_run_begun_in_jsonl_order_resumes_with_its_songs(tmp_path, killed_after):
    """A `limit=2` run on a v1.2 folder before metadata.csv's order was used (its metadata.jsonl alone, as the
    previous eval.py read it) asked the JSONL's first two songs; resumed with metadata.csv beside it, it asked the
    CSV's first two anew and reported those. Now it asks none (or, killed after one, one more) and reports the
    songs it answered."""
    root = make_jam_alt_v12(tmp_path)
    rows = (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "metadata.jsonl").write_text("".join(reversed(rows)), encoding="utf-8")  # v1.2 lists by language
    csv_order = [song["Filepath"].rsplit(".", 1)[0] for song in _songs(tmp_path / "src")]
    jsonl_first = csv_order[::-1][:2]
    out, asked = tmp_path / "out", []

    def predict(batch):
        if killed_after is not None and len(asked) >= killed_after:
            raise RuntimeError("killed")
        asked.extend(it.id for it in batch)
        return [REVISED[it.id] for it in batch]

    cfg = lambda *extra: _release_cfg("jamendolyrics", root, out, "limit=2", "batch_size=1", *extra)  # noqa: E731
    if killed_after is None:
        evaluate(cfg(), predict_fn=predict)
    else:
        with pytest.raises(RuntimeError, match="killed"):
            evaluate(cfg(), predict_fn=predict)
    assert len(asked) == (killed_after or 2) and set(asked) <= set(jsonl_first)
    assert set(jsonl_first).isdisjoint(csv_order[:2])  # the CSV's first two are others
    answered, asked[:] = list(asked), []
    killed_after = None
    shutil.copy(tmp_path / "src" / "JamendoLyrics.csv", root / "metadata.csv")  # now read in the CSV's order
    results = evaluate(cfg(), predict_fn=predict)
    expected = answered + [csv_order[0]] * (len(answered) == 1)
    assert asked == expected[len(answered) :]  # nothing answered asked again, and no more than limit=2 in all
    assert sorted(_per_item_ids(out)) == sorted(expected) and results["num_predicted"] == 2
    assert sorted(ids_in(out / "predictions.jsonl")) == sorted(expected)
    # the report says these are not the first two a fresh folder takes
    assert results["limit_kept"] == len(answered)
    assert json.loads((out / "results.json").read_text())["limit_kept"] == len(answered)
    md = (out / "results.md").read_text(encoding="utf-8")
    assert (
        f"- items predicted: 2 of 2 (limit=2: {len(answered)} of them answered by an earlier run past" in md
    )
    # a fresh folder asks the CSV's first two
    asked.clear()
    fresh = evaluate(_release_cfg("jamendolyrics", root, tmp_path / "fresh", "limit=2"), predict_fn=predict)
    assert sorted(asked) == sorted(csv_order[:2]) and "limit_kept" not in fresh


# ---- any benchmark: a data file rewritten in another order -----------------------------------------------------
def test_limited_run_resumes_with_its_items_after_the_data_file_is_reordered(tmp_path, caplog):
    _write_mcq_fixture(tmp_path)
    first = CountingPredictor()
    evaluate(_cfg(tmp_path, "limit=2"), predict_fn=first)
    assert first.seen == ["q0", "q1"]
    data = tmp_path / "mmau-test-mini.json"
    data.write_text(json.dumps(json.loads(data.read_text())[::-1]), encoding="utf-8")  # q3 q2 q1 q0
    second = CountingPredictor()
    with caplog.at_level("INFO", logger="musicflamingo.eval.runner"):
        results = evaluate(_cfg(tmp_path, "limit=2"), predict_fn=second)
    assert second.seen == [] and sorted(_per_item_ids(tmp_path / "out")) == ["q0", "q1"]
    assert results["limit_kept"] == 2 and results["tasks"]["mcq"]["n"] == 2
    assert (
        "limit=2: 2 item(s) already answered in" in caplog.text
        and "A new tag=<name> asks the first 2" in (caplog.text)
    )
    # a larger limit adds the first unanswered in the new order
    third = CountingPredictor()
    results = evaluate(_cfg(tmp_path, "limit=3"), predict_fn=third)
    assert third.seen == ["q3"] and sorted(_per_item_ids(tmp_path / "out")) == ["q0", "q1", "q3"]
    # every item answered: limit=N is the first N again, nothing reported as kept
    evaluate(_cfg(tmp_path), predict_fn=CountingPredictor())
    results = evaluate(_cfg(tmp_path, "limit=2"), predict_fn=CountingPredictor())
    assert _per_item_ids(tmp_path / "out") == ["q3", "q2"] and "limit_kept" not in results
    assert "answered by an earlier run" not in (tmp_path / "out" / "results.md").read_text()


def test_the_read_before_the_lock_repairs_nothing(tmp_path):
    """predictions.jsonl is read for `limit` before eval.lock is taken: a run refused for a folder in use leaves
    the running run's file as it is (a torn last line may be a write in flight); the run that holds the lock
    then cuts the torn line and resumes with the answered items."""
    _write_mcq_fixture(tmp_path)
    out = tmp_path / "out"
    evaluate(_cfg(tmp_path, "limit=4"), predict_fn=CountingPredictor())
    answered = b"".join(
        line for line in (out / "predictions.jsonl").read_bytes().splitlines(keepends=True)[2:]
    )
    torn = answered + b'{"id": "q0", "predic'  # q2 and q3 answered, q0's line in flight
    (out / "predictions.jsonl").write_bytes(torn)
    with EvalLock(out), pytest.raises(EvalFolderInUseError):
        evaluate(_cfg(tmp_path, "limit=2"), predict_fn=CountingPredictor())
    assert (out / "predictions.jsonl").read_bytes() == torn
    second = CountingPredictor()
    evaluate(_cfg(tmp_path, "limit=2"), predict_fn=second)
    assert second.seen == [] and sorted(_per_item_ids(out)) == sorted(ids_in(out / "predictions.jsonl"))
    assert (out / "predictions.jsonl").read_bytes() == answered

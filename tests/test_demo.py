"""The main job end to end at toy size (the real run is `make demo`): ~40 s of CPU, so it runs in CI."""

from __future__ import annotations

import shutil

import pytest


@pytest.mark.skipif(shutil.which("fluidsynth") is None, reason="needs Debian's fluidsynth (make setup)")
def test_demo_runs_end_to_end(tmp_path):
    from musicflamingo.demo import main

    main(
        [
            "--out",
            str(tmp_path),
            "--n-train",
            "12",
            "--n-val",
            "2",
            "--n-test",
            "4",
            "--n-other",
            "4",
            "--minutes",
            "0.3",
            "--max-steps",
            "4",
            "--caption-steps",
            "2",
        ]
    )
    report = (tmp_path / "results.md").read_text()
    for qtype in ("instrument_family", "key", "tempo", "time_signature", "overall"):
        assert qtype in report
    # The caption-fact table, the other-seed corpus and three captions next to their ground truth.
    facts = report.split("## Captions")[1].split("##")[0]
    for fact in ("key", "tempo", "time_signature", "instrument_family", "mean"):
        assert f"| {fact} " in facts or f"| **{fact}** " in facts, facts
    other = report.split("## Generalisation")[1].split("##")[0]
    assert "| overall |" in other and "seed 1" in other
    assert report.count("  - truth: 'A solo ") == 3
    assert (tmp_path / "synthetic-seed1" / "test.jsonl").is_file()
    assert (tmp_path / "train-questions" / "export" / "config.json").is_file()  # stage 1: questions
    assert (tmp_path / "train" / "export" / "config.json").is_file()  # stage 2: + captions, from stage 1
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()

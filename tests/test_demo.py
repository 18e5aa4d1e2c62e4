"""The main job end to end at toy size (the real run is `make demo`)."""

from __future__ import annotations

import shutil

import pytest


@pytest.mark.slow
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
            "--minutes",
            "0.3",
            "--max-steps",
            "4",
        ]
    )
    report = (tmp_path / "results.md").read_text()
    for qtype in ("instrument_family", "key", "tempo", "time_signature", "overall"):
        assert qtype in report
    assert (tmp_path / "train" / "export" / "config.json").is_file()
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()

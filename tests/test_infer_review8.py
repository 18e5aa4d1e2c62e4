"""Review round 8 of infer.py: what it says about a run with skipped files."""

from __future__ import annotations

import io
import logging

import numpy as np
import soundfile as sf
from test_infer import audios, ckpt, make_cfg  # noqa: F401  (fixtures)

from musicflamingo.inference import infer


def test_token_limit_warning_counts_only_answers(ckpt, audios, tmp_path, caplog):  # noqa: F811
    """With skip_bad_audio=true, the 'ended at the token limit' warning counted the skipped files among the
    answers: "2 of 3 answers" for a run that made 2."""
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    cfg = make_cfg(
        f"ckpt={ckpt}", f"audio=[{audios[0]},{nan},{audios[1]}]", "max_new_tokens=1", "skip_bad_audio=true"
    )
    with caplog.at_level(logging.WARNING, logger="musicflamingo.inference"):
        answers = infer(cfg, out=io.StringIO())
    assert answers[1] is None and answers[0] is not None and answers[2] is not None
    cut = [r.getMessage() for r in caplog.records if "ended at the token limit" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("2 of 2 answers"), cut

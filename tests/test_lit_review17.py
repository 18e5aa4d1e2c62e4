"""Review round 17: resuming (ckpt_path=last) from a QLoRA checkpoint written before its bases were stored as digests
(13acc76) says why it cannot resume, not that another architecture wrote it."""

from __future__ import annotations

import pytest

from musicflamingo.lit import CheckpointMismatchError, MusicFlamingoLit
from musicflamingo.model.build import PARTS


def test_resuming_a_qlora_checkpoint_from_before_the_digest_says_why_it_cannot(monkeypatch):
    """on_load_checkpoint compared the keys first: "was written by a model of another architecture: ...base_digest is
    missing from it (and 97 more difference(s)); resume with the model settings that wrote it", advice that cannot
    work (the same settings wrote it)."""
    pytest.importorskip("bitsandbytes")
    from test_quantize_review16 import _let_cpu_quantize, _qlora

    from musicflamingo.model.lora import import_bitsandbytes, nf4_linear_class

    _let_cpu_quantize(monkeypatch)
    trained = _qlora().to("cpu")
    # what the old code saved: bitsandbytes' own state dict for each 4-bit base
    monkeypatch.setattr(
        nf4_linear_class(), "_save_to_state_dict", import_bitsandbytes().nn.Linear4bit._save_to_state_dict
    )
    old = {f"model.{k}": v for k, v in trained.state_dict().items()}
    monkeypatch.undo()
    _let_cpu_quantize(monkeypatch)
    lit = MusicFlamingoLit(_qlora(), None, None, dict.fromkeys(PARTS), "stop")
    with pytest.raises(CheckpointMismatchError) as refused:
        lit.on_load_checkpoint({"state_dict": old})
    message = str(refused.value)
    assert (
        "language_model.layers.0.self_attn.q_proj.base: the checkpoint holds this layer's frozen 4-bit"
        in message
    )
    assert (
        "cannot resume" in message and "afresh" in message and "written by a model of another" not in message
    )

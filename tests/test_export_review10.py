"""The FSDP export path (review round 10): `training._plain_copy` rebuilds the trained model unwrapped from its
gathered state, with the adapters the model holds (an init_from_peft folder may adapt more linears, at other
scales, than model.net.lora says)."""

import pytest
import torch
from omegaconf import OmegaConf
from test_grpo import NO_LORA
from test_grpo_review10 import _lora_net as _net

from musicflamingo.lit import export_model
from musicflamingo.model import MusicFlamingo
from musicflamingo.model.peft_format import save_peft_adapter
from musicflamingo.training import _plain_copy

FREEZE = {"audio_tower": True, "multi_modal_projector": True, "language_model": True}


@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj", "o_proj"], ["q_proj", "v_proj"]], ids=["more", "same"]
)
def test_fsdp_export_keeps_the_adapters_of_init_from_peft(tmp_path, targets):
    """A peft folder adapting more linears stopped FSDP's export after training with a bare load_state_dict
    RuntimeError; one with another alpha exported merged weights 2x off, silently. Now the export equals the
    unwrapped model's (DDP's) bit for bit."""
    src = _net(targets=targets, alpha=16)
    for n, p in src.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    save_peft_adapter(src, tmp_path / "peft")
    lora = {"targets": ["q_proj", "v_proj"], "alpha": 8, "init_from_peft": str(tmp_path / "peft")}
    trained = _net(**lora)
    cfg = OmegaConf.create({"freeze": FREEZE, "lora": {**NO_LORA, "enabled": True, **lora}})
    export_model(_plain_copy(trained, cfg, trained.state_dict()), tmp_path / "fsdp")
    export_model(trained, tmp_path / "ddp")
    a = MusicFlamingo.from_pretrained(tmp_path / "fsdp").state_dict()
    b = MusicFlamingo.from_pretrained(tmp_path / "ddp").state_dict()
    assert a.keys() == b.keys()
    for k in b:
        assert torch.equal(a[k], b[k]), k

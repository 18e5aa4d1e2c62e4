"""LoRA's settings: every target names a linear of the language model, and the rank fits the layers it adapts.

A target that matched nothing next to one that matched used to be dropped silently (`[q_proj, v_prj]` trained
q_proj alone); only a list matching nothing at all was refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch import nn

from musicflamingo.model.build import build_model
from musicflamingo.planner import MemoryPlanError, check_training
from musicflamingo.settings import SettingsError, check_train_settings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FREEZE = {"audio_tower": True, "multi_modal_projector": False, "language_model": True}
TYPOS = [["q_proj", "v_prj"], ["q_proj", "lm_head"], ["q_proj", "fc1", "out_proj"]]


def _settings(tmp_path: Path, *overrides: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                f"data.train={tmp_path / 'train.jsonl'}",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.log_dir={tmp_path / 'logs'}",
                "experiment=lora",
                *overrides,
            ],
        )
    return OmegaConf.to_container(cfg, resolve=True)


def _tiny(targets: list[str], rank: int = 4) -> nn.Module:
    lora = {"enabled": True, "rank": rank, "alpha": 8, "dropout": 0.0, "targets": targets}
    return build_model(
        preset="tiny",
        overrides={},
        init_from=None,
        seed=0,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze=FREEZE,
        lora=lora,
    )


def test_the_valid_targets_are_the_language_models_linears():
    from musicflamingo.model.lora import LORA_TARGETS

    model = _tiny(["q_proj"])
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.language_model.named_modules() if isinstance(m, nn.Linear)
    }
    assert set(LORA_TARGETS) == names


@pytest.mark.parametrize("targets", TYPOS)
def test_a_target_matching_nothing_is_refused_at_settings_time(tmp_path, targets):
    settings = _settings(tmp_path, f"model.net.lora.targets=[{','.join(targets)}]")
    with pytest.raises(SettingsError) as err:
        check_train_settings(settings)
    message = str(err.value)
    for name in targets[1:]:
        assert name in message.split(":", 1)[1]  # named after the value
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message
    if "v_prj" in targets:
        assert "v_prj (did you mean v_proj?)" in message
    # the planner refuses the same list (a caller that skips the settings check)
    with pytest.raises(MemoryPlanError, match=targets[1]):
        check_training({**settings, "plan": True})


@pytest.mark.parametrize("targets", TYPOS)
def test_a_target_matching_nothing_is_refused_when_building(targets):
    with pytest.raises(ValueError, match=r"match no nn.Linear") as err:
        _tiny(targets)
    assert all(name in str(err.value) for name in targets[1:])


def test_a_rank_above_the_narrowest_targeted_layer_is_refused(tmp_path):
    """One more than k_proj's output features (the tiny preset's narrowest linear) is refused naming the value,
    before anything is built; exactly that many plans and builds. Ranks below 1 never pass the settings."""
    from musicflamingo.model.config import MusicFlamingoConfig

    t = MusicFlamingoConfig.from_name("tiny").text
    narrow = min(t.num_key_value_heads * t.head_dim, t.hidden_size)
    too_big = _settings(tmp_path, "model=tiny", f"model.net.lora.rank={narrow + 1}", "plan=true")
    check_train_settings(too_big)  # the widths come from the model's config: the planner's check
    with pytest.raises(
        MemoryPlanError, match=rf"model.net.lora.rank={narrow + 1}: more than k_proj's {narrow}"
    ):
        check_training(too_big)
    with pytest.raises(ValueError, match=rf"model.net.lora.rank={narrow + 1}: more than .*k_proj's {narrow}"):
        _tiny(["q_proj", "k_proj"], rank=narrow + 1)
    check_training(_settings(tmp_path, "model=tiny", f"model.net.lora.rank={narrow}", "plan=true"))
    _tiny(["q_proj", "k_proj"], rank=narrow)
    with pytest.raises(SettingsError, match=r"model.net.lora.rank=0: expected an integer >= 1"):
        check_train_settings(_settings(tmp_path, "model.net.lora.rank=0"))

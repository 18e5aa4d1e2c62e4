"""GRPO review 17 (third pass): a resume under other loss settings (model.loss.beta, clip_eps, updates_per_batch,
max_grad_norm, model.reference_dtype) or other rewards (one added or dropped, its class, weight or settings) is
refused naming each setting and both values, as one under other rollout settings is; micro_batch_size (it only
splits the same sum) is not; `model.accept_setting_changes=true` (or its former name
`model.accept_rollout_changes=true`) continues."""

from __future__ import annotations

import logging

import pytest
from test_grpo import _net
from train_fixtures import grpo_module

from musicflamingo import grpo
from musicflamingo.lit import CheckpointMismatchError
from musicflamingo.rewards import AccuracyReward, CaptionFactsReward, FormatReward

LOSS = {"beta": 0.04, "clip_eps": 0.2, "updates_per_batch": 1, "micro_batch_size": 4, "max_grad_norm": 1.0}


def _rewards(**changes):  # noqa: ANN003, ANN202
    rewards = {"format": FormatReward(), "accuracy": AccuracyReward(), "caption_facts": CaptionFactsReward()}
    return {**rewards, **changes}


def _module(net, loss=None, rewards=None, **changes):  # noqa: ANN001, ANN202
    loss = {**LOSS, **(loss or {})}
    return grpo_module(net, rewards=rewards or _rewards(), loss=loss, **changes)


def _checkpoint(net, **changes):  # noqa: ANN001, ANN202
    saved = _module(net, **changes)
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def net():  # noqa: ANN201
    return _net(lora=True)


@pytest.mark.parametrize(
    ("then", "now", "setting", "was", "is_"),
    [
        ({}, {"loss": {"beta": 0.0}}, "model.loss.beta", "0.04", "0.0"),
        ({}, {"loss": {"updates_per_batch": 2}}, "model.loss.updates_per_batch", "1", "2"),
        ({}, {"loss": {"max_grad_norm": None}}, "model.loss.max_grad_norm", "1.0", "null"),
        (
            {"loss": {"updates_per_batch": 2}},
            {"loss": {"updates_per_batch": 2, "clip_eps": 0.3}},
            "model.loss.clip_eps",
            "0.2",
            "0.3",
        ),
        (
            {},
            {"rewards": _rewards(accuracy=AccuracyReward(2.0))},
            "model.rewards.accuracy.weight",
            "1.0",
            "2.0",
        ),
        (
            {},
            {"rewards": _rewards(caption_facts=CaptionFactsReward(source="all"))},
            "model.rewards.caption_facts.source",
            "answer",
            "all",
        ),
        (
            {},
            {"rewards": _rewards(format=None)},
            "model.rewards.format",
            "{_target_:musicflamingo.rewards.FormatReward,weight:1.0}",
            "null",
        ),
        (
            {"rewards": _rewards(accuracy=None)},
            {},
            "model.rewards.accuracy",
            "null",
            "{_target_:musicflamingo.rewards.AccuracyReward,weight:1.0}",
        ),
    ],
)
def test_a_resume_under_other_loss_settings_or_rewards_is_refused(net, then, now, setting, was, is_):
    """A mistaken `model.loss.beta=0` or `model.rewards.accuracy.weight=2` on the resuming command trained another
    objective from the saved optimizer on, silently (beta>0 -> 0 also skipped the reference fingerprint check)."""
    checkpoint = _checkpoint(net, **then)
    _module(net, **then).on_load_checkpoint(checkpoint)  # the same settings: accepted
    with pytest.raises(CheckpointMismatchError) as e:
        _module(net, **now).on_load_checkpoint(checkpoint)
    message = str(e.value)
    assert f"{setting}={was} there, {is_} now" in message, message
    # a whole reward entry is given back with ++ (it may have been added with +)
    prefix = "++" if setting.count(".") == 2 and setting.startswith("model.rewards.") else ""
    assert (
        f"resume with {prefix}{setting}={was}" in message and "model.accept_setting_changes=true" in message
    )


def test_what_only_splits_the_same_loss_resumes(net):
    """micro_batch_size splits the same sum of token terms (tests/test_grpo_review16.py: the same weights); clip_eps
    does nothing at one update per batch (the ratio is exactly 1): both resume."""
    checkpoint = _checkpoint(net)
    _module(net, loss={"micro_batch_size": 2, "clip_eps": 0.5}).on_load_checkpoint(checkpoint)


def test_the_accept_flags_continue_with_a_warning_and_old_checkpoints_resume(net, caplog):
    checkpoint = _checkpoint(net)
    with caplog.at_level(logging.WARNING, logger=grpo.log.name):
        _module(net, loss={"beta": 0.0}, accept_setting_changes=True).on_load_checkpoint(checkpoint)
    assert (
        "model.loss.beta=0.04 there, 0.0 now" in caplog.text and "accept_setting_changes=true" in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=grpo.log.name):  # the former name accepts as much
        _module(net, rewards=_rewards(format=None), accept_rollout_changes=True).on_load_checkpoint(
            checkpoint
        )
    assert "model.rewards.format=" in caplog.text and "accept_rollout_changes=true" in caplog.text
    del checkpoint["grpo_loss"]  # written before the loss settings were saved: resumes as before
    _module(net, loss={"beta": 0.0}).on_load_checkpoint(checkpoint)


def test_a_full_fine_tuning_resume_under_another_reference_dtype_is_refused():
    """The frozen reference copy's dtype changes every KL term; its fingerprint is of the weights it is made from,
    so another model.reference_dtype passed."""
    net = _net(lora=False, freeze_projector=False)
    checkpoint = _checkpoint(net)
    assert "grpo_reference" in checkpoint
    with pytest.raises(CheckpointMismatchError, match=r"model.reference_dtype=null there, bfloat16 now"):
        _module(net, reference_dtype="bfloat16").on_load_checkpoint(checkpoint)


def test_a_resumed_run_with_another_reward_weight_is_refused_then_continued_when_accepted(tmp_path):
    """End to end: a reward's weight changed on the resuming command is refused before any step;
    `model.accept_setting_changes=true` (no +: a key of the experiment) continues."""
    from test_grpo2_review17 import resumed_under_a_change

    resumed_under_a_change(
        tmp_path,
        "model.rewards.short.weight=2.0",
        r"model.rewards.short.weight=1.0 there, 2.0 now",
        "model.accept_setting_changes=true",
    )

"""GRPO review 17 (second pass): a resume under other rollout settings (model.seed, model.rollout.*, model.think) is
refused naming the setting and both values, or continued with a warning under `model.accept_rollout_changes=true`;
the record check at fit start says how far it is."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from test_grpo import _attach_manifests, _net
from train_fixtures import grpo_module, write_dataset

from musicflamingo import grpo
from musicflamingo.lit import CheckpointMismatchError
from musicflamingo.rewards import AccuracyReward

ROLLOUT = {"group_size": 2, "max_new_tokens": 4, "temperature": 0.7, "top_p": 1.0, "top_k": 0, "slots": None}


def _module(net, **changes):  # noqa: ANN001, ANN202
    rollout = {**ROLLOUT, **changes.pop("rollout", {})}
    return grpo_module(net, beta=0.0, rewards={"accuracy": AccuracyReward()}, rollout=rollout, **changes)


def _checkpoint(net, **changes):  # noqa: ANN001, ANN202
    saved = _module(net, **changes)
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.mark.parametrize(
    ("change", "setting", "was", "now"),
    [
        ({"seed": 7}, "model.seed", "0", "7"),
        ({"rollout": {"group_size": 3}}, "model.rollout.group_size", "2", "3"),
        ({"rollout": {"temperature": 1.0}}, "model.rollout.temperature", "0.7", "1.0"),
        ({"rollout": {"top_p": 0.9}}, "model.rollout.top_p", "1.0", "0.9"),
        ({"rollout": {"top_k": 5}}, "model.rollout.top_k", "0", "5"),
        ({"rollout": {"max_new_tokens": 8}}, "model.rollout.max_new_tokens", "4", "8"),
        ({"rollout": {"slots": 1}}, "model.rollout.slots", "null", "1"),
        ({"think": False}, "model.think", "true", "false"),
    ],
)
def test_a_resume_under_other_rollout_settings_is_refused(change, setting, was, now):
    """Rollouts are sampled from (model.seed, step, rank) with the rollout settings: a resume with only model.seed
    changed (the top-level seed is refused through data.seed, model.seed was not) or another temperature, group
    size, token limit... sampled other rollouts than the uninterrupted run, silently."""
    net = _net(lora=True)
    checkpoint = _checkpoint(net)
    _module(net).on_load_checkpoint(checkpoint)  # the same settings: accepted
    with pytest.raises(CheckpointMismatchError) as e:
        _module(net, **change).on_load_checkpoint(checkpoint)
    message = str(e.value)
    assert f"{setting}={was} there, {now} now" in message
    assert f"resume with {setting}=" in message and "model.accept_rollout_changes=true" in message


def test_accept_rollout_changes_continues_with_a_warning(caplog):
    """The way on for a change one means (a higher token limit after cut answers): said, not refused; a checkpoint
    written before the settings were saved resumes as before."""
    net = _net(lora=True)
    checkpoint = _checkpoint(net)
    with caplog.at_level(logging.WARNING, logger=grpo.log.name):
        _module(net, seed=3, accept_rollout_changes=True).on_load_checkpoint(checkpoint)
    assert "model.seed=0 there, 3 now" in caplog.text and "accept_rollout_changes=true" in caplog.text
    del checkpoint["grpo_rollout"]
    _module(net, seed=3).on_load_checkpoint(checkpoint)


def test_the_record_check_at_fit_start_reports_its_progress(tmp_path, monkeypatch, caplog):
    """Every record's id and reward fields are checked at fit start (~150 us a record: minutes at a million
    records), which printed nothing; rank 0 now logs how far it is."""
    manifest = write_dataset(tmp_path / "data", n=3)
    monkeypatch.setattr(grpo, "PROGRESS_EVERY_S", 0.0)
    lit = _attach_manifests(_module(_net(lora=True), think=False), manifest)
    with caplog.at_level(logging.INFO, logger=grpo.log.name):
        lit._record_table("train")
    lines = [r.getMessage() for r in caplog.records if "checking the train records" in r.getMessage()]
    assert any("1 of 3 records" in m for m in lines), lines
    assert any("3 of 3 records" in m for m in lines) and "3 records in" in lines[-1], lines
    # another rank checks silently (one line per interval, not one per rank)
    caplog.clear()
    other = _attach_manifests(_module(_net(lora=True), think=False), manifest)
    other._trainer = SimpleNamespace(datamodule=other._trainer.datamodule, global_rank=1)
    with caplog.at_level(logging.INFO, logger=grpo.log.name):
        other._record_table("train")
    assert "checking the train records" not in caplog.text


def resumed_under_a_change(tmp_path, change: str, refused: str, accept: str) -> None:  # noqa: ANN001
    """A one-step GRPO run through Hydra, resumed for a second step with `change` on the command line: refused with
    `refused` before any step, then continued with `accept` (a real checkpoint, Hydra's overrides)."""
    from test_grpo import SHORT
    from train_fixtures import compose_train, write_processor

    from musicflamingo.training import train

    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data")
    common = [
        "experiment=grpo",
        SHORT,
        "model.rollout.max_new_tokens=3",
        "export=false",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "data.batch_max_tokens=800",
    ]
    train(compose_train(tmp_path / "run", manifest, proc, [*common, "trainer.max_steps=1"]))
    resumed = [*common, "trainer.max_steps=2", change]
    with pytest.raises(CheckpointMismatchError, match=refused):
        train(compose_train(tmp_path / "run", manifest, proc, resumed))
    _, objects = train(compose_train(tmp_path / "run", manifest, proc, [*resumed, accept]))
    assert objects["trainer"].global_step == 2


def test_a_resumed_run_with_another_model_seed_is_refused_then_continued_when_accepted(tmp_path):
    """End to end: `model.seed` changed on the resuming command is refused before any step;
    `model.accept_rollout_changes=true` (the flag's former name) continues the run."""
    resumed_under_a_change(
        tmp_path, "model.seed=5", r"model.seed=\d+ there, 5 now", "model.accept_rollout_changes=true"
    )

"""Review 7 follow-ups: the planner's LoRA suggestion, a tied checkpoint's stored head, DDP on one device; GRPO's
prompts from left-padded batches, a non-finite loss after an update has stepped, and the optimizer step in the
metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from train_fixtures import CONFIGS, compose_train, grpo_module, write_dataset, write_processor

from musicflamingo.planner import (
    alternatives,
    check_generation,
    check_training,
    parameter_counts,
    plan_training,
    training_setup,
)

SHORT = "+model.rewards.short={_target_:test_grpo.PrefersShort,weight:1.0}"


def _settings(tmp_path: Path, *extra: str) -> dict:
    overrides = [
        f"data.train={tmp_path / 'train.jsonl'}",
        f"data.processor={tmp_path / 'processor'}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


# ---------------------------------------------------------------------------------------------- planner
def test_lora_suggestion_is_planned_and_printed_with_the_configured_adapters(tmp_path):
    """LoRA off, rank 32 on the MLP configured (with dropout): the refusal's "enable LoRA" line was planned with
    rank 8 on q/k/v/o whatever the config said, so its peak was not the run's. Its overrides, applied, must plan
    to the peak it prints, and it names the rank and targets the run will use."""
    configured = (
        "model.net.lora.rank=32",
        "model.net.lora.targets=[gate_proj,up_proj,down_proj]",
        "model.net.lora.dropout=0.1",
    )
    base = ("model=small", *configured)
    config, setup = training_setup(_settings(tmp_path, *base))
    assert setup.lora_rank == 0  # LoRA is off
    fixes = alternatives(config, setup, int(1e15))
    lora = [(cli, peak) for cli, peak in fixes if cli.startswith("model.net.lora.enabled=true")]
    assert lora, fixes
    for cli, peak in lora:
        overrides = [x.strip("'") for x in cli.split()]
        run = _settings(tmp_path, *base, *overrides)
        assert plan_training(*training_setup(run)).peak == peak, cli
        assert (
            "model.net.lora.rank=32" in cli and "model.net.lora.targets=[gate_proj,up_proj,down_proj]" in cli
        )


def test_a_tied_checkpoint_with_its_own_head_is_planned_with_it(tmp_path):
    """tie_word_embeddings=true, but the folder stores a head that differs from the embedding: from_pretrained
    keeps it as its own weight, and the planner counted it as 0 (training and generation plans short by V x D)."""
    from musicflamingo.model import MusicFlamingo, MusicFlamingoConfig

    config = MusicFlamingoConfig.from_name("tiny", text={"tie_word_embeddings": True})
    model = MusicFlamingo(config)
    model.lm_head.weight = nn.Parameter(torch.randn_like(model.lm_head.weight))  # trained apart, say
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    loaded = MusicFlamingo.from_pretrained(folder)
    assert loaded.lm_head.weight is not loaded.language_model.embed_tokens.weight
    n = sum(p.numel() for p in loaded.parameters())

    settings = _settings(tmp_path, f"model.net.init_from={folder}", "experiment=full_finetune")
    cfg, _ = training_setup(settings)
    counts = parameter_counts(cfg)
    parts = ("audio_tower", "projector", "embed", "final_norm", "lm_head")
    assert sum(counts[k] for k in parts) + cfg.text.num_hidden_layers * counts["decoder_layer"] == n
    plan = check_training({**settings, "plan": True})
    assert plan.item("weights") == n * 4  # float32
    generation = check_generation({"device": "cpu", "dtype": "float32", "plan": True}, folder, [1.0])
    assert generation.item("weights") == n * 4


@pytest.mark.parametrize("strategy", ["trainer=ddp", "+trainer.strategy=ddp"])
def test_ddp_on_one_device_is_planned_with_its_gradient_buckets(tmp_path, strategy):
    """Lightning wraps the model in DistributedDataParallel for strategy ddp whatever the device count, and DDP's
    reducer holds its buckets (a gradient copy) with one process too: one device was planned without them."""
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy

    for flag in ("ddp", DDPStrategy()):  # what Lightning builds for one CPU device
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=flag, logger=False)
        assert isinstance(trainer.strategy, DDPStrategy)
    settings = _settings(tmp_path, "model=small", strategy, "trainer.accelerator=cpu", "trainer.devices=1")
    config, setup = training_setup(settings)
    assert setup.strategy == "ddp"
    plan = plan_training(config, setup)
    assert plan.item("distributed") == plan.item("gradients")
    single = _settings(tmp_path, "model=small", "trainer.accelerator=cpu", "trainer.devices=1")
    assert training_setup(single)[1].strategy == "single"  # auto on one device: no DDP


# ---------------------------------------------------------------------------------------------- GRPO
def _net():  # noqa: ANN202
    from musicflamingo.model.build import build_model

    return build_model(
        preset="tiny",
        overrides={"audio": {"max_source_positions": 100}},
        init_from=None,
        seed=0,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze={"audio_tower": True, "multi_modal_projector": True, "language_model": True},
        lora={"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
    )


def test_prompts_of_a_left_padded_batch_count_their_sound_tokens_by_the_mask(tmp_path):
    """batch_prompts took each row's first `length` positions: on a left-padded batch those are the padding and
    the start of the row, so a short row's `<sound>` run was cut (or lost) and its prompt got the wrong count."""
    from types import SimpleNamespace

    from musicflamingo.data.collate import collate
    from musicflamingo.data.dataset import ConversationDataset
    from musicflamingo.data.manifest import read_manifest
    from musicflamingo.grpo import sound_runs
    from musicflamingo.processor import MusicFlamingoProcessor

    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    manifest = write_dataset(tmp_path / "d")
    records = read_manifest(manifest)
    lines = manifest.read_text().splitlines()  # a long question: the other rows get much padding
    lines[0] = lines[0].replace("What is this?", "What is this? " + "Tell me more about it. " * 30)
    manifest.write_text("\n".join(lines) + "\n")
    records = read_manifest(manifest)
    lit = grpo_module(_net())
    dm = SimpleNamespace(
        train_dataset=SimpleNamespace(datasets=[SimpleNamespace(records=records)]), val_dataset=None
    )
    lit._trainer = SimpleNamespace(datamodule=dm)
    lit._processor = lambda: processor
    samples = [ConversationDataset(records, processor)[i] for i in range(len(records))]
    right = lit.batch_prompts(collate(samples, 297, "right"))
    left_batch = collate(samples, 297, "left")
    assert (left_batch["attention_mask"][:, 0] == 0).any()  # some rows are padded on the left
    left = lit.batch_prompts(left_batch)
    counts = left_batch["num_audio_tokens"].tolist()
    assert [sum(sound_runs(torch.tensor(p.ids), 300)) for p in right] == counts
    assert [sum(sound_runs(torch.tensor(p.ids), 300)) for p in left] == counts
    assert [(p.ids, p.windows) for p in left] == [(p.ids, p.windows) for p in right]


def _grpo_run(tmp_path: Path, *extra: str):  # noqa: ANN202
    from musicflamingo.training import train

    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=8)
    overrides = [
        "experiment=grpo",
        SHORT,
        "model.rollout.max_new_tokens=3",
        "model.loss.updates_per_batch=2",
        "model.loss.micro_batch_size=1000",  # one micro-batch: the second backward is the second update's
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "data.batch_max_tokens=800",
        "export=false",
        *extra,
    ]
    return train(compose_train(tmp_path, manifest, proc, overrides))


def test_a_nonfinite_loss_after_an_update_keeps_the_step_count_a_multiple(tmp_path, monkeypatch):
    """updates_per_batch=2: a NaN loss at a batch's second update returned after the first had stepped, so the
    step count went odd (max_steps=4 stopped at 5, a checkpoint every 2 steps was missed). The batch's remaining
    updates are skipped as steps without gradients, and counted."""
    from musicflamingo.grpo import GRPOLit

    original = GRPOLit.sequence_logprobs
    fired = []

    def nan_once_at_a_second_update(self, model, *args):  # noqa: ANN001, ANN202
        logp, which = original(self, model, *args)
        if torch.is_grad_enabled() and self.trainer.global_step % 2 == 1 and not fired:
            fired.append(self.trainer.global_step)
            logp = logp * float("nan")
        return logp, which

    monkeypatch.setattr(GRPOLit, "sequence_logprobs", nan_once_at_a_second_update)
    _, obj = _grpo_run(tmp_path, "model.nonfinite_loss=skip")
    assert fired, "no second update ran"
    trainer = obj["trainer"]
    assert trainer.global_step == 4
    assert obj["model"].nonfinite_steps == 1
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 2  # two batches of two steps each
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_the_optimizer_step_is_logged_next_to_the_batch_step(tmp_path):
    """updates_per_batch=2: metrics.csv's `step` column counts batches (Lightning's logger step), not the
    optimizer steps that trainer.max_steps and the checkpoints count; `train/optimizer_step` says which those are."""
    _, obj = _grpo_run(tmp_path)
    assert obj["trainer"].global_step == 4
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/reward")]
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert [float(r["train/optimizer_step"]) for r in rows] == [2.0, 4.0]

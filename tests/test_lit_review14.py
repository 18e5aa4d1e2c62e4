"""Data-parallel ranks do the same collective work whatever their batches hold (review round 14, ddp-val journey).

`data.bad_sample_policy=skip` hands a rank an empty batch when every sample of it was bad, and a manifest may mix
text-only records with audio ones. Under DDP a rank whose validation batches were all bad logged no `val/loss`, so
Lightning's epoch-end reduction ran on the other ranks only (a gloo size mismatch stopped the run, its last.ckpt not
written); a text-only training batch left the audio tower without gradients on its rank (find_unused_parameters
false: the gradient reduction hung). Under FSDP every forward all-gathers each block: a rank skipping the forward (an
empty batch), running no audio (a text-only batch) or validating one batch fewer than another (validation repeats no
batch) left the others waiting. Now every rank runs every unit (a stand-in batch of weight zero) and `val/loss` is
the mean over every rank's label tokens, summed explicitly, the same key on every rank.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import hydra
import pytest
import torch
from train_fixtures import TINY_OVERRIDES, compose_train, run_in_own_group, write_dataset, write_processor

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32",
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.batch_max_tokens=400",  # samples have 316-379 tokens: one per batch
    "data.bad_sample_policy=skip",
    "data.max_bad_fraction=0.9",
    "logger=csv",
    "export=false",
]


def _data(root: Path, text_only: bool) -> tuple[Path, Path, Path]:
    """(processor, train manifest, val manifest). Training: 4 records, c2's audio undecodable (an all-bad batch on
    its rank), c1 text-only with `text_only`. Validation: two undecodable clips and c0; the unreadable ones sort
    first, so rank 0 validates [bad, c0] and rank 1 [bad]: all bad, one batch fewer."""
    proc = write_processor(root / "proc")
    manifest = write_dataset(root / "data", n=4)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    if text_only:
        del records[1]["audio"]
        records[1]["conversations"][0]["content"] = "What is a tone?"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "data" / "clip2.wav").write_bytes(b"this is not audio" * 100)
    for name in ("broken_a.wav", "broken_b.wav"):
        (root / "data" / name).write_bytes(b"this is not audio either" * 100)
    val_records = [
        {**records[0], "id": "v_bad_a", "audio": "broken_a.wav"},
        {**records[0], "id": "v_bad_b", "audio": "broken_b.wav"},
        records[0],
    ]
    val = root / "data" / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in val_records))
    return proc, manifest, val


def _train(strategy: str, root: Path, text_only: bool, timeout: float = 150) -> Path:
    """train.py on two gloo processes; a hang is killed with its whole process group (Lightning's second rank is
    a child of the first) and fails the test."""
    proc, manifest, val = _data(root, text_only)
    # the case under test: rank 1 validates only an undecodable clip (index 1), one batch fewer than rank 0
    assert _val_split(proc, manifest, val) == [[[0], [2]], [[1]]]
    run = root / "run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"trainer={strategy}",
        *SETTINGS,
        f"data.train={manifest}",
        f"data.val={val}",
        f"data.processor={proc}",
        f"+model.net.overrides={TINY_OVERRIDES}",
        f"hydra.run.dir={run}",
        f"paths.log_dir={root / 'logs'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_in_own_group(cmd, env, timeout, f"trainer={strategy}")
    return run


def _metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "csv" / "metrics.csv")))


def _val_loss_of_one_process(root: Path, run: Path) -> float:
    """The mean loss over the validation set's label tokens (bad samples skipped) of the run's final weights, on
    one process: what the ranks' val/loss must equal."""
    proc, manifest, val = root / "proc", root / "data" / "train.jsonl", root / "data" / "val.jsonl"
    cfg = compose_train(root / "one", manifest, proc, [*SETTINGS[6:9], f"data.val={val}"])
    lit = hydra.utils.instantiate(cfg.model)
    lit.load_state_dict(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    lit.eval()
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            batch = dm.on_before_batch_transfer(batch, 0)
            if batch["input_ids"].shape[0]:
                out = lit.model(**lit._model_inputs(batch), return_logits=False)
                total += float(out.loss) * out.num_label_tokens
                tokens += out.num_label_tokens
    assert tokens > 0
    return total / tokens


def _val_split(proc: Path, manifest: Path, val: Path) -> list[list[list[int]]]:
    """Each rank's validation batches (indices into the val manifest) as the run's data module gives them."""
    from types import SimpleNamespace

    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    split = []
    for rank in range(2):
        dm = MusicFlamingoDataModule(
            train=str(manifest),
            val=str(val),
            processor=str(proc),
            batch_max_tokens=400,
            bad_sample_policy="skip",
        )
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        split.append([list(b) for b in dm.val_sampler])
    return split


def _check_run(run: Path, root: Path) -> None:
    rows = _metrics(run)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), rows
    vals = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(vals) == 1, rows
    assert vals[0] == pytest.approx(_val_loss_of_one_process(root, run), rel=1e-6, abs=0)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_ddp_rank_whose_validation_batches_are_all_bad_joins_val_loss(tmp_path):
    """trainer=ddp on two CPU processes, one rank's every validation batch bad (and one batch fewer): the run
    finishes with its last.ckpt (the other rank's epoch-end reduction of val/loss met a barrier: gloo stopped both),
    val/loss logged once, equal to one process's mean over the good samples' label tokens.

    The same run's training holds an all-bad batch (c2 undecodable, one sample a batch) on one rank: that rank
    returns a zero loss connected to every weight instead of None (which DDP refuses), and the run's bad-sample
    count covers both ranks (was test_robustness_runs' own two-process run)."""
    run = _train("ddp", tmp_path, text_only=False)
    _check_run(run, tmp_path)
    # two samples a rank, one a step; the bad file is on one of the ranks (every rank holds the count since dc78a52)
    counts = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["MusicFlamingoDataModule"]
    assert counts["bad_samples"]["num_seen"] == 4 and counts["bad_samples"]["num_bad"] == 1, counts


@pytest.mark.slow
def test_fsdp_ranks_run_every_unit_whatever_their_batches_hold(tmp_path):
    """trainer=fsdp on two CPU processes: an all-bad training batch on one rank, a text-only one, a rank whose every
    validation batch is bad and that validates one batch fewer: each left the other rank waiting in an all-gather
    (or paired its collectives wrongly); the run finishes and val/loss is one process's over the good samples."""
    _check_run(_train("fsdp", tmp_path, text_only=True), tmp_path)


def test_a_text_only_batch_under_ddp_reaches_the_trained_audio_path(monkeypatch):
    """Under DDP (find_unused_parameters=false) every trained weight must get a gradient on every rank: a rank whose
    batch had no audio gave the audio tower and projector none and the gradient reduction hung. Their gradient is
    now zero there, the loss the batch's own."""
    from types import SimpleNamespace

    from musicflamingo.lit import MusicFlamingoLit
    from musicflamingo.model.build import create_model

    net = create_model("tiny", {"audio": {"max_source_positions": 100}}, seed=0)
    parts = {"audio_tower": None, "multi_modal_projector": None, "language_model": None}
    lit = MusicFlamingoLit(net, None, None, parts, "skip")
    monkeypatch.setattr(lit, "log", lambda *a, **k: None)
    strategy = SimpleNamespace(reduce=lambda t, reduce_op: t)  # the other rank: nothing to add
    lit._trainer = SimpleNamespace(world_size=2, global_step=0, accumulate_grad_batches=1, strategy=strategy)
    ids = torch.randint(0, 200, (1, 12))  # text only: no <sound> token
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss = lit.training_step(batch, 0)
    own = net(**batch, return_logits=False)
    assert loss.item() == pytest.approx(own.loss.item() * own.num_label_tokens, rel=1e-6)
    loss.backward()
    audio = [*net.audio_tower.parameters(), *net.multi_modal_projector.parameters()]
    trained = [p for p in audio if p.requires_grad]
    assert trained and all(p.grad is not None and not p.grad.any() for p in trained)
    assert net.lm_head.weight.grad.any()


def test_a_batch_carrying_bad_sample_markers_passes_lightnings_precision_conversion():
    """bf16-true (and every FSDP run) converts each batch with Lightning's precision plugin before our hooks see it;
    it rebuilds dataclasses and refused the frozen `BadSample` markers of a batch with a skipped sample
    (`ValueError: A frozen dataclass was passed to apply_to_collection`), stopping the run at its first bad clip."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    from musicflamingo.data.dataset import BadSample

    marker = BadSample(index=3, id="clip3", source="train.jsonl:4", reason="undecodable")
    out = HalfPrecision("bf16-true").convert_input({"input_ids": torch.ones(2), "bad_samples": [marker]})
    assert out["input_ids"].dtype == torch.bfloat16
    assert out["bad_samples"] == [marker]

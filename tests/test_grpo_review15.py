"""GRPO under DDP with a trained audio path and text-only prompts (review round 15, grpo-ddp-audio journey).

GRPO computes its log-probs outside the model's forward (`GRPOLit.sequence_logprobs`), one backward per micro-batch.
A micro-batch of text-only prompts runs no audio, so while the audio tower or projector trains (full fine-tuning, or
`model.net.freeze.multi_modal_projector=false` with beta 0) its rank's backward gave them no gradient:
find_unused_parameters is false, so the rank with audio waited in the gradient all-reduce for a bucket the other
never sent (a hang, or a gloo "connection reset" once the other rank ended). A text-only micro-batch now adds the
audio path on the silent stand-in window times zero (`MusicFlamingoLit._stand_in_audio_loss`, as SFT does): the
loss, the metrics and the update are unchanged.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import TINY_OVERRIDES, run_in_own_group, write_dataset, write_processor

from musicflamingo.grpo import GRPOLit

ROOT = Path(__file__).resolve().parents[1]
TEXT_ONLY = 1  # index of the text-only record
SETTINGS = [
    "experiment=grpo",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "debug=fast",
    "+model.rewards.short={_target_:test_grpo.PrefersShort,weight:1.0}",
    "model.rollout.max_new_tokens=4",
    "model.loss.micro_batch_size=2",
    "model.loss.beta=0",  # the projector trains outside the LoRA adapters: no KL reference
    "model.net.freeze.multi_modal_projector=false",
    "data.batch_max_tokens=400",  # one record per batch
    "logger=csv",
]


class NoStandInGRPOLit(GRPOLit):
    """The reference of the exactness check: no stand-in audio pass (its run needs find_unused_parameters=true)."""

    def _stand_in_audio_loss(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)


def _data(root: Path) -> tuple[Path, Path]:
    """(processor, manifest): 4 records, one of them text-only, its prompt about as long as the audio ones' (the
    sampler sorts by length: a short one would be batched with another short one on the other rank)."""
    proc = write_processor(root / "proc")
    manifest = write_dataset(root / "data", n=4)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    del records[TEXT_ONLY]["audio"]
    records[TEXT_ONLY]["conversations"][0]["content"] = "What is a tone? " * 4
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return proc, manifest


def _train_split(proc: Path, manifest: Path) -> list[list[list[int]]]:
    """Each rank's training batches (manifest indices) as the run's data module gives them."""
    from types import SimpleNamespace

    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    split = []
    for rank in range(2):
        dm = MusicFlamingoDataModule(train=str(manifest), processor=str(proc), batch_max_tokens=400)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        dm.setup("fit")
        split.append([list(b) for b in dm.train_sampler])
    return split


def _train(root: Path, *extra: str, timeout: float = 150) -> Path:
    """train.py on two gloo processes; a hang is killed with its whole process group and fails the test."""
    proc, manifest = _data(root)
    ranks = _train_split(proc, manifest)
    # the case under test: at one step one rank's batch is the text-only record, the other's an audio one
    assert any((TEXT_ONLY in a) != (TEXT_ONLY in b) for a, b in zip(*ranks)), ranks
    run = root / "run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *SETTINGS,
        f"data.train={manifest}",
        f"data.processor={proc}",
        f"+model.net.overrides={TINY_OVERRIDES}",
        f"hydra.run.dir={run}",
        f"paths.log_dir={root / 'logs'}",
        *extra,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    run_in_own_group(cmd, env, timeout, "GRPO under DDP")
    return run


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    return ckpt["state_dict"]


def _metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "csv" / "metrics.csv")))


def test_text_only_micro_batch_with_a_trained_projector_does_not_hang(tmp_path):
    run = _train(tmp_path)
    weights = _weights(run)
    projector = {k: v for k, v in weights.items() if "multi_modal_projector" in k}
    assert projector and all(torch.isfinite(v).all() for v in projector.values())
    rows = _metrics(run)
    assert rows and "lr/multi_modal_projector" in rows[0], rows  # the projector trains
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_the_stand_in_pass_changes_no_weight_and_no_metric(tmp_path):
    """The same run with DDP finding the unused weights itself and no stand-in pass: the same weights, bit for bit,
    and the same logged metrics."""
    fixed = _train(tmp_path / "fixed")
    reference = _train(
        tmp_path / "reference",
        "trainer.strategy.find_unused_parameters=true",
        "model._target_=test_grpo_review15.NoStandInGRPOLit",
    )
    a, b = _weights(fixed), _weights(reference)
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, changed
    keys = ("train/loss", "train/reward", "train/grad_norm", "train/clip_fraction")
    rows_a = [{k: r.get(k) for k in keys} for r in _metrics(fixed) if r.get("train/loss")]
    rows_b = [{k: r.get(k) for k in keys} for r in _metrics(reference) if r.get("train/loss")]
    assert rows_a == rows_b and len(rows_a) == 2

"""Resuming is exact: a stopped + resumed run trains the batches, steps and random draws of an uninterrupted one
(checkpoints at an epoch's end with DataLoader workers, last.ckpt at the final step, RNG states)."""

from __future__ import annotations

import csv
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.callbacks import TrainingInterrupted
from musicflamingo.training import train


class BatchIds(L.Callback):
    """Test probe (instantiated from the config): the sample ids of every training step, and the step of every
    checkpoint written, as JSON lines in `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _add(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        ids = list(batch.get("ids", []))
        self._add({"step": trainer.global_step, "epoch": trainer.current_epoch, "ids": ids})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:  # noqa: ANN001
        self._add({"save": trainer.global_step})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    # 8 clips: 4 batches per epoch at 800 tokens
    return write_processor(root / "proc"), write_dataset(root / "data", n=8)


COMMON = [
    "export=false",
    "trainer.log_every_n_steps=1",
    "data.batch_max_tokens=800",
    "model.scheduler.max_steps=12",
    "model.scheduler.warmup_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=4",
]
DROPOUT = "++model.net.overrides={audio:{max_source_positions:100,dropout:0.1},text:{attention_dropout:0.1}}"


def _run(tmp: Path, name: str, assets, overrides: list[str]) -> tuple[dict, list[dict]]:  # noqa: ANN001
    proc, manifest = assets
    log = tmp / f"{name}.jsonl"
    probe = [f"+callbacks.ids._target_={__name__}.BatchIds", f"+callbacks.ids.path={log}"]
    _, objects = train(compose_train(tmp / name, manifest, proc, COMMON + overrides + probe))
    return objects, [json.loads(line) for line in log.read_text().splitlines()]


def _steps(records: list[dict]) -> list[tuple[int, int, list[str]]]:
    return [(r["step"], r["epoch"], r["ids"]) for r in records if "step" in r]


def _weights(objects: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in objects["model"].model.state_dict().items()}


def _assert_same_weights(a: dict, b: dict) -> None:
    """`a`, `b`: train() objects, or (`a`) the weights an `uninterrupted` run kept."""
    wa = a if "model" not in a else _weights(a)
    wb = _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@dataclass(frozen=True)
class Straight:
    run: Path  # the run folder (metrics.csv under csv/)
    records: list[dict]  # the BatchIds probe's lines
    weights: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):  # noqa: ANN001
    """The uninterrupted run of a setting, trained once per module: the parametrizations that stop at different
    steps compare their resumed runs against the same one (a fresh `train()` of the same overrides, as before).
    Only what the tests read is kept (no trainer: its persistent DataLoader workers would outlive the run)."""
    made: dict[tuple[str, ...], Straight] = {}

    def get(overrides: list[str]) -> Straight:
        key = tuple(overrides)
        if key not in made:
            tmp = tmp_path_factory.mktemp("straight")
            objects, records = _run(tmp, "a", assets, overrides)
            made[key] = Straight(tmp / "a" / "run", records, _weights(objects))
        return made[key]

    return get


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize(
    "limit",
    [
        (["trainer.max_steps=-1", "trainer.max_epochs=1"], ["trainer.max_steps=-1", "trainer.max_epochs=3"]),
        (["trainer.max_steps=4"], ["trainer.max_steps=12"]),
    ],
    ids=["max_epochs", "max_steps"],
)
def test_resuming_from_an_epochs_last_batch_trains_the_next_epoch(workers, limit, assets, tmp_path):
    """A checkpoint at an epoch's last batch (every_n_train_steps on the boundary): the resumed run trains the
    next epoch, also when DataLoader workers start fetching before Lightning sets the epoch."""
    first, full = limit
    w = [f"data.num_workers={workers}"]
    a, straight = _run(tmp_path, "a", assets, w + full)
    _run(tmp_path, "b", assets, w + first)
    b, resumed = _run(tmp_path, "b", assets, w + full)
    assert len(_steps(straight)) == 12
    assert _steps(resumed) == _steps(straight)
    assert b["trainer"].global_step == 12 and b["trainer"].current_epoch == a["trainer"].current_epoch
    _assert_same_weights(a, b)


def test_last_ckpt_holds_the_final_step_of_a_run_ending_between_saves(assets, tmp_path):
    """max_steps=6 with saves every 4 steps: last.ckpt at step 6 (once), continuing it to 12 trains steps 6-11 as
    an uninterrupted run does; a run ending on a periodic save writes nothing more at the end."""
    a, straight = _run(tmp_path, "a", assets, ["trainer.max_steps=12"])
    _, first = _run(tmp_path, "b", assets, ["trainer.max_steps=6"])
    last = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    saves = [r["save"] for r in first if "save" in r]
    assert saves.count(6) == 1, saves
    b, resumed = _run(tmp_path, "b", assets, ["trainer.max_steps=12"])
    assert [s for s in _steps(resumed) if s[0] >= 6] == [s for s in _steps(straight) if s[0] >= 6]
    assert [s[0] for s in _steps(resumed)] == list(range(12))  # the first run's 6, then the continuation's 6
    _assert_same_weights(a, b)
    saves = [r["save"] for r in straight if "save" in r]
    assert saves.count(12) == saves.count(4), saves  # the periodic save at 12 is the last one


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("stop", [4, 6], ids=["epoch_end", "mid_epoch"])
def test_resumed_run_with_dropout_draws_the_uninterrupted_runs_masks(
    stop, workers, assets, tmp_path, uninterrupted
):
    """Dropout > 0: the RNG states travel in the checkpoint, so the resumed run's losses and weights are the
    uninterrupted run's exactly, for a checkpoint at an epoch's end (4) and inside an epoch (6)."""
    w = [DROPOUT, f"data.num_workers={workers}"]
    a = uninterrupted(w + ["trainer.max_steps=8"])
    _run(tmp_path, "b", assets, w + [f"trainer.max_steps={stop}"])
    b, _ = _run(tmp_path, "b", assets, w + ["trainer.max_steps=8"])
    assert b["trainer"].global_step == 8
    la, lb = _losses(a.run), _losses(tmp_path / "b" / "run")
    assert la[stop:] == lb[-(8 - stop) :], (la, lb)
    _assert_same_weights(a.weights, b)


def _losses(run: Path) -> list[float]:
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


class SignalAt(L.Callback):
    """Test probe: SIGTERM to this process during the training step that ends at global step `step` (as `kill`
    sends it mid-run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def _stopped_by_sigterm(tmp: Path, name: str, assets, overrides: list[str], step: int) -> None:  # noqa: ANN001
    signal_at = [f"+callbacks.sig._target_={__name__}.SignalAt", f"+callbacks.sig.step={step}"]
    with pytest.raises(TrainingInterrupted, match=f"SIGTERM at step {step}"):
        _run(tmp, name, assets, overrides + signal_at)


def _rows(run: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of every metrics.csv row holding `key`."""
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def test_sigterm_stop_logs_the_stop_steps_metrics_and_the_resumed_csv_continues_it(assets, tmp_path):
    """The stop step's row is in metrics.csv (the checkpoint holds that step), and the resumed run continues the
    file: every step once, with the uninterrupted run's losses."""
    _run(tmp_path, "a", assets, ["trainer.max_steps=8"])
    _stopped_by_sigterm(tmp_path, "b", assets, ["trainer.max_steps=8"], step=5)
    last = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5
    assert [s for s, _ in _rows(tmp_path / "b" / "run")] == [0, 1, 2, 3, 4]  # logged steps: global step - 1
    _run(tmp_path, "b", assets, ["trainer.max_steps=8"])
    assert _rows(tmp_path / "b" / "run") == _rows(tmp_path / "a" / "run")


def test_dataloaders_draw_nothing_from_the_global_torch_rng(assets, tmp_path):
    """Each DataLoader has its own generator, seeded from (seed, epoch, rank): making an iterator (every epoch,
    every validation) leaves the global stream that dropout draws from alone, and the same epoch gets the same
    base seed (DataLoader workers' seeds) however many iterators came before."""
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    proc, manifest = assets
    dm = MusicFlamingoDataModule(manifest, val=manifest, processor=proc, batch_max_tokens=800, seed=3)
    dm.setup("fit")
    train_dl, val_dl = dm.train_dataloader(), dm.val_dataloader()
    before = torch.get_rng_state()
    seeds = []
    for epoch in (0, 1, 0):
        dm.train_sampler.set_epoch(epoch)
        seeds.append(iter(train_dl)._base_seed)
        iter(val_dl)
    assert torch.equal(torch.get_rng_state(), before)
    assert seeds[0] == seeds[2] != seeds[1]


VAL = ["trainer.val_check_interval=2", "trainer.max_steps=8", DROPOUT]


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("stop", [4, 6], ids=["epoch_end", "mid_epoch"])
def test_run_validating_inside_epochs_stopped_at_a_validation_step_resumes_the_same_losses(
    stop, workers, assets, tmp_path, uninterrupted
):
    """Validation every 2 steps and dropout: SIGTERM at a step followed by validation, then resume; the training
    losses of every step are the uninterrupted run's. (With persistent workers the uninterrupted run made its
    validation iterator once, at step 2, where the resumed run makes it again: no draw may come from it.)"""
    proc, manifest = assets
    val = [f"data.val={manifest}", f"data.num_workers={workers}"]
    straight = uninterrupted(val + VAL)
    _stopped_by_sigterm(tmp_path, "b", assets, val + VAL, step=stop)
    _run(tmp_path, "b", assets, val + VAL)
    a, b = _rows(straight.run), _rows(tmp_path / "b" / "run")
    assert [r for r in b if r[0] >= stop] == [r for r in a if r[0] >= stop]  # the resumed run's steps
    assert [s for s, _ in _rows(straight.run, "val/loss")] == [1, 3, 5, 7]


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("stop", [4, 3], ids=["epoch_end", "mid_epoch"])
def test_resume_with_limit_train_batches_trains_the_uninterrupted_batches(
    stop, workers, assets, tmp_path, uninterrupted
):
    """limit_train_batches=2 of the sampler's 4: each epoch ends after 2 batches (Lightning's epoch), the next
    starts the next sampler epoch; a run stopped at such an end (or inside) and resumed trains the same batches
    with the same losses (dropout on)."""
    w = ["+trainer.limit_train_batches=2", DROPOUT, f"data.num_workers={workers}"]
    a = uninterrupted(w + ["trainer.max_steps=8"])
    _run(tmp_path, "b", assets, w + [f"trainer.max_steps={stop}"])
    b, resumed = _run(tmp_path, "b", assets, w + ["trainer.max_steps=8"])
    assert [s[1] for s in _steps(a.records)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert _steps(resumed) == _steps(a.records)
    assert _rows(tmp_path / "b" / "run") == _rows(a.run)
    _assert_same_weights(a.weights, b)

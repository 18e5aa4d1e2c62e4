"""The training run a researcher launches, beyond test_train.py / test_resume.py: DDP on two CPU processes logs what
one process accumulating the same batches logs; a resume whose settings the checkpoint cannot take (devices, batch
budget, seed, data, trained parts, optimizer settings) is refused naming the setting; loggers and callbacks as
configured (no duplicated learning-rate rows, a W&B run continued by its resume, an entry without a `_target_`
refused); checkpoint files readable as the umask allows."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.callbacks import TrainingInterrupted, atomic_torch_save
from musicflamingo.lit import CheckpointMismatchError
from musicflamingo.settings import SettingsError
from musicflamingo.training import train

TESTS = Path(__file__).resolve().parent
COMMON = [
    "export=false",
    "trainer.log_every_n_steps=1",
    "data.batch_max_tokens=800",
    "model.scheduler.max_steps=8",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("journey")
    # 8 clips: 4 batches per epoch at 800 tokens; a 6-clip manifest for "the data changed"
    return write_processor(root / "proc"), write_dataset(root / "data", n=8), write_dataset(root / "six", n=6)


def _run(tmp: Path, assets, overrides: list[str]) -> dict:  # noqa: ANN001
    proc, manifest, _ = assets
    _, objects = train(compose_train(tmp, manifest, proc, COMMON + overrides))
    return objects


def _rows(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "csv" / "metrics.csv")))


def _step_metrics(run: Path) -> list[tuple[int, float, float, float]]:
    """(step, train/loss, train/label_tokens, lr of the decoder) of every row holding a loss."""
    return [
        (
            int(r["step"]),
            float(r["train/loss"]),
            float(r["train/label_tokens"]),
            float(r["lr/language_model"]),
        )
        for r in _rows(run)
        if r.get("train/loss")
    ]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_logs_and_trains_as_one_process_accumulating_its_batches(ddp_four_steps, tmp_path):
    """2 gloo processes take the global batches [2k, 2k+1] at step k, as one process with accumulate_grad_batches=2
    does: the same weights, and the same logged step metrics (train/loss the mean over both batches, not rank 0's
    alone; label tokens their sum; the learning rate the step used), one row per step, one set of checkpoints.
    Resumed on one process, the checkpoint is refused naming the device count. (The DDP run: conftest's
    ddp_four_steps, 4 steps with this file's COMMON settings, shared with test_train.py.)"""
    run, out, proc, manifest = ddp_four_steps
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainer.max_steps=4" in out.args and all(c in out.args for c in COMMON), out.args
    ddp_assets = (proc, manifest, None)
    one = _run(tmp_path / "one", ddp_assets, ["trainer.max_steps=4", "trainer.accumulate_grad_batches=2"])
    assert one["trainer"].global_step == 4
    ddp, single = _step_metrics(run), _step_metrics(tmp_path / "one" / "run")
    assert [s for s, *_ in ddp] == [0, 1, 2, 3]
    for a, b in zip(ddp, single, strict=True):
        assert a == pytest.approx(b, rel=1e-5), (ddp, single)
    assert single[0][3] == pytest.approx(
        1e-3, rel=1e-6
    )  # step 0 trains at the configured rate (no warmup): the rate it used
    assert len(_rows(run)) == 4 and not [k for k in _rows(run)[0] if k.startswith("lr-")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    wa, wb = (
        _weights(run / "checkpoints" / "last.ckpt"),
        _weights(tmp_path / "one" / "run" / "checkpoints" / "last.ckpt"),
    )
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    copy = tmp_path / "ddp"
    shutil.copytree(run, copy)  # the shared run folder stays as the DDP run left it
    with pytest.raises(CheckpointMismatchError, match=r"2 data-parallel processes \(trainer.devices.*give 1"):
        train(
            compose_train(
                tmp_path,
                manifest,
                proc,
                COMMON + ["trainer.max_steps=6", f"paths.output_dir={copy}"],
            )
        )


# ---------------------------------------------------------------------------------------------- resume refusals
@pytest.fixture(scope="module")
def two_steps(assets, tmp_path_factory):
    """A run stopped by max_steps at step 2 (its folder is copied by each test that resumes it)."""
    tmp = tmp_path_factory.mktemp("two_steps")
    _run(tmp, assets, ["trainer.max_steps=2"])
    return tmp / "run"


def _resume(two_steps: Path, tmp: Path, assets, overrides: list[str]) -> dict:  # noqa: ANN001
    import shutil

    shutil.copytree(two_steps, tmp / "run")
    return _run(tmp, assets, ["trainer.max_steps=3", *overrides])


@pytest.mark.parametrize(
    "override, named",
    [
        (
            "model.net.freeze.audio_tower=true",
            r"it trained audio_tower, language_model, multi_modal_projector, the "
            r"settings now train language_model, multi_modal_projector \(model.net.freeze",
        ),
        (
            "model.optimizer.weight_decay=0.5",
            r"weight_decay=0.01, the settings now give 0.5 \(model.optimizer",
        ),
        ("model.optimizer.betas=[0.9,0.99]", r"betas=\[0.9, 0.95\], the settings now give \[0.9, 0.99\]"),
        ("model.optimizer.eps=1e-6", r"eps=1e-08, the settings now give 1e-06 \(model.optimizer.eps\)"),
        ("data.batch_max_tokens=1000", r"data.batch_max_tokens=800, the settings now give 1000"),
        ("seed=3", r"data.seed=0 \(default: seed\), the settings now give 3"),
        ("six", r"8 training samples per epoch \(data.train.*give 6"),
    ],
    ids=["freeze", "weight_decay", "betas", "eps", "batch_max_tokens", "seed", "manifest"],
)
def test_a_resume_the_checkpoint_cannot_take_is_refused_naming_the_setting(
    override, named, two_steps, assets, tmp_path
):
    """Each was a torch traceback (another set of trained parts), a silent change (the optimizer's weight decay,
    betas and eps are restored from the checkpoint, as its learning rates are, which were already refused), or a
    sampler error naming its own field ("max_tokens was 800 when saved"); the checkpoint is kept."""
    if override == "six":
        override = f"data.train={assets[2]}"
    before = (tmp_path / "run" / "checkpoints" / "last.ckpt", None)
    with pytest.raises(CheckpointMismatchError, match=named):
        _resume(two_steps, tmp_path, assets, [override])
    assert torch.load(before[0], weights_only=True)["global_step"] == 2


def test_a_resume_under_the_same_settings_goes_on(two_steps, assets, tmp_path):
    """The checks let the unchanged settings through (and settings the checkpoint does not fix: clipping), without
    Lightning's "Checkpoint directory ... exists and is not empty" warning (a resume writes there by design)."""
    import warnings

    from musicflamingo.runtime import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        objects = _resume(two_steps, tmp_path, assets, ["trainer.gradient_clip_val=0.5"])
    assert objects["trainer"].global_step == 3
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]


def test_a_resume_under_another_lr_schedule_says_so(assets, tmp_path, caplog):
    """model.scheduler.max_steps follows trainer.max_steps: continuing a 2-step run to 4 stretches the cosine, the
    rate jumping at step 2 (it was silent); the same schedule resumes without a word."""
    common = ["model.scheduler.max_steps=${trainer.max_steps}", "model.scheduler.min_lr_ratio=0.1"]
    _run(tmp_path, assets, [*common, "trainer.max_steps=2"])
    with caplog.at_level(logging.WARNING, logger="musicflamingo.lit"):
        _run(tmp_path, assets, [*common, "trainer.max_steps=4"])
    warned = [r.getMessage() for r in caplog.records if "schedule differs" in r.getMessage()]
    assert len(warned) == 1 and "model.scheduler.max_steps 2 -> 4" in warned[0], warned
    assert "model.scheduler.max_steps=2 keeps" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.lit"):
        _run(tmp_path, assets, ["model.scheduler.max_steps=4", "trainer.max_steps=5"])
    assert not [r for r in caplog.records if "schedule differs" in r.getMessage()]


# ---------------------------------------------------------------------------------------------- loggers, callbacks
@pytest.mark.parametrize(
    "override, named",
    [
        (
            "+callbacks.early_stopping.monitor=val/loss",
            r"callbacks.early_stopping=.*no _target_.*EarlyStopping",
        ),
        ("+callbacks.model_checkpint.every_n_train_steps=1", r"did you mean callbacks.model_checkpoint\?"),
        ("+logger.wandb.project=x", r"logger.wandb=.*pass logger=wandb, or logger=\[csv,wandb\]"),
    ],
    ids=["early_stopping", "typo", "logger_option"],
)
def test_a_callback_or_logger_without_a_target_is_refused_before_training(override, named, assets, tmp_path):
    """Such an entry was skipped silently: the run went on without the early stopping (or checkpoint setting, or
    logger) the command asked for."""
    with pytest.raises(SettingsError, match=named):
        _run(tmp_path, assets, ["trainer.max_steps=2", override])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_starts_another(assets, tmp_path):
    """logger=wandb (offline): the resume logs to the W&B run of the first part (a new run at every resume split
    the curves); a fresh start in the folder (no checkpoint) opens a new one."""
    import wandb

    def ids() -> list[str]:
        # The run id names the transaction log inside each folder; the folder name is not enough: a run started in
        # the same second as an earlier one gets a "-1" suffix there.
        return sorted(
            f.stem.removeprefix("run-")
            for f in (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
        )

    try:
        _run(tmp_path, assets, ["logger=wandb", "trainer.max_steps=2"])
        wandb.finish()
        first = ids()
        _run(tmp_path, assets, ["logger=wandb", "trainer.max_steps=3"])
        wandb.finish()
        assert len(first) == 1 and ids() == first * 2
        import shutil

        shutil.rmtree(tmp_path / "run" / "checkpoints")
        _run(tmp_path, assets, ["logger=wandb", "trainer.max_steps=2"])
        wandb.finish()
        assert len(set(ids())) == 2
    finally:
        wandb.finish()


class _SignalAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_signal_stop_prints_no_lightning_weights_only_line(assets, tmp_path, caplog):
    """The stop's checkpoint is a full one, said so to Lightning (unset, it logged "`weights_only` was not set,
    defaulting to `False`." beside the stop's message)."""
    probe = [f"+callbacks.sig._target_={__name__}._SignalAt", "+callbacks.sig.step=2"]
    with caplog.at_level(logging.INFO), pytest.raises(TrainingInterrupted, match="SIGINT at step 2"):
        _run(tmp_path, assets, ["trainer.max_steps=4", *probe])
    assert not [r for r in caplog.records if "weights_only" in r.getMessage()]


def test_checkpoint_files_are_readable_as_the_umask_allows(tmp_path):
    """atomic_torch_save wrote through mkstemp's 0600 file: a checkpoint others of the group could not read, unlike
    torch.save's."""
    old = os.umask(0o022)
    try:
        atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "a.ckpt")
        torch.save({"x": torch.zeros(1)}, tmp_path / "b.ckpt")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.ckpt").stat().st_mode) == 0o644


def test_exported_weights_are_readable_as_the_umask_allows(tmp_path):
    """safetensors writes owner-only (0600) files: an export's weights others of the group could not read, next to
    its 0644 config.json."""
    from tiny_checkpoint import write_tiny_checkpoint

    from musicflamingo import MusicFlamingo

    model = MusicFlamingo.from_pretrained(write_tiny_checkpoint(tmp_path / "ck"))
    old = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "one")
        model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    finally:
        os.umask(old)
    files = [*(tmp_path / "one").iterdir(), *(tmp_path / "sharded").glob("*.safetensors")]
    assert len(files) > 4 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o644}


def test_a_validation_interval_longer_than_an_epoch_is_a_settings_error(assets, tmp_path):
    """Lightning's ValueError at the fit's start came out as a traceback; it is one settings error with the fix."""
    proc, manifest, _ = assets
    with pytest.raises(
        SettingsError, match=r"trainer.val_check_interval=100: .*check_val_every_n_epoch=null"
    ):
        _run(
            tmp_path,
            assets,
            [f"data.val={manifest}", "trainer.val_check_interval=100", "trainer.max_steps=2"],
        )

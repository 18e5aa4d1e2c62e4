"""Review 19, training on a small data set: no misleading Lightning warning about the logging interval (rows are
logged every trainer.log_every_n_steps steps across epochs), a run bounded by trainer.max_epochs shows its real
number of steps and ETA in the progress lines (was the default trainer.max_steps=1000), a missing
model.net.init_from is named as that setting, a mistyped EarlyStopping mode is refused before the model is built."""

from __future__ import annotations

import logging
import warnings

import pytest
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.runtime import quiet_known_warnings
from musicflamingo.training import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("train_small")
    # 4 clips at 800 tokens a batch: a few batches an epoch, fewer than trainer.log_every_n_steps (10)
    return write_processor(root / "proc"), write_dataset(root / "data", n=4)


@pytest.fixture(scope="module")
def by_epochs(data, tmp_path_factory):  # noqa: ANN001, ANN201
    """Two epochs of the small set (trainer.max_steps left at its default), a progress line every step: the
    warnings shown (as train.py filters them), the progress lines and the trainer."""
    proc, manifest = data
    tmp = tmp_path_factory.mktemp("by_epochs")
    overrides = [
        "export=false",
        "data.batch_max_tokens=800",
        "trainer.max_epochs=2",
        "model.scheduler.max_steps=-1",  # the schedule's length from the trainer, as a run by epochs sets it
        "callbacks.progress_log.every_n_steps=1",
    ]
    cfg = compose_train(tmp, manifest, proc, overrides)
    assert cfg.trainer.max_steps == 1000 and cfg.trainer.log_every_n_steps == 10  # the defaults this is about
    handler, logger = _Lines(), logging.getLogger("musicflamingo.callbacks")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_warnings()  # `simplefilter` above reset the filters
            _, objects = train(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return {
        "warnings": [str(w.message) for w in caught],
        "lines": handler.lines,
        "trainer": objects["trainer"],
    }


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_small_data_set_shows_no_logging_interval_warning(by_epochs):  # noqa: ANN001
    """Fewer batches an epoch than log_every_n_steps: Lightning warned to lower log_every_n_steps "to see logs for
    the training epoch", though the rows are logged every 10 steps across epochs (nothing is lost)."""
    trainer = by_epochs["trainer"]
    assert trainer.num_training_batches < trainer.log_every_n_steps  # the case Lightning warns about
    noise = [w for w in by_epochs["warnings"] if "smaller than the logging interval" in w]
    assert not noise, noise


@pytest.mark.parametrize("plan", [False, True], ids=["run", "plan"])
def test_a_missing_init_from_names_the_setting(data, tmp_path, plan):  # noqa: ANN001
    """`model.net.init_from=/nonexistent` failed as `/nonexistent: checkpoint folder does not exist` (from the
    planner's read of its config.json), without the setting; load_config's hints stay (a file given for the
    folder names the folder to use)."""
    from musicflamingo.settings import SettingsError

    proc, manifest = data
    missing = tmp_path / "nonexistent"
    extra = ["plan=true"] if plan else []
    cfg = compose_train(tmp_path, manifest, proc, [f"model.net.init_from={missing}", *extra])
    with pytest.raises(
        SettingsError, match=rf"^model.net.init_from: {missing}: checkpoint folder does not exist"
    ):
        train(cfg)
    weights = tmp_path / "export" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    cfg = compose_train(tmp_path, manifest, proc, [f"model.net.init_from={weights}", *extra])
    with pytest.raises(
        SettingsError, match=rf"^model.net.init_from: {weights} is a file.*here {weights.parent}"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setting, named",
    [
        ("mode=minn", r"callbacks.early_stopping.mode='minn': expected 'min' or 'max'"),
        ("strict=yes", r"callbacks.early_stopping.strict='yes': expected true or false"),
    ],
)
def test_a_mistyped_early_stopping_setting_is_refused_before_the_model_is_built(
    data, tmp_path, monkeypatch, setting, named
):  # noqa: ANN001
    """EarlyStopping(mode='minn') passed the settings check and Lightning refused it as the trainer was built,
    after the model; `strict=yes` (text) was taken as true."""
    from musicflamingo import training
    from musicflamingo.settings import SettingsError

    def built(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model and the data were about to be built")

    monkeypatch.setattr(training, "_fit", built)
    proc, manifest = data
    stop = "+callbacks.early_stopping"
    overrides = [
        f"{stop}._target_=lightning.pytorch.callbacks.EarlyStopping",
        f"{stop}.monitor=train/loss",
        f"{stop}.{setting}",
    ]
    cfg = compose_train(tmp_path, manifest, proc, overrides)
    with pytest.raises(SettingsError, match=f"^{named}"):
        train(cfg)


def test_a_run_by_epochs_shows_its_own_number_of_steps(by_epochs):  # noqa: ANN001
    """trainer.max_epochs=2 ends the run after 2 epochs of a few batches: the progress lines said `step k/1000` (the
    default max_steps) with an ETA for 1000 steps; they count to the step the run ends at, the last ETA 0:00."""
    trainer, lines = by_epochs["trainer"], by_epochs["lines"]
    last = trainer.global_step
    assert last == 2 * trainer.num_training_batches < 1000  # ended by the epochs
    assert f"training from step 0 to {last}" in lines, lines
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == [f"step {k}/{last}" for k in range(1, last + 1)], steps
    assert steps[-1].endswith("| ETA 0:00"), steps[-1]


@pytest.mark.parametrize(
    "max_steps, max_epochs, per, expected",
    [
        (1000, 2, 1, 6),  # the epochs end it first
        (4, 2, 1, 4),  # max_steps first
        (-1, 2, 1, 6),
        (1000, 2, 3, 18),  # GRPO: 3 optimizer steps a batch
        (10, 2, 3, 10),  # ... capped by max_steps, which counts those steps
        (12, -1, 3, 12),
        (-1, -1, 1, None),  # only trainer.max_time ends it
    ],
)
def test_the_progress_total_counts_optimizer_steps(max_steps, max_epochs, per, expected):  # noqa: ANN001
    """The total of the progress line, taken at the start of a real fit (3 batches an epoch, the fit stopped there):
    the module's optimizer steps a batch count, as the schedule by epochs counts them (lit.configure_optimizers)."""
    import lightning as L
    import torch

    from musicflamingo.lit import total_steps

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(1, 1)
            self.optimizer_steps_per_batch = per

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.w(batch.float()).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []

    class Total(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            seen.append(total_steps(trainer, pl_module))
            trainer.should_stop = True

    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Total()],
    )
    trainer.fit(Net(), torch.utils.data.DataLoader(torch.ones(3, 1), batch_size=1))
    assert seen == [expected]


@pytest.mark.parametrize(
    "length, max_steps, max_epochs, batches, warned",
    [
        (
            1000,
            1000,
            1,
            3,
            True,
        ),  # the default cosine (model.scheduler.max_steps follows trainer.max_steps), one epoch
        (1000, -1, 2, 3, True),
        (6, 1000, 2, 3, False),  # sized to the run
        (1000, 4, 1, 300, False),  # trainer.max_steps ends it first: a shorter run the user asked for
        (-1, 1000, 1, 3, False),  # sized by the epochs
    ],
)
def test_a_schedule_longer_than_the_epochs_is_warned(length, max_steps, max_epochs, batches, warned, caplog):  # noqa: ANN001
    """A run ended by trainer.max_epochs before model.scheduler.max_steps finished with its learning rate still near
    the peak, and nothing said so: configure_optimizers warns and names model.scheduler.max_steps=-1."""
    import functools
    import logging
    import types

    import torch

    from musicflamingo.lit import MusicFlamingoLit, warmup_cosine

    stand_in = types.SimpleNamespace(
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        param_groups=lambda: [torch.nn.Parameter(torch.zeros(1))],
        scheduler=functools.partial(warmup_cosine, warmup_steps=0, max_steps=length, min_lr_ratio=0.1),
        optimizer_steps_per_batch=1,
        trainer=types.SimpleNamespace(
            estimated_stepping_batches=batches * max_epochs
            if max_steps == -1
            else min(max_steps, batches * max_epochs),
            max_steps=max_steps,
            max_epochs=max_epochs,
            is_global_zero=True,
        ),
    )
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        out = MusicFlamingoLit.configure_optimizers(stand_in)
    said = [r.getMessage() for r in caplog.records if "learning-rate schedule" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "model.scheduler.max_steps=-1" in said[0] and f"at step {batches * max_epochs}" in said[0]
    if length < 0:
        assert stand_in._schedule["max_steps"] == batches * max_epochs
    assert out["lr_scheduler"]["interval"] == "step"

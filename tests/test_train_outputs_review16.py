"""Review 16, what a training run writes: metrics rows of skipped steps, the bad-sample stop's messages."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo import MusicFlamingo
from musicflamingo.data.dataset import TooManyBadSamplesError
from musicflamingo.training import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    manifest = write_dataset(root / "data16", n=16)
    # one good clip and 19 records whose audio is missing
    good = json.loads(write_dataset(root / "data1", n=1).read_text())
    good["audio"] = str(root / "data1" / good["audio"])
    bad = [{**good, "id": f"b{i}", "audio": str(root / f"missing{i}.wav")} for i in range(19)]
    (root / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]))
    return {"proc": write_processor(root / "proc"), "manifest": manifest, "bad": root / "bad.jsonl"}


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def _nan_on_forward(monkeypatch, which: set[int]) -> None:
    """The training loss is NaN on the given training forwards (1-based)."""
    calls = {"n": 0}
    forward = MusicFlamingo.forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and kwargs.get("labels") is not None:
            calls["n"] += 1
            if calls["n"] in which:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MusicFlamingo, "forward", patched)


def test_a_skipped_step_logs_no_loss_of_its_own(assets, tmp_path, monkeypatch):
    """model.nonfinite_loss=skip, several batches an epoch: the skipped step's metrics.csv row repeated the previous
    step's train/loss, train/label_tokens and train/grad_norm (Lightning writes every value it still holds), as if
    it had trained on the same batch again. Its row now has none of them, the counter says it was skipped, and the
    steps after it log their own."""
    _nan_on_forward(monkeypatch, {4, 8})  # the 8th forward: the resumed run's second
    overrides = [
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "model.nonfinite_loss=skip",
        "data.batch_max_tokens=800",  # several batches an epoch: Lightning resets its values per epoch only
        "export=false",
        "threads=1",
    ]
    train(compose_train(tmp_path, assets["manifest"], assets["proc"], overrides))
    rows = [r for r in _rows(tmp_path / "run") if "train/tokens_per_s" in r]
    assert [int(r["step"]) for r in rows] == list(range(6))
    assert int(rows[3]["epoch"]) == 0  # the skipped step is inside the first epoch
    step_metrics = ("train/loss", "train/label_tokens", "train/grad_norm")
    skipped = rows[3]
    assert skipped.get("train/nonfinite_steps") == "1.0"
    assert not any(k in skipped for k in step_metrics), skipped
    assert all(k in r for r in rows[:3] + rows[4:] for k in step_metrics)
    assert all("train/nonfinite_steps" not in r for r in rows[:3])
    # a cumulative count: the rows after it still say one step was skipped
    assert all(r.get("train/nonfinite_steps") == "1.0" for r in rows[4:])
    assert all(any(k.startswith("lr/") for k in r) for r in rows)

    # resumed to 9 steps: the count goes on from the checkpoint's (it restarted at 0: the next skip logged 1)
    resumed = [*overrides[:1], "trainer.max_steps=9", *overrides[1:]][1:]
    _, obj = train(compose_train(tmp_path, assets["manifest"], assets["proc"], resumed))
    assert obj["model"].nonfinite_steps == 2
    rows = [r for r in _rows(tmp_path / "run") if "train/tokens_per_s" in r]
    assert [int(r["step"]) for r in rows] == list(range(9))
    assert [r.get("train/nonfinite_steps") for r in rows[6:]] == ["1.0", "2.0", "2.0"]
    assert "train/loss" in rows[6] and "train/loss" not in rows[7] and "train/loss" in rows[8]


def test_too_many_bad_samples_under_export_false_says_nothing_of_an_export(assets, tmp_path, caplog):
    """bad_sample_policy=skip, 19 of 20 clips missing, export=false: the stop said "the model is not exported"
    (none was asked for) and showed the first sample as a dataclass repr; the "skipped N of M training samples"
    warning came twice (the final step's checkpoint, then the run's end)."""
    overrides = [
        "data.bad_sample_policy=skip",
        "trainer.max_steps=2",
        "export=false",
        "threads=1",
    ]
    cfg = compose_train(tmp_path / "a", assets["bad"], assets["proc"], overrides)
    with caplog.at_level(logging.WARNING), pytest.raises(TooManyBadSamplesError) as info:
        train(cfg)
    msg = str(info.value)
    assert "19 of 20 samples were skipped" in msg and "checkpoints are kept" in msg
    assert "export" not in msg and "BadSample(" not in msg, msg
    assert f"{assets['bad']}:" in msg and "audio file not found" in msg
    warned = [r.getMessage() for r in caplog.records if "training samples; see" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("skipped 19 of 20 training samples"), warned
    run = tmp_path / "a" / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "export").exists()

    # export_adapters alone: the adapters are what the stop leaves out
    lora = [*overrides, "model.net.lora.enabled=true", "export_adapters=true"]
    with pytest.raises(TooManyBadSamplesError, match="; the adapters are not exported; checkpoints are kept"):
        train(compose_train(tmp_path / "b", assets["bad"], assets["proc"], lora))
    assert not (tmp_path / "b" / "run" / "export_adapter").exists()


def test_an_early_stop_says_why_the_run_ended_before_max_steps(assets, tmp_path, caplog):
    """An EarlyStopping callback (verbose=false, Lightning's default) ended a 30-step run at step 4 without a line
    saying so: the log went from "step 4/30 ... ETA 0:03" to "exported to". Now the stop and its reason are
    logged; a resume that runs to max_steps after an earlier early stop says nothing of it."""
    overrides = [
        f"data.val={assets['manifest']}",
        "data.batch_max_tokens=800",
        "trainer.max_steps=30",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "+callbacks.early_stopping={_target_:lightning.pytorch.callbacks.EarlyStopping,"
        "monitor:val/loss,patience:1,min_delta:100.0}",
        "export=false",
        "threads=1",
    ]
    with caplog.at_level(logging.INFO, logger="musicflamingo"):
        _, obj = train(compose_train(tmp_path, assets["manifest"], assets["proc"], overrides))
    step = obj["trainer"].global_step
    assert step == 4  # the first validation sets the best score, the second does not beat it by 100
    said = [r.getMessage() for r in caplog.records if "stopped early" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("training stopped early at step 4 of 30 by EarlyStopping: ")
    assert "val/loss did not improve" in said[0]

    caplog.clear()
    resumed = [*overrides[:2], "trainer.max_steps=5", *overrides[3:]]
    with caplog.at_level(logging.INFO, logger="musicflamingo"):
        _, obj = train(compose_train(tmp_path, assets["manifest"], assets["proc"], resumed))
    assert obj["trainer"].global_step == 5
    assert not [r for r in caplog.records if "stopped early" in r.getMessage()]


def test_a_stopped_run_says_so_in_its_log_file(assets, tmp_path, monkeypatch, capsys):
    """model.nonfinite_loss=stop: the run's log file (Hydra's train.log) ended with the last progress line, as a
    finished run's does; the reason was printed on the console only (`cli.run_cli`). The log files now end with
    it; the console handlers do not repeat it."""
    from musicflamingo.lit import NonFiniteLossError

    _nan_on_forward(monkeypatch, {2})
    log_file = tmp_path / "train.log"
    handler = logging.FileHandler(log_file)
    console = logging.StreamHandler()  # stderr, as a console handler
    root = logging.getLogger()
    root.addHandler(handler)
    root.addHandler(console)
    overrides = ["trainer.max_steps=4", "export=false", "threads=1"]
    try:
        with pytest.raises(NonFiniteLossError):
            train(compose_train(tmp_path, assets["manifest"], assets["proc"], overrides))
    finally:
        root.removeHandler(handler)
        root.removeHandler(console)
        handler.close()
    last = log_file.read_text().splitlines()[-1]
    assert last.startswith("run ended by NonFiniteLossError: loss is nan at global step 1"), last
    assert "run ended by" not in capsys.readouterr().err


def test_checkpoints_ranked_by_val_loss_are_ranked_by_their_own_validation(assets, tmp_path):
    """callbacks.model_checkpoint.monitor=val/loss with every_n_train_steps (the default config sets 100): each
    file was saved at its step's end, before that step's validation, and ranked by the previous validation's
    val/loss (top-k kept the wrong files); without data.val no file but last.ckpt was kept. Both are refused
    before anything is read, naming the setting; every_n_train_steps=null ranks each file by its own validation."""
    from musicflamingo.settings import SettingsError

    common = [
        "data.batch_max_tokens=800",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.check_val_every_n_epoch=null",
        "callbacks.model_checkpoint.monitor=val/loss",
        "callbacks.model_checkpoint.save_top_k=2",
        "export=false",
        "threads=1",
    ]
    val = f"data.val={assets['manifest']}"
    with pytest.raises(SettingsError, match=r"every_n_train_steps=3: .*previous validation's val/loss"):
        cfg = [*common, val, "callbacks.model_checkpoint.every_n_train_steps=3"]
        train(compose_train(tmp_path / "a", assets["manifest"], assets["proc"], cfg))
    with pytest.raises(SettingsError, match=r"monitor=val/loss: no validation set \(data.val\)"):
        cfg = [*common, "callbacks.model_checkpoint.every_n_train_steps=null"]
        train(compose_train(tmp_path / "b", assets["manifest"], assets["proc"], cfg))
    assert not (tmp_path / "a" / "run").exists() and not (tmp_path / "b" / "run").exists()

    cfg = [*common, val, "callbacks.model_checkpoint.every_n_train_steps=null"]
    _, obj = train(compose_train(tmp_path / "c", assets["manifest"], assets["proc"], cfg))
    ranked = {Path(p).name: float(v) for p, v in obj["trainer"].checkpoint_callback.best_k_models.items()}
    logged = [float(r["val/loss"]) for r in _rows(tmp_path / "c" / "run") if "val/loss" in r]
    assert len(logged) == 2  # after steps 3 and 6
    assert ranked == pytest.approx({"step_000003.ckpt": logged[0], "step_000006.ckpt": logged[1]})

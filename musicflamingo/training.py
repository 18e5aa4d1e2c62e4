"""`train(cfg)`: compose the objects a Hydra config describes and fit. `train.py` is a thin wrapper around it.

The run folder (`paths.output_dir`) holds everything of one run, for every rank: `run.lock` while a run uses it,
`.hydra/` (the config), `checkpoints/` (`last.ckpt` + periodic), `csv/` or other logger output,
`bad_samples.jsonl`, and `export/` (Hugging Face layout, LoRA merged) when training ends.

Before anything is read, `train` checks the settings (`musicflamingo.settings.check_train_settings`) and takes the
run folder's lock (`RunLock`); during the run SIGINT and SIGTERM stop at the next step with a checkpoint
(`callbacks.StopOnSignal`).

Lightning (and the callbacks and modules built on it) is imported by `train`, not with this module: `import
lightning` costs seconds (it imports torchmetrics, which imports scipy.signal, matplotlib and torchvision) that
`train.py --help`, `--cfg` and a command line refused before Hydra runs it (`cli.check_command_line`) need not pay.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from musicflamingo.checkpoint import check_save_target
from musicflamingo.data.dataset import TooManyBadSamplesError
from musicflamingo.model.peft_format import save_peft_adapter
from musicflamingo.planner import check_training, model_config
from musicflamingo.runfolder import (
    FolderInUseError,
    FolderLock,
    remove_interrupted_writes,
    save_run_config,
)
from musicflamingo.runtime import one_lightning_log_line, set_threads, stderr_is_terminal
from musicflamingo.settings import (
    CONFIG_DIR,
    SettingsError,
    check_targets,
    check_train_paths,
    check_train_settings,
)

if TYPE_CHECKING:
    import lightning as L

    from musicflamingo.callbacks import StopOnSignal

log = logging.getLogger(__name__)


class RunFolderInUseError(FolderInUseError):
    """Another live `train.py` holds the run folder's lock (the message names its pid)."""


class RunLock(FolderLock):
    """`<run folder>/run.lock` (`runfolder.FolderLock`; under DDP only the launching rank 0 takes it)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        super().__init__(
            folder, "run.lock", "train.py", "pass hydra.run.dir=<another folder>", RunFolderInUseError
        )


def is_launching_rank() -> bool:
    """True unless this process is a rank > 0 of a distributed run (Lightning's DDP children, torchrun)."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


# Groups whose entries are objects Hydra builds, each `<group>.<name>: {_target_: ..., ...}` or null (switched off).
OBJECT_GROUPS = ("callbacks", "logger")
_EXAMPLE_TARGET = {
    "callbacks": "lightning.pytorch.callbacks.EarlyStopping",
    "logger": "lightning.pytorch.loggers.TensorBoardLogger",
}


def check_object_groups(settings: Mapping[str, Any]) -> None:
    """Every entry of `callbacks` and `logger` is an object to build (a `_target_`) or null: one without a
    `_target_` (`+callbacks.early_stopping.monitor=val/loss`, `+callbacks.model_checkpint.every_n_train_steps=5`)
    would be skipped silently, the run going on without the callback the command asked for."""
    for group in OBJECT_GROUPS:
        entries = settings.get(group)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise SettingsError(
                f"{group}={entries!r}: expected named objects ({group}.<name>._target_=...) or null"
            )
        built = sorted(k for k, v in entries.items() if isinstance(v, Mapping) and "_target_" in v)
        for name, entry in entries.items():
            if entry is None or (isinstance(entry, Mapping) and "_target_" in entry):
                continue
            close = difflib.get_close_matches(str(name), built, n=1)
            hint = f"did you mean {group}.{close[0]}? Else add" if close else "add"
            if (CONFIG_DIR / group / f"{name}.yaml").is_file():  # the group's option, given as keys
                both = ",".join([*built, str(name)])
                hint = (
                    f"to use configs/{group}/{name}.yaml pass {group}={name}, or {group}=[{both}]; else add"
                )
            raise SettingsError(
                f"{group}.{name}={entry!r}: not an object to build (no _target_); {hint} "
                f"+{group}.{name}._target_=<class> (e.g. {_EXAMPLE_TARGET[group]}), or set {group}.{name}=null "
                f"to switch it off; {group} holds: {', '.join(built) or 'nothing'}"
            )


def _instantiate_dict(cfg: DictConfig | None, group: str) -> list[Any]:
    if not cfg:
        return []
    check_object_groups({group: OmegaConf.to_container(cfg, resolve=False)})
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None]


class RunFolderNotEmptyError(ValueError):
    """A fresh start (no checkpoint to resume) in a run folder that holds an earlier run's checkpoints."""


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`"last"`: the run folder's last.ckpt if it exists (fresh start otherwise); a path must exist. A fresh start
    in a folder holding checkpoints is refused: Lightning would write the new run's last.ckpt as last-v1.ckpt, so
    the next `ckpt_path=last` resumed the old run, and the export would replace the old run's.

    A checkpoint is a file, or a folder of `trainer.strategy.state_dict_type=sharded` shards (FSDP), whose meta.pt
    Lightning writes last."""
    if ckpt_path not in (None, "", "null"):
        if ckpt_path == "last":
            last = output_dir / "checkpoints" / "last.ckpt"
            if last.is_file() or _sharded_checkpoint(last, "ckpt_path=last: "):
                return str(last)
        elif Path(ckpt_path).is_file() or _sharded_checkpoint(Path(ckpt_path), f"ckpt_path={ckpt_path}: "):
            return str(ckpt_path)
        else:
            raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    old = sorted((output_dir / "checkpoints").glob("*.ckpt"))
    if old:
        shown = ", ".join(c.name for c in old[:3]) + (", ..." if len(old) > 3 else "")
        raise RunFolderNotEmptyError(
            f"{output_dir / 'checkpoints'} holds an earlier run's checkpoints ({shown}) and this run starts afresh"
            f" (ckpt_path={ckpt_path}): start it in another run folder (hydra.run.dir=...), continue that run"
            " (ckpt_path=<one of them>), or remove the folder's checkpoints/"
        )
    return None


def _sharded_checkpoint(path: Path, what: str) -> bool:
    """Whether `path` is a sharded checkpoint's folder; one without its meta.pt (a save cut short) is refused."""
    if not path.is_dir():
        return False
    if not (path / "meta.pt").is_file():
        raise FileNotFoundError(
            f"{what}{path} is a folder without meta.pt: not a whole sharded checkpoint (trainer.strategy."
            "state_dict_type=sharded writes meta.pt last; a save cut short leaves it out); resume from another one"
        )
    return True


def check_window_length(processor: Any, model: Any, where: str = "data.processor") -> None:
    """The processor cuts audio into the model's windows: its `chunk_length` seconds are the model's window
    (`model`: a MusicFlamingo or its config; `audio.max_source_positions` positions, two mel frames each)."""
    config = getattr(model, "config", model)
    window = config.window_seconds
    chunk = getattr(processor, "chunk_length", window)
    if abs(float(chunk) - window) > 1e-6:
        positions = round(float(chunk) / (2 * config.audio_frame_step))
        raise ValueError(
            f"{where}: the processor cuts audio into {chunk} s windows (its chunk_length), the model's window is "
            f"{window} s (audio.max_source_positions={config.audio.max_source_positions}); use a processor saved "
            f"with chunk_length={window}, or, for a model built from a preset, "
            f"+model.net.overrides.audio.max_source_positions={positions} (a {chunk} s window)"
        )


def load_processor(cfg: DictConfig) -> Any:
    """The `data.processor` folder's MusicFlamingoProcessor."""
    processor_dir = cfg.data.get("processor")
    if not processor_dir:
        raise ValueError(
            "data.processor: set a folder with the tokenizer/processor files (or model.net.init_from)"
        )
    from musicflamingo.processor import MusicFlamingoProcessor

    return MusicFlamingoProcessor.from_pretrained(processor_dir)


def build_datamodule(cfg: DictConfig, model: Any, processor: Any = None) -> tuple[L.LightningDataModule, Any]:
    """(datamodule, processor) of `cfg.data` (`processor`: the one `load_processor` read, else read here), the
    processor checked against the model's window and vocabulary."""
    processor = processor if processor is not None else load_processor(cfg)
    processor_dir = cfg.data.get("processor")
    check_window_length(processor, model, f"data.processor={processor_dir}")
    vocab = model.config.text.vocab_size
    # every id, added tokens included (tokenizer.vocab_size leaves them out)
    if len(processor.tokenizer) > vocab:
        raise ValueError(
            f"tokenizer in {processor_dir} has {len(processor.tokenizer)} ids, model vocab is {vocab}"
        )
    return hydra.utils.instantiate(cfg.data, processor=processor), processor


def build_trainer(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The `cfg.trainer` Trainer with the `cfg.callbacks` and `cfg.logger` objects (and `extra_callbacks`), atomic
    checkpoint files, and checkpoints that keep an epoch cut short by the stop open (`KeepCutEpochOpen`), hold the
    RNG states (`RngStateCheckpoint`) and, at the end of training, the final step in last.ckpt
    (`SaveLastAtTrainEnd`), which a resumed run overwrites (`OwnLastCheckpoint`); the final step is validated and
    its metrics reach the loggers whatever `trainer.val_check_interval` and `trainer.log_every_n_steps` are, an
    early-stopped run's too (`LogFinalStep`)."""
    from musicflamingo.callbacks import (
        AtomicCheckpointIO,
        KeepCutEpochOpen,
        LogFinalStep,
        OwnLastCheckpoint,
        RngStateCheckpoint,
        SaveLastAtTrainEnd,
    )

    one_lightning_log_line()
    # the caller's first: StopOnSignal ends a stopped run at the next batch's start before others act on it
    callbacks = list(extra_callbacks) + _instantiate_dict(cfg.get("callbacks"), "callbacks")
    callbacks += [
        KeepCutEpochOpen(),
        RngStateCheckpoint(),
        SaveLastAtTrainEnd(),
        OwnLastCheckpoint(),
        LogFinalStep(),
    ]
    loggers = _instantiate_dict(cfg.get("logger"), "logger")
    extra: dict[str, Any] = {}
    if cfg.trainer.get("enable_progress_bar", True) and not stderr_is_terminal():
        extra["enable_progress_bar"] = (
            False  # a redrawn bar is noise in a file or pipe; ProgressLog logs lines
        )
    if not cfg.get("data", {}).get("val"):
        extra["limit_val_batches"] = (
            0  # no validation set: Lightning then does not ask for (and warn about) one
        )
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()], **extra
    )


def check_checkpoint_monitor(settings: Mapping[str, Any]) -> None:
    """Refuse an `EarlyStopping` on a validation metric without a validation set, and a `ModelCheckpoint` that would
    rank its files by a validation metric (`monitor: val/...`) it cannot have fresh. Saved every N steps
    (`every_n_train_steps`, `train_time_interval`), a file is written at the step's end, before that step's
    validation: each was ranked by the previous validation's value (top-k kept the wrong files, silently). Without
    `data.val` no value ever comes: no file was kept but `last.ckpt`, silently too."""
    callbacks = settings.get("callbacks") or {}
    has_val = bool((settings.get("data") or {}).get("val"))
    for key, cb in callbacks.items():
        if not isinstance(cb, Mapping):
            continue
        monitor = cb.get("monitor")
        early = str(cb.get("_target_", "")).endswith("EarlyStopping")
        if early and isinstance(monitor, str) and monitor.startswith("val/") and not has_val:
            # Lightning's EarlyStopping then checks at the first epoch's end, and stops the run with a traceback
            # ("conditioned on metric `val/loss` which is not available"), before any step checkpoint of a short run
            raise SettingsError(
                f"callbacks.{key}.monitor={monitor}: no validation set (data.val) logs it, so the early stop would "
                f"fail the run at the end of its first epoch; set data.val, or monitor a training metric "
                f"(callbacks.{key}.monitor=train/loss)"
            )
        if not str(cb.get("_target_", "")).endswith("ModelCheckpoint"):
            continue
        if not isinstance(monitor, str) or not monitor.startswith("val/"):
            continue
        if not has_val:
            raise SettingsError(
                f"callbacks.{key}.monitor={monitor}: no validation set (data.val) logs it, so no checkpoint but "
                f"last.ckpt would be kept; set data.val, or callbacks.{key}.monitor=null"
            )
        timed = [k for k in ("every_n_train_steps", "train_time_interval") if cb.get(k)]
        if timed:
            raise SettingsError(
                f"callbacks.{key}.monitor={monitor} with callbacks.{key}.{timed[0]}={cb[timed[0]]}: those files "
                "are saved before the step's validation and would be ranked by the previous validation's "
                f"{monitor}; set callbacks.{key}.{timed[0]}=null to save after each validation "
                "(trainer.val_check_interval), ranked by its own value"
            )


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the model described by `cfg`; returns (metrics, objects) so tests can inspect both.

    Raises `SettingsError` for a bad setting, `MemoryPlanError` for a run predicted not to fit the device, and
    `RunFolderInUseError` for a folder another run uses, before anything is read; with `plan=true` returns
    `({}, {"plan": MemoryPlan})` after printing the plan; `TrainingInterrupted` (exit 130 / 143) after SIGINT / SIGTERM, with a checkpoint when training had
    started.
    """
    # resolved, with `???` raising MissingMandatoryValue naming the key
    settings = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_train_settings(settings)
    check_object_groups(settings)
    check_checkpoint_monitor(settings)
    check_train_paths(settings)
    # the memory plan from the settings alone: `plan=true` prints it and stops; a run predicted not to fit the
    # device is refused here, before any weight is built (`memory_check=false` skips the refusal)
    plan = check_training(settings)
    if settings.get("plan"):
        print(plan.table())
        return {}, {"plan": plan}
    output_dir = Path(cfg.paths.output_dir)
    # a folder another run holds is refused before anything is read (the processor included)
    lock = RunLock(output_dir).acquire() if is_launching_rank() else None
    try:  # the processor's windows against the model's config, before Lightning is imported and the model built
        processor = load_processor(cfg)
        where = f"data.processor={settings['data']['processor']}"
        check_window_length(processor, model_config(settings["model"]["net"]), where)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if not is_launching_rank():  # its info lines repeated rank 0's on the console: warnings and errors only
        import lightning  # noqa: F401  (its packages set their loggers to INFO as they are imported)

        for name in ("musicflamingo", "lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    from musicflamingo.callbacks import StopOnSignal

    stopper = StopOnSignal(output_dir / "checkpoints" / "last.ckpt")
    stopper.install()
    try:
        if lock is not None:  # the folder is ours: what a killed run's writes left behind goes
            for folder in (output_dir, output_dir / "checkpoints"):
                remove_interrupted_writes(folder)
        ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        if cfg.get("export") and is_launching_rank():
            # the export's folder is checked before training, not found unusable after hours of it
            check_save_target(
                output_dir / "export", again="move it away, or export=false to train without exporting"
            )
        # a target whose module cannot be imported is named now, not when Hydra builds it after the model and data
        check_targets(settings)
        if lock is not None and ckpt is None:
            save_run_config(cfg, output_dir)
        try:
            save_config = lock is not None and ckpt is not None
            return _fit(cfg, output_dir, stopper, ckpt, save_config, processor)
        except BaseException as e:
            if lock is not None:
                _log_to_files(e)
            raise
    finally:
        stopper.restore()
        if lock is not None:
            lock.release()


def _log_to_files(e: BaseException) -> None:
    """Write why the run ended early to the log files (the run folder's `train.log`): `cli.run_cli` prints the one
    line on the console only, so the log of a run stopped for too many bad samples or a NaN loss ended as a
    finished run's does. The console handlers are left out (the line is printed there already)."""
    first = next((x for x in str(e).splitlines() if x.strip()), "")
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, "run ended by %s: %s", (type(e).__name__, first), None
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def _save_run_config_class() -> type:
    """`_SaveRunConfig`, a Lightning callback that writes a resumed run's config once its checkpoint has loaded: a
    resume refused while loading (another batch budget, another learning rate) leaves `.hydra/config.yaml`
    describing the folder's checkpoints. Made on first use (importing this module does not import Lightning) and
    kept as the module attribute `_SaveRunConfig`, so pickle finds it (ddp_spawn pickles the callbacks)."""
    if "_SaveRunConfig" in globals():
        return globals()["_SaveRunConfig"]
    import lightning as L

    class _SaveRunConfig(L.Callback):
        def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
            self.cfg, self.output_dir, self.saved = cfg, output_dir, False

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.is_global_zero:
                save_run_config(self.cfg, self.output_dir)
                self.saved = True

        def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # a checkpoint at trainer.max_steps already (exporting a chosen step into a new folder) skips the
            # training loop and its on_train_start: the folder's export had no record of its settings
            if trainer.is_global_zero and not self.saved:
                self.on_train_start(trainer, pl_module)

    _SaveRunConfig.__qualname__ = "_SaveRunConfig"
    globals()["_SaveRunConfig"] = _SaveRunConfig
    return _SaveRunConfig


def __getattr__(name: str) -> Any:
    if name == "_SaveRunConfig":
        return _save_run_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fit(
    cfg: DictConfig,
    output_dir: Path,
    stopper: StopOnSignal,
    ckpt: str | None,
    save_config: bool,
    processor: Any,
) -> tuple[dict[str, float], dict[str, Any]]:
    import lightning as L

    from musicflamingo.lit import export_model

    set_threads(cfg.get("threads"))
    if "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir.mkdir(parents=True, exist_ok=True)

    log.info("instantiating model <%s> with net <%s>", cfg.model._target_, cfg.model.net._target_)
    lit: L.LightningModule = hydra.utils.instantiate(cfg.model)
    datamodule, processor = build_datamodule(cfg, lit.model, processor)
    extra = [stopper, _save_run_config_class()(cfg, output_dir)] if save_config else [stopper]
    trainer = build_trainer(cfg, extra_callbacks=extra)
    # a fresh start: loggers that would continue a resumed run's (ContinuedWandbLogger) start anew; a resume: they
    # continue from the checkpoint (an offline W&B run is rewound to its steps)
    for lg in trainer.loggers:
        if not ckpt and callable(getattr(lg, "start_afresh", None)):
            lg.start_afresh()
        elif ckpt and callable(getattr(lg, "continue_from", None)):
            lg.continue_from(ckpt)
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if ckpt:
        log.info("resuming from %s", ckpt)
    try:
        trainer.fit(lit, datamodule=datamodule, ckpt_path=ckpt)
    except ValueError as e:
        # Lightning's check at the fit's start, a traceback otherwise; the settings cannot know the batch count
        if "`val_check_interval`" not in str(e) or "training batches" not in str(e):
            raise
        raise SettingsError(
            f"trainer.val_check_interval={cfg.trainer.get('val_check_interval')}: more batches than an epoch has "
            f"({trainer.num_training_batches}); validate every N batches across epochs with "
            "trainer.check_val_every_n_epoch=null, or give a smaller interval or a fraction of an epoch (0.5)"
        ) from None
    # the share of bad samples over the whole run, however short: a small fine-tune whose every clip was missing
    # (a wrong audio_root) never reached the in-run check (after 100 samples) and exported an untrained model
    tracker = getattr(datamodule, "train_bad_samples", None)
    if tracker is not None:
        try:
            tracker.check(final=True)
        except TooManyBadSamplesError as e:
            # what the stop leaves out is what this run would have written (not an export under export=false)
            left_out = [
                what
                for key, what in (("export", "the model"), ("export_adapters", "the adapters"))
                if cfg.get(key)
            ]
            verb = "is" if left_out == ["the model"] else "are"
            not_written = f"{' and '.join(left_out)} {verb} not exported; " if left_out else ""
            raise TooManyBadSamplesError(f"{e}; {not_written}checkpoints are kept") from None

    log_best_checkpoints(trainer)
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
    }
    objects: dict[str, Any] = {
        "trainer": trainer,
        "model": lit,
        "datamodule": datamodule,
        "processor": processor,
    }
    if cfg.get("export") or cfg.get("export_adapters"):
        model = trained_model(trainer, lit, cfg.model.net)  # a collective under FSDP: every rank joins
        if model is not None and cfg.get("export"):
            objects["export_dir"] = export_model(model, output_dir / "export", processor=processor)
            log.info("exported to %s", objects["export_dir"])
        if model is not None and cfg.get("export_adapters"):
            # the run folder is this run's (its lock is held): a finished run's rerun writes its adapters again
            objects["export_adapter_dir"] = save_peft_adapter(
                model,
                output_dir / "export_adapter",
                base_model_name_or_path=cfg.model.net.get("init_from"),
                overwrite=True,
            )
            log.info("adapters exported to %s (peft's layout)", objects["export_adapter_dir"])
    return metrics, objects


def log_best_checkpoints(trainer: L.Trainer) -> None:
    """Name the best file of each checkpoint callback that ranks by a metric (`monitor: val/loss`), with its value:
    its files are named by step, so the one to export or evaluate was otherwise found by reading metrics.csv."""
    for cb in trainer.checkpoint_callbacks:
        monitor, best = getattr(cb, "monitor", None), getattr(cb, "best_model_path", "")
        score = getattr(cb, "best_model_score", None)
        if monitor and best and score is not None and trainer.is_global_zero:
            log.info(
                "best checkpoint by %s (%s): %s (%s=%.6g)", monitor, cb.mode, best, monitor, float(score)
            )


def export_trained(
    trainer: L.Trainer, lit: L.LightningModule, net_cfg: Any, path: Path, processor: Any
) -> Path | None:
    """Rank 0 writes the trained model's Hugging Face folder (`export_model`); returns None on the other ranks."""
    from musicflamingo.lit import export_model

    model = trained_model(trainer, lit, net_cfg)
    return None if model is None else export_model(model, path, processor=processor)


def trained_model(trainer: L.Trainer, lit: L.LightningModule, net_cfg: Any) -> Any:
    """The trained `MusicFlamingo` with full weights on rank 0 (None on the other ranks).

    Under FSDP each rank holds a shard of every weight (1-d views, empty where another rank holds it): every rank
    takes part in gathering the full weights (a collective), and rank 0 gets a plain copy of the model (built on
    the meta device with the run's freezing and LoRA, then given the gathered tensors)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return lit.model if trainer.is_global_zero else None
    from lightning.fabric.strategies.fsdp import _get_full_state_dict_context

    with _get_full_state_dict_context(trainer.strategy.model, world_size=trainer.world_size):
        state = trainer.strategy.model.state_dict()  # full tensors on rank 0's CPU, nothing elsewhere
    if not trainer.is_global_zero:
        return None
    return _plain_copy(lit.model, net_cfg, {k[6:]: v for k, v in state.items() if k.startswith("model.")})


def _plain_copy(model: Any, net_cfg: Any, state: Mapping[str, torch.Tensor]) -> Any:
    """An unwrapped CPU `MusicFlamingo` with `model`'s architecture, freezing and LoRA adapters, holding `state`."""
    from musicflamingo.lit import _WRAPPER_PREFIXES
    from musicflamingo.model.build import freeze_parts
    from musicflamingo.model.lora import LoRALinear
    from musicflamingo.model.musicflamingo import MusicFlamingo

    # the adapters as the trained model holds them, not as model.net.lora says: an init_from_peft folder may adapt
    # more linears, with other ranks and scales (rank_pattern, alpha_pattern, rsLoRA)
    live = {_WRAPPER_PREFIXES.sub("", n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    with torch.device("meta"):
        plain = MusicFlamingo(model.config)
        freeze_parts(plain, net_cfg.freeze)
        for name, layer in live.items():
            parent, _, child = name.rpartition(".")
            base = plain.get_submodule(name)
            adapter = LoRALinear(
                base.in_features,
                base.out_features,
                base.bias is not None,
                layer.rank,
                layer.scale * layer.rank,
            )
            setattr(plain.get_submodule(parent), child, adapter)
    plain.load_state_dict(dict(state), strict=True, assign=True)
    # what trains as the trained model says (the LoRA layers built here train their base weights, and freeze_parts
    # leaves a LoRA'd language model's norms trainable): save_peft_adapter refused a base that requires grad
    trains = {_WRAPPER_PREFIXES.sub("", n): p.requires_grad for n, p in model.named_parameters()}
    for name, p in plain.named_parameters():
        p.requires_grad_(trains.get(name, p.requires_grad))
    for name, layer in live.items():
        plain.get_submodule(name).scale = layer.scale  # exactly, not alpha / rank recomputed
    plain.reset_buffers("cpu")  # the rotary buffers are not in the state dict: rebuilt in float32
    plain.rote_quirk = model.rote_quirk
    plain.generation_defaults = dict(model.generation_defaults)
    # tensors an init_from_peft folder replaced whole (modules_to_save, biases): the adapter export writes them back
    plain.peft_whole_tensors = list(getattr(model, "peft_whole_tensors", ()))
    return plain.train(model.training)

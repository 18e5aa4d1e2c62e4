"""Training: every config builds its objects, stages freeze what they say, LoRA merges, resume is exact, export
loads."""

from __future__ import annotations

import csv
import glob
import shutil
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import OmegaConf, open_dict
from tiny_checkpoint import write_tiny_checkpoint
from train_fixtures import CONFIGS, compose_train, write_dataset, write_processor

from musicflamingo import MusicFlamingo
from musicflamingo.demo import model_window
from musicflamingo.model.build import create_model
from musicflamingo.training import build_datamodule, build_trainer, train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    proc = write_processor(root / "proc")
    manifest = write_dataset(root / "data")
    return proc, manifest


def _losses(run: Path) -> list[float]:
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


TRAIN_GROUPS = ("experiment", "model", "trainer", "data", "logger", "callbacks", "debug")
CONFIG_OPTIONS = [(g, p.stem) for g in TRAIN_GROUPS for p in sorted((CONFIGS / g).glob("*.yaml"))]


def test_every_train_group_is_checked():
    groups = {p.parent.name for p in CONFIGS.glob("*/*.yaml")} - {"hydra", "benchmark", "paths"}
    assert groups == set(TRAIN_GROUPS)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _compose_objects(tmp_path, proc, manifest, overrides):
    """train.yaml with `overrides`, the data, processor and run folder pointed at the tests' tiny files."""
    base = [
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    data = [f"data.train={manifest}", f"data.processor={proc}"]  # after the options: replaces an experiment's
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=base + overrides + data)


def _instantiate(cfg):
    """Every object `train(cfg)` builds, built the same way (a wrong key or target raises here), with the
    datamodule set up for fitting and the optimizer and LR schedule made."""
    lit = hydra.utils.instantiate(cfg.model)
    datamodule, _ = build_datamodule(cfg, lit.model)
    datamodule.setup("fit")
    trainer = build_trainer(cfg)
    lit.trainer = trainer
    return lit, datamodule, trainer, lit.configure_optimizers()


@pytest.mark.parametrize("group, option", CONFIG_OPTIONS, ids=[f"{g}={o}" for g, o in CONFIG_OPTIONS])
def test_every_config_instantiates(group, option, assets, tiny_ckpt, tmp_path):
    """Compose train.yaml with each option of each group, then build the model (net, optimizer, LR schedule), the
    datamodule and the trainer with its callbacks and loggers, as `train(cfg)` does."""
    proc, manifest = assets
    cfg = _compose_objects(tmp_path, proc, manifest, [f"{group}={option}"])
    assert cfg.model._target_ and cfg.model.net._target_ and cfg.trainer._target_
    with open_dict(cfg):  # the hardware is not what is checked: gpu/fsdp configs build on CPU
        cfg.trainer.accelerator = "cpu"
        strategy = cfg.trainer.get("strategy")
        if (
            strategy is not None and "fsdp" in strategy._target_
        ):  # runs (tests/test_dist_review6.py): built alone
            assert isinstance(hydra.utils.instantiate(strategy), FSDPStrategy)
            cfg.trainer.strategy = "auto"
    release = cfg.model.net.preset is None  # model=music_flamingo_2601: only a checkpoint folder
    assert cfg.model.net.init_from is None
    with open_dict(cfg):
        if release:  # the released checkpoint: the tiny checkpoint folder (model + processor) in its place
            cfg.model.net.init_from = cfg.data.processor = str(tiny_ckpt)
        elif cfg.model.net.preset == "small":  # its windows: the preset's 3 s, or the experiment's own
            window = model_window(cfg.model.net)
            cfg.data.processor = str(write_processor(tmp_path / "proc", chunk_length=window))
        else:  # tiny, with the tiny processor's 2 s windows
            cfg.model.net.overrides = {"audio": {"max_source_positions": 100}}
    lit, datamodule, trainer, opt = _instantiate(cfg)
    assert isinstance(lit.model, MusicFlamingo)
    assert len(datamodule.train_dataloader()) > 0
    assert opt["optimizer"].param_groups and opt["lr_scheduler"]["scheduler"].last_epoch == 0
    if release:  # and at the release size, on the meta device (no memory, no weights)
        with open_dict(cfg):
            cfg.model.net.init_from = None
            cfg.model.net.preset = "music_flamingo_2601"
        with torch.device("meta"):
            big = hydra.utils.instantiate(cfg.model)
        assert big.model.config.num_parameters() > 7e9
        assert big.model.lm_head.weight.is_meta and big.model.language_model.gradient_checkpointing


@pytest.mark.parametrize(
    "override, named",
    [
        ("+model.net.bogus=1", "bogus"),
        ("+model.net.freeze.decoder=true", "decoder"),
        ("+model.net.lora.bogus=1", "bogus"),
        ("+model.optimizer.bogus=1", "bogus"),
        ("+model.scheduler.bogus=1", "bogus"),
        ("+model.part_lr.decoder=1e-3", "decoder"),
        ("model.optimizer._target_=torch.optim.NoSuchOptimizer", "NoSuchOptimizer"),
        ("+trainer.bogus=1", "bogus"),
        ("+data.bogus=1", "bogus"),
        ("+callbacks.lr_monitor.bogus=1", "bogus"),
        ("+logger.csv.bogus=1", "bogus"),
    ],
)
def test_a_wrong_key_or_target_fails_the_config_check(override, named, assets, tmp_path):
    proc, manifest = assets
    cfg = _compose_objects(
        tmp_path, proc, manifest, [override, "+model.net.overrides={audio:{max_source_positions:100}}"]
    )
    with pytest.raises(Exception, match=named):
        _instantiate(cfg)


def test_optimizer_groups_follow_the_config(assets, tmp_path):
    """Per-part learning rates, no decay on 1-d parameters, frozen parts left out; the schedule warms up, then
    decays to min_lr_ratio."""
    proc, manifest = assets
    cfg = _compose_objects(
        tmp_path,
        proc,
        manifest,
        [
            "experiment=full_finetune",
            "+model.net.overrides={audio:{max_source_positions:100}}",
            "model.net.freeze.multi_modal_projector=true",
            "model.scheduler.warmup_steps=2",
            "model.scheduler.max_steps=12",
        ],
    )
    lit, _, _, opt = _instantiate(cfg)
    groups = {g["name"]: g for g in opt["optimizer"].param_groups}
    assert sorted(groups) == [
        "audio_tower",
        "audio_tower_no_decay",
        "language_model",
        "language_model_no_decay",
    ]
    assert groups["audio_tower"]["initial_lr"] == groups["audio_tower_no_decay"]["initial_lr"] == 2e-5
    assert groups["language_model"]["initial_lr"] == 1e-4
    assert groups["language_model"]["lr"] == 0.5e-4  # the first of 2 warmup steps
    assert (
        groups["language_model"]["weight_decay"] == 0.01
        and groups["language_model_no_decay"]["weight_decay"] == 0
    )
    assert groups["language_model"]["betas"] == (0.9, 0.95) and groups["language_model"]["eps"] == 1e-8
    no_decay = {id(p) for p in groups["language_model_no_decay"]["params"]}
    for name, p in lit.model.named_parameters():
        if name.startswith("multi_modal_projector.") or name == "audio_tower.embed_positions.weight":
            assert not p.requires_grad, name
        if name.startswith("language_model.") and name.endswith(("norm.weight", ".bias")):
            assert id(p) in no_decay, name
    sched = opt["lr_scheduler"]["scheduler"]
    mult = [sched.lr_lambdas[0](s) for s in (0, 1, 2, 7, 12, 20)]
    assert mult[:3] == [0.5, 1.0, 1.0] and 0.1 < mult[3] < 1.0 and mult[4] == mult[5] == pytest.approx(0.1)


EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_two_steps(experiment, assets, tmp_path, request):
    proc, manifest = assets
    if experiment.startswith("synthetic"):
        cfg = _synthetic_cfg(experiment, request.getfixturevalue("synthetic_corpus"), tmp_path)
    else:
        # grpo_synthetic keeps the corpus' mcq records only; this generic data has none (qa): keep them all, or
        # every step would hold no record (an error since model.tasks is checked)
        extra = ["model.tasks=null"] if experiment == "grpo_synthetic" else []
        cfg = compose_train(tmp_path, manifest, proc, [f"experiment={experiment}", "debug=fast", *extra])
    metrics, obj = train(cfg)
    assert obj["trainer"].global_step == 2
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_compiled_layers_train_like_eager(assets, tmp_path):
    """`model.net.compile=true` compiles every layer and trains to the same losses as eager (2 steps)."""
    from torch._dynamo.utils import counters

    proc, manifest = assets
    losses = []
    for flag in ("false", "true"):
        graphs = counters["stats"]["unique_graphs"]
        cfg = compose_train(tmp_path / flag, manifest, proc, ["debug=fast", f"model.net.compile={flag}"])
        metrics, obj = train(cfg)
        assert obj["trainer"].global_step == 2
        assert (counters["stats"]["unique_graphs"] > graphs) == (flag == "true")
        losses.append(metrics["train/loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.fixture(scope="module")
def synthetic_corpus(tmp_path_factory):
    """A 2-clip corpus and its SentencePiece processor (3 s windows, the `small` preset's), as musicflamingo.demo
    builds them, shared by the main-job experiments: (data_dir, processor). Two clips, not six: a step's bf16 work
    grows with its tokens (slow on a CPU without AMX), and the test checks that each experiment runs, not what it
    learns."""
    if shutil.which("fluidsynth") is None:
        pytest.skip("needs Debian's fluidsynth (make setup)")
    from musicflamingo.data.synthetic import build_corpus
    from musicflamingo.demo import build_processor
    from musicflamingo.model import MusicFlamingoConfig

    root = tmp_path_factory.mktemp("synthetic_experiments")
    corpus = build_corpus(
        root / "synthetic", n_train=2, n_val=1, n_test=1, clip_seconds=(4, 5), progress=False
    )
    window = MusicFlamingoConfig.from_name("small").window_seconds
    return root, build_processor(corpus, root / "synthetic" / "processor", 400, window)


def _synthetic_cfg(experiment, corpus, tmp_path):
    """The main-job experiment on the shared corpus (`synthetic_corpus`), writing its run into `tmp_path`."""
    from musicflamingo.demo import model_overrides
    from musicflamingo.processor import MusicFlamingoProcessor

    data_dir, proc = corpus
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                f"experiment={experiment}",
                "debug=fast",
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={tmp_path / 'run'}",
                "data.num_workers=0",
                "logger=csv",
            ],
        )
    processor = MusicFlamingoProcessor.from_pretrained(proc)
    # the processor's windows are the experiment's (an experiment with other windows needs a processor of its own)
    assert processor.chunk_length == model_window(cfg.model.net), experiment
    with open_dict(cfg):
        arch = OmegaConf.to_container(cfg.model.net.overrides) or {}
        cfg.model.net.overrides = {**arch, **model_overrides(processor)}
    return cfg


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2", "trainer.max_steps=1"],
        ["trainer.precision=bf16-true", "model.net.gradient_checkpointing=true"],
    ],
    ids=["bf16-mixed+accumulation", "bf16-true+checkpointing"],
)
def test_precision_checkpointing_accumulation(overrides, assets, tmp_path):
    proc, manifest = assets
    cfg = compose_train(tmp_path, manifest, proc, ["debug=fast", "data.batch_max_tokens=800", *overrides])
    metrics, obj = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    model = obj["model"].model
    assert model.pos_emb.inv_freq.dtype == torch.float32  # rotary buffers stay float32 under bf16-true
    if "trainer.precision=bf16-true" in overrides:
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert model.language_model.gradient_checkpointing


def test_overfits_four_samples(assets, tmp_path):
    proc, manifest = assets
    cfg = compose_train(
        tmp_path,
        manifest,
        proc,
        [
            "trainer.max_steps=80",
            "trainer.log_every_n_steps=1",
            "model.optimizer.lr=5e-3",
            "export=false",
            "model.scheduler.min_lr_ratio=1.0",
            "model.scheduler.warmup_steps=5",
        ],
    )
    train(cfg)
    losses = _losses(tmp_path / "run")
    assert len(losses) >= 50
    assert min(losses[-5:]) < 0.05 * losses[0], (losses[0], losses[-5:])


def test_training_by_epochs_schedules_over_the_trainers_estimate(assets, tmp_path):
    """trainer.max_steps=-1 (so model.scheduler.max_steps=-1): the cosine spans the trainer's estimated steps."""
    proc, manifest = assets
    overrides = ["trainer.max_steps=-1", "trainer.max_epochs=1", "data.batch_max_tokens=800", "export=false"]
    cfg = compose_train(tmp_path, manifest, proc, overrides)
    assert cfg.model.scheduler.max_steps == -1
    _, obj = train(cfg)
    steps = obj["trainer"].global_step
    multiplier = obj["trainer"].lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert steps > 1 and multiplier(steps - 1) > 0.1 and multiplier(steps) == pytest.approx(0.1)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_projector_stage_freezes_encoder_and_lm(assets, tmp_path):
    proc, manifest = assets
    cfg = compose_train(tmp_path, manifest, proc, ["experiment=align_projector", "debug=fast"])
    before = _weights(create_model("tiny", {"audio": {"max_source_positions": 100}}, seed=cfg.seed))
    _, obj = train(cfg)
    after = _weights(obj["model"].model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("multi_modal_projector.") for k in changed), sorted(changed)[:5]


def test_lora_keeps_base_and_merges_exactly(assets, tmp_path):
    proc, manifest = assets
    cfg = compose_train(tmp_path, manifest, proc, ["experiment=lora", "debug=fast", "export=true"])
    before = _weights(create_model("tiny", {"audio": {"max_source_positions": 100}}, seed=cfg.seed))
    _, obj = train(cfg)
    lit = obj["model"]
    after = _weights(lit.model)
    for k, v in before.items():
        if not k.startswith("multi_modal_projector."):
            assert torch.equal(v, after[k]), k
    assert any("lora_B" in k and after[k].abs().sum() > 0 for k in after)
    merged = MusicFlamingo.from_pretrained(obj["export_dir"])
    lit.model.eval()  # LoRA dropout off
    ids = torch.randint(0, 290, (2, 11))
    with torch.no_grad():
        a = lit.model(ids).logits
        b = merged(ids).logits
    assert (a - b).abs().max().item() <= 1e-5


def test_resume_is_exact(assets, tmp_path):
    proc, manifest = assets
    # The LR schedule spans 6 steps in both runs; the first run is cut after 3 steps.
    common = [
        "trainer.log_every_n_steps=1",
        "export=false",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "model.scheduler.max_steps=6",
        "model.scheduler.warmup_steps=2",
        "data.batch_max_tokens=800",
    ]
    straight = compose_train(tmp_path / "a", manifest, proc, common + ["trainer.max_steps=6"])
    _, a = train(straight)
    first = compose_train(tmp_path / "b", manifest, proc, common + ["trainer.max_steps=3"])
    train(first)
    second = compose_train(tmp_path / "b", manifest, proc, common + ["trainer.max_steps=6"])
    _, b = train(second)
    assert b["trainer"].global_step == 6
    wa, wb = _weights(a["model"].model), _weights(b["model"].model)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    la, lb = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    # metrics.csv continues across the resume: every step's loss, the first run's included (Lightning's CSVLogger
    # deleted the file on resume, leaving steps 4-6 only)
    assert len(la) == len(lb) == 6 and max(abs(x - y) for x, y in zip(la, lb)) <= 1e-6, (la, lb)


def test_a_resume_with_another_learning_rate_is_refused_and_keeps_the_run_config(assets, tmp_path):
    """A resume restores the saved optimizer and schedule, so a changed model.optimizer.lr would be ignored: it is
    refused naming both values, and the refused settings do not replace the run's `.hydra/config.yaml`."""
    from musicflamingo.lit import CheckpointMismatchError

    proc, manifest = assets
    common = ["export=false", "model.scheduler.max_steps=4", "data.batch_max_tokens=800"]
    train(compose_train(tmp_path, manifest, proc, [*common, "trainer.max_steps=2"]))
    config = tmp_path / "run" / ".hydra" / "config.yaml"
    assert OmegaConf.load(config).model.optimizer.lr == 1e-3
    changed = compose_train(
        tmp_path, manifest, proc, [*common, "trainer.max_steps=4", "model.optimizer.lr=0.01"]
    )
    with pytest.raises(CheckpointMismatchError, match=r"at learning rate 0.001, the settings now give 0.01"):
        train(changed)
    assert OmegaConf.load(config).model.optimizer.lr == 1e-3
    _, b = train(
        compose_train(tmp_path, manifest, proc, [*common, "trainer.max_steps=4"])
    )  # as it was: resumes
    assert b["trainer"].global_step == 4


def test_a_resume_with_another_lora_alpha_is_refused(assets, tmp_path):
    """The checkpoint holds A and B, not alpha: under another alpha the same adapters compute another model, so the
    resume is refused naming both values; with the old alpha it resumes."""
    from musicflamingo.lit import CheckpointMismatchError

    proc, manifest = assets
    common = ["experiment=lora", "export=false", "model.scheduler.max_steps=4", "data.batch_max_tokens=800"]
    train(compose_train(tmp_path, manifest, proc, [*common, "trainer.max_steps=2"]))
    with pytest.raises(
        CheckpointMismatchError, match=r"alpha 16 at rank 8\), the settings now give .*alpha 160"
    ):
        train(
            compose_train(
                tmp_path, manifest, proc, [*common, "trainer.max_steps=4", "model.net.lora.alpha=160"]
            )
        )
    _, b = train(compose_train(tmp_path, manifest, proc, [*common, "trainer.max_steps=4"]))
    assert b["trainer"].global_step == 4


def test_lora_export_of_a_bf16_true_run_stays_bf16(assets, tmp_path):
    """A bf16-true run's weights are bf16: its merged export is too (a float32 copy doubled the release's 16.5 GB)."""
    import json

    proc, manifest = assets
    cfg = compose_train(
        tmp_path,
        manifest,
        proc,
        ["experiment=lora", "debug=fast", "export=true", "trainer.precision=bf16-true"],
    )
    _, obj = train(cfg)
    config = json.loads((Path(obj["export_dir"]) / "config.json").read_text())
    dtypes = {config.get("dtype"), config.get("torch_dtype")} - {None}
    assert dtypes == {"bfloat16"}, config
    merged = MusicFlamingo.from_pretrained(obj["export_dir"])
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_a_fresh_start_in_a_folder_with_checkpoints_is_refused(assets, tmp_path):
    """ckpt_path=null in a used run folder: Lightning wrote the new run's last.ckpt as last-v1.ckpt, so the next
    default resume continued the old run (and the export replaced the old run's); refused, the old files kept."""
    from musicflamingo.training import RunFolderNotEmptyError

    proc, manifest = assets
    common = ["export=false", "model.scheduler.max_steps=4", "data.batch_max_tokens=800"]
    train(compose_train(tmp_path, manifest, proc, [*common, "trainer.max_steps=2"]))
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(
        RunFolderNotEmptyError, match=r"holds an earlier run's checkpoints \(last.ckpt.*hydra.run.dir"
    ):
        train(compose_train(tmp_path, manifest, proc, [*common, "trainer.max_steps=3", "ckpt_path=null"]))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_an_unusable_export_folder_is_refused_before_training(assets, tmp_path):
    """<run>/export a plain file: refused before the first step (was: the run trained, then failed to export, with
    a hint naming an option train.py does not have)."""
    from musicflamingo.checkpoint import CheckpointError

    proc, manifest = assets
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "export").write_text("not a folder")
    cfg = compose_train(tmp_path, manifest, proc, ["debug=fast", "export=true"])
    with pytest.raises(CheckpointError, match=r"export is a file.*export=false"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_csv_log_continues_and_drops_the_steps_logged_again(tmp_path):
    """A killed run logged steps 0-5 but checkpointed at 3: the resumed run logs 3 and 4 again; the file keeps 0-2
    and holds each step once, the new values for 3 and 4, a column new in the resumed run included."""
    from musicflamingo.loggers import ContinuedExperimentWriter

    old = ContinuedExperimentWriter(str(tmp_path))
    for step in range(6):
        old.log_metrics({"train/loss": 10.0 + step}, step)
    old.save()
    new = ContinuedExperimentWriter(str(tmp_path))
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "metrics.csv"))] == [str(i) for i in range(6)]
    new.log_metrics({"train/loss": 20.0 + 3, "train/lr": 0.1}, 3)
    new.log_metrics({"train/loss": 20.0 + 4}, 4)
    new.save()
    new.log_metrics({"train/loss": 20.0 + 5}, 5)
    new.save()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(int(r["step"]), float(r["train/loss"])) for r in rows] == [
        (0, 10.0),
        (1, 11.0),
        (2, 12.0),
        (3, 23.0),
        (4, 24.0),
        (5, 25.0),
    ]
    assert rows[3]["train/lr"] == "0.1" and rows[0]["train/lr"] == ""


def test_continuing_a_run_stopped_by_max_steps_inside_an_epoch_is_exact(assets, tmp_path):
    """last.ckpt written at the end of a run stopped by trainer.max_steps inside an epoch: continuing it (a larger
    max_steps) trains the rest of that epoch, as an uninterrupted run does, instead of starting the next one."""
    proc, manifest = assets
    common = [
        "export=false",
        "callbacks.model_checkpoint.every_n_train_steps=1000",  # only on_train_end writes last.ckpt
        "model.scheduler.max_steps=8",
        "data.batch_max_tokens=800",
    ]
    _, a = train(compose_train(tmp_path / "a", manifest, proc, common + ["trainer.max_steps=8"]))
    per_epoch = a["trainer"].num_training_batches
    assert 2 <= per_epoch and per_epoch + 1 < 8
    stop = per_epoch + 1  # after the first batch of epoch 1
    train(compose_train(tmp_path / "b", manifest, proc, common + [f"trainer.max_steps={stop}"]))
    ckpt = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    _, b = train(compose_train(tmp_path / "b", manifest, proc, common + ["trainer.max_steps=8"]))
    assert b["trainer"].global_step == 8
    wa, wb = _weights(a["model"].model), _weights(b["model"].model)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    # Lightning's epoch and the data module's agree in the file
    assert ckpt["epoch"] == 1 and ckpt["MusicFlamingoDataModule"]["sampler"]["epoch"] == 1
    assert b["trainer"].current_epoch == a["trainer"].current_epoch


def test_export_loads_in_ours_and_transformers(assets, tmp_path):
    transformers = pytest.importorskip("transformers")
    proc, manifest = assets
    cfg = compose_train(tmp_path, manifest, proc, ["debug=fast", "export=true"])
    _, obj = train(cfg)
    export = obj["export_dir"]
    assert (export / "tokenizer.json").is_file()
    ours = MusicFlamingo.from_pretrained(export)
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(
        export, dtype=torch.float32
    ).eval()
    from musicflamingo.processor import MusicFlamingoProcessor

    processor = MusicFlamingoProcessor.from_pretrained(export)
    from tiny_assets import make_tone

    conv = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": make_tone(440.0, 3.0)},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ]
    ]
    batch = processor.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
    obj["model"].model.eval()
    with torch.no_grad():
        trained = obj["model"].model(**batch).logits
        a = ours(**batch).logits
        b = ref(**batch).logits
    assert (a - trained).abs().max().item() <= 1e-5
    assert (b - trained).abs().max().item() <= 1e-5


def test_af3_and_our_layout_give_same_batches(tmp_path):
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    proc = write_processor(tmp_path / "proc")
    ours = write_dataset(tmp_path / "d", layout="ours")
    af3 = write_dataset(tmp_path / "d", layout="af3")
    batches = []
    for manifest in (ours, af3):
        dm = MusicFlamingoDataModule(train=str(manifest), processor=str(proc), batch_max_tokens=400, seed=3)
        dm.setup("fit")
        batches.append(list(dm.train_dataloader()))
    assert len(batches[0]) == len(batches[1]) > 1
    for x, y in zip(*batches):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k


def test_ddp_two_cpu_processes(ddp_four_steps):
    """train.py trainer=ddp on 2 CPU processes (conftest's shared run): one run folder with its checkpoint, rank 0
    logs the run, rank 1 warnings and errors only."""
    run, out, _, _ = ddp_four_steps
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(glob.glob(str(run / "checkpoints" / "*.ckpt"))) >= 1
    assert not list((run.parent / "logs").glob("**/runs/*")), "a second run folder was created"
    # rank 1 logs warnings and errors only: its info lines repeated rank 0's on the console
    console = out.stdout + out.stderr
    assert console.count("instantiating model") == 1, console[-3000:]
    assert "training from step" in (run / "train.log").read_text()
    assert "INFO" not in (run / "train_ddp_process_1.log").read_text()


def test_fsdp_strategy_wraps_blocks():
    import hydra

    from musicflamingo.distributed import BLOCKS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer=fsdp", "data.train=x.jsonl"])
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {c.__name__ for c in policy._module_classes} == {"EncoderLayer", "DecoderLayer"}
    assert strategy._activation_checkpointing_kwargs
    assert cfg.trainer.precision == "bf16-true" and cfg.trainer.use_distributed_sampler is False
    assert {c.__name__ for c in BLOCKS} == {"EncoderLayer", "DecoderLayer"}


def test_from_scratch_init_lets_the_audio_through():
    """The encoder's convolutions keep log-mel's scale, so a clip's content is not drowned by the sinusoidal
    positions added after them (with normal(0, 0.02) convs it was ~2 % of the output's variation)."""
    model = create_model("small", seed=0)
    tower = model.audio_tower
    torch.manual_seed(0)
    mel = torch.randn(4, tower.conv1.in_channels, 300) * 0.5 + 0.3  # log-mel-like: std ~0.5
    with torch.no_grad():
        x = torch.nn.functional.gelu(tower.conv1(mel))
        x = torch.nn.functional.gelu(tower.conv2(x))
    positions = tower.embed_positions.weight[: x.shape[-1]]
    assert x.std() > 0.5 * positions.std(), (x.std(), positions.std())


def test_piped_output_logs_progress_lines_and_no_library_noise(assets, tmp_path, caplog):
    """Stderr is not a terminal under pytest (as in `make demo > log`): no progress bar, a `ProgressLog` line every
    N steps with loss, tokens/s and ETA, and none of the warnings known to be harmless (no validation set, fewer
    batches an epoch than log_every_n_steps)."""
    import logging
    import warnings

    from musicflamingo.runtime import quiet_known_warnings, stderr_is_terminal

    assert not stderr_is_terminal()
    proc, manifest = assets
    cfg = compose_train(
        tmp_path, manifest, proc, ["trainer.max_steps=4", "callbacks.progress_log.every_n_steps=2"]
    )
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = (
            True  # the default configs' value: turned off because stderr is a pipe
        )
    quiet_known_warnings()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        quiet_known_warnings()  # `simplefilter` above reset the filters
        _, obj = train(cfg)
    assert obj["trainer"].progress_bar_callback is None
    lines = [r.getMessage() for r in caplog.records if r.name == "musicflamingo.callbacks"]
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == ["step 2/4", "step 4/4"], lines
    assert all("loss " in s and "tokens/s" in s and "ETA" in s for s in steps)
    noise = [
        str(w.message)
        for w in caught
        if any(s in str(w.message) for s in ("across ranks is zero", "LeafSpec", "smaller than the logging"))
    ]
    assert not noise, noise
    assert not [r for r in caplog.records if "💡" in r.getMessage()]


def test_pretrained_model_to_train_starts_in_train_mode(tiny_ckpt):
    """`from_pretrained` gives eval mode (inference) and Lightning keeps a module's mode at fit start: the model
    built for training from a checkpoint must train with dropout, not silently in eval mode."""
    from musicflamingo.model.build import build_model

    lora = {"enabled": False, "rank": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj"]}
    freeze = {"audio_tower": False, "multi_modal_projector": False, "language_model": False}
    model = build_model(
        preset=None,
        overrides={},
        init_from=str(tiny_ckpt),
        seed=0,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze=freeze,
        lora=lora,
    )
    assert all(m.training for m in model.modules())

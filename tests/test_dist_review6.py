"""Scaling a run from one process to many: `trainer=fsdp` on two CPU processes (gloo) trains as one process
accumulating the same global batch, clips by the norm of the whole sharded model, keeps every rank's outputs in one
run folder, exports (rank 0) a folder that loads and equals the trained weights, trains LoRA over frozen parts, and
resumes its checkpoints (refused, naming the setting, on another device count); settings that cannot run are refused
naming the setting."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import compose_train, run_fsdp_on_cpu, write_dataset, write_processor

from musicflamingo.lit import CheckpointMismatchError
from musicflamingo.settings import SettingsError, check_train_settings
from musicflamingo.training import train

COMMON = [
    "trainer.log_every_n_steps=1",
    "data.batch_max_tokens=800",
    "model.scheduler.max_steps=8",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return write_processor(root / "proc"), write_dataset(
        root / "data", n=8
    )  # 8 clips: 4 batches at 800 tokens


def _fsdp(run: Path, assets, overrides: list[str]) -> subprocess.CompletedProcess:  # noqa: ANN001
    proc, manifest = assets
    return run_fsdp_on_cpu(run, proc, manifest, ["trainer.precision=32", *COMMON, *overrides])


def _single(tmp: Path, assets, overrides: list[str]) -> dict:  # noqa: ANN001
    proc, manifest = assets
    _, objects = train(compose_train(tmp, manifest, proc, COMMON + overrides))
    return objects


def _rows(run: Path) -> list[dict[str, str]]:
    return [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("train/loss")]


def _step_metrics(run: Path) -> list[tuple[int, float, float, float]]:
    """(step, train/loss, train/label_tokens, the decoder's norm/bias learning rate) of every row with a loss."""
    return [
        (
            int(r["step"]),
            float(r["train/loss"]),
            float(r["train/label_tokens"]),
            float(r["lr/language_model_no_decay"]),
        )
        for r in _rows(run)
    ]


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def _export_weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _reference_export(tmp: Path, assets, state: dict, overrides: list[str]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The export one process writes for the model of `overrides` holding the checkpoint weights `state`."""
    import hydra

    proc, manifest = assets
    cfg = compose_train(tmp, manifest, proc, COMMON + overrides)
    lit = hydra.utils.instantiate(cfg.model)
    lit.load_state_dict(state)
    return _export_weights(lit.export(tmp / "ref_export"))


# ---------------------------------------------------------------------------------------------- FSDP on CPU
@pytest.fixture(scope="module")
def fsdp_and_one(assets, tmp_path_factory) -> tuple[Path, dict]:  # noqa: ANN001
    """One 4-step trainer=fsdp run on 2 CPU processes (configured weight decay and clipping, export on) and one
    process accumulating the same 2 batches a step: (the FSDP run folder, the one process's train() objects). The
    parity tests below read both; none changes them."""
    tmp = tmp_path_factory.mktemp("fsdp_parity")
    run = tmp / "fsdp" / "run"
    _fsdp(run, assets, ["trainer.max_steps=4"])
    one = _single(tmp / "one", assets, ["trainer.max_steps=4", "trainer.accumulate_grad_batches=2"])
    return run, one


def test_fsdp_on_two_cpu_processes_trains_as_one_process_and_exports_the_trained_weights(
    assets, fsdp_and_one, tmp_path
):
    """trainer=fsdp trainer.accelerator=cpu trainer.devices=2 (gloo; gradient clipping and weight decay on, as
    configured) logs the step metrics and ends with the weights of one process accumulating the same 2 batches a
    step; rank 0 alone writes the run folder's logs, checkpoint and export; the export is the checkpoint's weights,
    in the layout one process exports. (Lightning refused the CPU, FSDP's norm clipping stopped at the first step,
    and the export ran on rank 0 alone while gathering needs every rank.)"""
    run, one = fsdp_and_one
    assert one["trainer"].global_step == 4
    fsdp, single = _step_metrics(run), _step_metrics(run.parents[1] / "one" / "run")
    assert [s for s, *_ in fsdp] == [0, 1, 2, 3]
    for a, b in zip(fsdp, single, strict=True):
        assert a == pytest.approx(b, rel=1e-5), (fsdp, single)
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4
    trained = one["model"].state_dict()
    assert ckpt["state_dict"].keys() == trained.keys()
    for k, v in trained.items():
        assert torch.allclose(ckpt["state_dict"][k], v, atol=1e-6, rtol=0), k
    # one run folder, written by rank 0 (rank 1 only its own log file)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not (run.parent / "logs").exists() or not list((run.parent / "logs").glob("**/runs/*"))
    assert [p.name for p in run.rglob("metrics.csv")] == ["metrics.csv"]
    # the export: the trained weights, as one process exports them
    exported = _export_weights(run / "export")
    reference = _reference_export(tmp_path / "ref", assets, ckpt["state_dict"], [])
    assert exported.keys() == reference.keys()
    for k, v in reference.items():
        assert exported[k].shape == v.shape and torch.equal(exported[k], v), k
    from musicflamingo.model.musicflamingo import MusicFlamingo

    loaded = MusicFlamingo.from_pretrained(run / "export")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"]["model." + k]), k


def test_fsdp_weight_decay_groups_and_grad_norm_are_those_of_one_process(fsdp_and_one):
    """The optimizer's groups under FSDP are one process's (weight decay on matrices, off on biases and norms), and
    train/grad_norm is the whole model's. FSDP (use_orig_params) shows each rank's shard of a weight as a 1-d view:
    lit.param_groups' `p.ndim < 2` put every weight into a `*_no_decay` group (weight decay silently off), and
    on_before_optimizer_step's norm is rank 0's shard's. (The run of the test above, configured weight decay.)"""
    run, one = fsdp_and_one
    norms = [float(r["train/grad_norm"]) for r in _rows(run)]
    assert len(norms) == 4
    assert norms == pytest.approx(
        [float(r["train/grad_norm"]) for r in _rows(run.parents[1] / "one" / "run")], rel=1e-5
    )
    groups = [
        (g["name"], len(g["params"]), g["weight_decay"])
        for g in _ckpt(run / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"]
    ]
    expected = [
        (g["name"], len(g["params"]), g["weight_decay"]) for g in one["trainer"].optimizers[0].param_groups
    ]
    assert any(wd > 0 for *_, wd in expected) and any(wd == 0 for *_, wd in expected)
    assert groups == expected


def test_fsdp_lora_over_frozen_parts_trains_resumes_and_exports(assets, tmp_path):
    """LoRA on the decoder and a frozen audio tower under FSDP (frozen and trained weights share a unit): the frozen
    weights stay as built, the adapters train, the run resumes on the same 2 processes to the step asked, and its
    export is the merged model one process exports from the same weights. Resumed on 1 process it is refused naming
    trainer.devices."""
    proc, manifest = assets
    lora = [
        "model.net.lora.enabled=true",
        "model.net.freeze.audio_tower=true",
        "model.optimizer.weight_decay=0.0",
    ]
    run = tmp_path / "fsdp" / "run"
    _fsdp(run, assets, ["trainer.max_steps=2", "export=false", *lora])
    first = _ckpt(run / "checkpoints" / "last.ckpt")
    backup = tmp_path / "two_steps"
    shutil.copytree(run, backup)
    _fsdp(run, assets, ["trainer.max_steps=3", "ckpt_path=last", *lora])
    last = _ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3 and first["global_step"] == 2
    from musicflamingo.model.build import create_model

    built = create_model("tiny", {"audio": {"max_source_positions": 100}}, None, 0).state_dict()
    for k, v in built.items():
        if k.startswith("audio_tower.") or k.startswith("language_model.") and "lora" not in k:
            assert torch.equal(last["state_dict"]["model." + k], v), k
    adapters = [k for k in last["state_dict"] if "lora_b" in k.lower()]
    assert adapters and any(not torch.equal(last["state_dict"][k], first["state_dict"][k]) for k in adapters)
    exported = _export_weights(run / "export")
    reference = _reference_export(tmp_path / "ref", assets, last["state_dict"], lora)
    assert exported.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.allclose(exported[k], v, atol=1e-7, rtol=0), k
    # another world size: the data order cannot continue, refused before anything trains
    with pytest.raises(CheckpointMismatchError, match=r"trainer.devices"):
        train(
            compose_train(
                tmp_path / "again",
                manifest,
                proc,
                COMMON
                + lora
                + ["trainer.max_steps=3", f"paths.output_dir={backup}", "ckpt_path=last", "export=false"],
            )
        )


# ---------------------------------------------------------------------------------------------- settings
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_fsdp_on_a_machine_without_cuda_names_the_cpu_setting(assets, tmp_path):
    """trainer=fsdp keeps trainer.accelerator=gpu: without CUDA the refusal names what runs FSDP here
    (trainer.accelerator=cpu), not trainer=cpu, which drops FSDP altogether."""
    proc, manifest = assets
    cfg = compose_train(tmp_path, manifest, proc, ["trainer=fsdp"])
    from omegaconf import OmegaConf

    with pytest.raises(SettingsError, match=r"trainer.accelerator='gpu'.*trainer.accelerator=cpu"):
        check_train_settings(OmegaConf.to_container(cfg, resolve=True))


def test_fsdp_clips_by_the_norm_of_the_sharded_model():
    """trainer.gradient_clip_val with FSDP clips through the root module's `clip_grad_norm_` (Lightning's own
    FSDP precision refuses norm clipping at the first step: every GPU run of trainer=fsdp stopped there)."""
    from musicflamingo.distributed import fsdp_strategy

    strategy = fsdp_strategy()
    from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision

    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    calls = []

    class Root(torch.nn.Module):
        def clip_grad_norm_(self, value):  # noqa: ANN001, ANN202
            calls.append(value)

    strategy.model = Root()
    strategy.precision_plugin.clip_gradients(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]), 0.5)
    assert calls == [0.5]

"""LoRA under `trainer=fsdp trainer.precision=bf16-true` (review round 12, fsdp-lora journey).

FSDP1 flattens a unit's parameters into one tensor of one dtype, so the adapters used to follow bf16-true's cast
there (with a warning), where AdamW's small updates round away. They now stay out of FSDP's flat parameters
(`distributed.MusicFlamingoFSDP`: replicated, float32, their gradients averaged over the ranks), as float32 as on one
device: a step with a tiny learning rate moves them where bf16 adapters would not have moved, as one process
accumulating the same global batch moves them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import compose_train, run_fsdp_on_cpu, write_dataset, write_processor

from musicflamingo.training import train

COMMON = [
    "experiment=lora",
    "trainer.precision=bf16-true",
    "trainer.log_every_n_steps=1",
    "data.batch_max_tokens=800",
    "model.scheduler.max_steps=8",
    "model.net.lora.dropout=0.0",  # the ranks draw other dropout masks than one process
    "model.optimizer.lr=1e-6",  # AdamW's first steps move each weight by about this: far below a bf16 ulp of A
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_lora")
    return write_processor(root / "proc"), write_dataset(
        root / "data", n=8
    )  # 8 clips: 4 batches at 800 tokens


def _fsdp(run: Path, assets, overrides: list[str]) -> None:  # noqa: ANN001
    proc, manifest = assets
    run_fsdp_on_cpu(run, proc, manifest, [*COMMON, *overrides])


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")


def _adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("lora_A", "lora_B"))}


def _moment_dtypes(checkpoint: dict) -> dict[str, set[torch.dtype]]:
    optimizer = checkpoint["optimizer_states"][0]
    return {
        g["name"]: {optimizer["state"][i][m].dtype for i in g["params"] for m in ("exp_avg", "exp_avg_sq")}
        for g in optimizer["param_groups"]
    }


def _grad_norms(run: Path) -> list[float]:
    rows = csv.DictReader(open(run / "csv" / "metrics.csv"))
    return [float(r["train/grad_norm"]) for r in rows if r.get("train/grad_norm")]


def test_fsdp_bf16_true_trains_float32_adapters_as_one_process(assets, tmp_path):
    """trainer=fsdp trainer.precision=bf16-true experiment=lora on 2 CPU processes, lr 1e-6: the checkpoint's
    adapters and their AdamW moments are float32 over the bf16 base; two steps moved lora_A by amounts that round
    away in bf16 (a bf16 adapter keeps its value), and every adapter equals what one process accumulating the same
    global batch trains; the merged export is bf16 computed from the float32 adapters.

    Review 13: train/grad_norm is one process's (the replicated adapters were counted once per rank: sqrt(2) times
    their share), and export_adapters=true writes peft's folder, float32 adapters equal to the checkpoint's (the
    plain copy's LoRA layers trained their base weights, and save_peft_adapter refused them)."""
    proc, manifest = assets
    single = COMMON + ["trainer.max_steps=2", "export=false", "trainer.accumulate_grad_batches=2"]
    cfg = compose_train(tmp_path / "one", manifest, proc, single)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the model train() builds, before any step
    initial = {
        "model." + k: v.detach().clone()
        for k, v in hydra.utils.instantiate(cfg.model).model.state_dict().items()
    }

    run = tmp_path / "fsdp" / "run"
    _fsdp(run, assets, ["trainer.max_steps=2", "export=true", "export_adapters=true"])
    checkpoint = _ckpt(run / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    state = checkpoint["state_dict"]
    adapters = _adapters(state)
    assert len(adapters) == 16 and {v.dtype for v in adapters.values()} == {torch.float32}
    assert state["model.language_model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    # the language model's group holds only its adapters (its base is frozen): their moments float32
    assert _moment_dtypes(checkpoint)["language_model"] == {torch.float32}

    # the tiny steps: lora_A moved in float32, by less than half a bf16 ulp nearly everywhere
    moved = rounded_away = total = 0
    for k, v in adapters.items():
        if not k.endswith("lora_A"):
            continue
        start = initial[k]
        assert start.dtype == torch.float32
        delta = v - start
        moved += int((delta != 0).sum())
        rounded_away += int(((start.bfloat16().float() + delta).bfloat16() == start.bfloat16()).sum())
        total += v.numel()
    assert moved > 0.95 * total, (moved, total)
    assert rounded_away > 0.95 * total, (rounded_away, total)

    # one process, the same global batch (2 ranks x 1 batch = 2 accumulated batches): the same adapters
    _, objects = train(cfg)
    reference = _adapters({"model." + k: v for k, v in objects["model"].model.state_dict().items()})
    assert reference.keys() == adapters.keys()
    for k, v in reference.items():
        assert v.dtype == torch.float32
        # the bf16 projector's update and the ranks' sums differ from one process's in rounding: a few entries
        # whose gradient is near 0 take another AdamW step (under 1 % of the mean change; rank 0's own gradients,
        # unaveraged, were 47 %)
        diff = (adapters[k] - v).abs()
        step = (v - initial[k]).abs().mean()
        assert diff.mean() < 0.05 * step, (k, diff.mean(), step)

    exported = {}
    for f in sorted((run / "export").glob("*.safetensors")):
        exported.update(load_file(f))
    prefix = "model.language_model.layers.0.self_attn.q_proj."
    scale = objects["model"].model.language_model.layers[0].self_attn.q_proj.scale
    merged = (
        state[prefix + "weight"].float() + (state[prefix + "lora_B"] @ state[prefix + "lora_A"]) * scale
    ).to(torch.bfloat16)
    q = exported["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16 and torch.equal(q, merged)

    # peft's folder: the checkpoint's float32 adapters and its bf16 projector (modules_to_save), unchanged
    peft = load_file(run / "export_adapter" / "adapter_model.safetensors")
    for k, v in adapters.items():
        name = k.removeprefix("model.language_model.") + ".weight"
        (saved,) = [t for n, t in peft.items() if n.endswith("." + name)]
        assert saved.dtype == torch.float32 and torch.equal(saved, v), k
    projector = {k: v for k, v in state.items() if k.startswith("model.multi_modal_projector.")}
    assert projector
    for k, v in projector.items():
        (saved,) = [t for n, t in peft.items() if n.endswith(k.removeprefix("model."))]
        assert saved.dtype == torch.bfloat16 and torch.equal(saved, v), k

    # the gradient norm each step logs: one process's (the same gradients up to the rounding above)
    fsdp_norms, one_norms = _grad_norms(run), _grad_norms(tmp_path / "one" / "run")
    assert len(fsdp_norms) == len(one_norms) == 2
    for a, b in zip(fsdp_norms, one_norms, strict=True):
        assert abs(a - b) < 0.01 * b, (fsdp_norms, one_norms)


def _saved(run: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(global step, state dict, optimizer states) of a run's last.ckpt, a file (state_dict_type=full) or a folder
    of torch.distributed.checkpoint shards (sharded)."""
    path = run / "checkpoints" / "last.ckpt"
    if path.is_file():
        ckpt = _ckpt(path)
        return ckpt["global_step"], ckpt["state_dict"], ckpt["optimizer_states"][0]["state"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, run / "whole.pt")
    ckpt = _ckpt(run / "whole.pt")
    return _ckpt(path / "meta.pt")["global_step"], ckpt["model"], ckpt["optimizer_0"]["state"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_fsdp_bf16_true_float32_adapters_resume_exactly(assets, tmp_path, kind):
    """trainer=fsdp bf16-true LoRA, trainer.strategy.state_dict_type=full or sharded: 2 steps + a resume to 3 give
    the 3-step run's adapters and AdamW moments bit for bit, still float32 (the resumed run's precision cast leaves
    the adapters alone; a sharded checkpoint's states of the replicated adapters load whole). A sharded
    checkpoint is a folder: ckpt_path=last found no last.ckpt file there (a fresh start, refused) and
    ckpt_path=<folder> was 'no such checkpoint file' (review 13)."""
    whole, cut = tmp_path / "whole" / "run", tmp_path / "cut" / "run"
    common = ["export=false", f"trainer.strategy.state_dict_type={kind}"]
    _fsdp(whole, assets, ["trainer.max_steps=3", *common])
    _fsdp(cut, assets, ["trainer.max_steps=2", *common])
    _fsdp(cut, assets, ["trainer.max_steps=3", "ckpt_path=last", *common])
    (step_a, state_a, opt_a), (step_b, state_b, opt_b) = _saved(whole), _saved(cut)
    assert step_a == step_b == 3
    adapters = _adapters(state_a)
    assert adapters and {v.dtype for v in adapters.values()} == {torch.float32}
    for k, v in adapters.items():
        assert state_b[k].dtype == torch.float32 and torch.equal(v, state_b[k]), k
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = opt_a[i][key], opt_b[i][key]
            assert a.dtype == b.dtype and torch.equal(a, b), (i, key)
    # the adapters' moments float32, the bf16 projector's bf16
    assert sum(opt_b[i]["exp_avg"].dtype == torch.float32 for i in opt_b) == len(adapters)


def test_resolve_ckpt_path_takes_a_sharded_checkpoint_folder(tmp_path):
    """trainer.strategy.state_dict_type=sharded saves last.ckpt as a folder (meta.pt written last): ckpt_path=last
    and ckpt_path=<folder> resume from it (last found nothing, and a fresh start in the folder was refused; the
    folder was 'no such checkpoint file'); a folder without meta.pt (a save cut short) is named, not resumed."""
    from musicflamingo.training import resolve_ckpt_path

    folder = tmp_path / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"last.ckpt is a folder without meta.pt"):
        resolve_ckpt_path("last", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"without meta.pt"):
        resolve_ckpt_path(str(folder), tmp_path)
    (folder / "meta.pt").write_bytes(b"")
    assert resolve_ckpt_path("last", tmp_path) == str(folder)
    assert resolve_ckpt_path(str(folder), tmp_path) == str(folder)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), tmp_path)

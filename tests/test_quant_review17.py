"""QLoRA / planner review (round 17, quant-plan journey): the refusals `model.net.quantize_base=nf4` makes on a
machine that has CUDA but cannot run it (bitsandbytes older than 0.46, a GPU without native bfloat16: its NF4
linears compute in bf16). The probes (torch.cuda's capability calls, bitsandbytes' version) are patched: the checks
run here, on a CPU machine, as on the GPU machine they are for."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from musicflamingo.model.lora import QuantizationUnavailable, check_quantize_base


def _gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:  # noqa: ANN001
    """torch.cuda as on a machine with one `name` GPU of `capability` (bf16 natively from 8.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: capability >= (8, 0) or including_emulation,
    )


def _bitsandbytes(monkeypatch, version: str) -> None:  # noqa: ANN001
    """A stand-in `bitsandbytes` of `version` (import_bitsandbytes returns an imported one as it is)."""
    stand_in = types.ModuleType("bitsandbytes")
    stand_in.__version__ = version
    monkeypatch.setitem(sys.modules, "bitsandbytes", stand_in)


@pytest.mark.parametrize("version", ["0.45.5", "0.42.0", "0.45.1.dev0"])
def test_qlora_refused_with_bitsandbytes_older_than_0_46(monkeypatch, version):
    """README and requirements-test.txt ask for bitsandbytes >= 0.46; an older one was let through to fail later
    inside its own modules (or compute with an older NF4 layout). Refused naming the installed version and the
    one needed, with the fallback."""
    _gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    _bitsandbytes(monkeypatch, version)
    with pytest.raises(
        QuantizationUnavailable,
        match=rf"quantize_base=nf4: bitsandbytes {version} is installed, .*>= 0\.46 .*quantize_base=null",
    ):
        check_quantize_base("nf4")
    for ok in ("0.46.0", "0.47.0+cu121", "1.0"):
        _bitsandbytes(monkeypatch, ok)
        check_quantize_base("nf4")  # no refusal


def test_qlora_refused_on_a_gpu_without_native_bf16(monkeypatch):
    """The NF4 linears compute in bfloat16 (`nf4_linear_class`), which a T4 or V100 only emulates: the run was let
    through. Refused naming the GPU and its compute capability, with a setting that runs there (the usual fallback,
    bf16-true, is no answer on such a GPU)."""
    _bitsandbytes(monkeypatch, "0.48.2")
    _gpu(monkeypatch, "Tesla T4", (7, 5))
    with pytest.raises(QuantizationUnavailable) as refused:
        check_quantize_base("nf4")
    message = str(refused.value)
    assert "model.net.quantize_base=nf4" in message and "Tesla T4 (compute capability 7.5)" in message
    assert "bfloat16" in message and "trainer.precision=16-mixed" in message and "bf16-true" not in message
    _gpu(monkeypatch, "NVIDIA L4", (8, 9))
    check_quantize_base("nf4")  # no refusal
    check_quantize_base("nf4", here=False)  # plan=true for another machine: the value alone


# ---------------------------------------------------------------------------------------------- generation plans
TWENTY_MINUTES = [1200.0] * 32  # infer.py audio=[32 songs of 20 minutes] batch_size=32


@pytest.fixture(scope="module")
def release_config(tmp_path_factory):
    """The release's config.json alone: what plan=true and the refusal read (no weights, no processor files:
    max_audio_len defaults to 1200 s)."""
    from musicflamingo.model.config import MusicFlamingoConfig

    folder = tmp_path_factory.mktemp("release")
    MusicFlamingoConfig.from_name("music_flamingo_2601").to_json(folder / "config.json", dtype="bfloat16")
    return folder


def _applied(settings: dict, sizes: dict, fix: str) -> tuple[dict, dict]:
    """`settings` and `check_generation`'s sizes with a listed fix ('quantize=int8 batch_size=1 ...') applied."""
    settings, sizes = dict(settings), dict(sizes)
    for part in fix.split():
        key, value = part.split("=")
        if key in ("dtype", "quantize"):
            settings[key] = value
        else:
            sizes[{"batch_size": "slots", "max_new_tokens": "new_tokens"}[key]] = int(value)
    return settings, sizes


def _listed(lines) -> list[str]:  # noqa: ANN001
    return [line.split("   (")[0].strip() for line in lines if line.startswith("  ") and "   (" in line]


def test_generation_refusal_combines_changes_when_none_fits_alone(release_config, monkeypatch):
    """The release on a 16 GB GPU, 32 songs of 20 minutes at once: neither int8 (the 32 slots' cache is 60 GB) nor
    batch_size=1 (the bf16 weights and one song: 20.6 GB) fits alone. The refusal said "none of the usual changes
    (LoRA, QLoRA, checkpointing, bf16-true, FSDP, a smaller batch)", training's levers, and listed nothing; it now
    lists changes together that fit (each planned again here within the budget), and plan=true the same."""
    from musicflamingo.planner import MemoryPlanError, check_generation

    monkeypatch.setattr(  # a CUDA device as the run would resolve it (this machine has none)
        "musicflamingo.runtime.resolve_device_dtype",
        lambda device, dtype, n, quantize: (torch.device("cuda"), torch.bfloat16),
    )
    base, sizes, budget = {"device": "cuda", "dtype": "auto"}, {"slots": 32, "new_tokens": 2048}, 16 * 10**9
    with pytest.raises(MemoryPlanError) as refused:
        check_generation(base, release_config, TWENTY_MINUTES, available=lambda dev: budget, **sizes)
    message = str(refused.value)
    assert "settings that would fit" in message and "LoRA" not in message and "FSDP" not in message, message
    fixes = _listed(message.splitlines())
    assert fixes and all(len(fix.split()) > 1 for fix in fixes), fixes  # no change alone fits
    assert "quantize=int8 batch_size=1" in fixes, fixes
    for fix in fixes:
        settings, changed = _applied({**base, "plan": True}, sizes, fix)
        assert check_generation(settings, release_config, TWENTY_MINUTES, **changed).peak <= budget, fix
    shown = check_generation(
        {**base, "plan": True, "plan_memory_gb": budget / 1e9}, release_config, TWENTY_MINUTES, **sizes
    )
    assert "settings that would fit" in shown.notes[0] and _listed(shown.notes) == fixes, shown.notes


def test_generation_refusal_when_nothing_fits_names_its_own_levers(release_config, monkeypatch):
    """4 GB for the release: nothing fits. The message names generation's levers and the lightest combination's
    peak (training's refusal does so; generation's named LoRA, QLoRA, FSDP ... and no peak)."""
    from musicflamingo.planner import MemoryPlanError, check_generation

    monkeypatch.setattr(
        "musicflamingo.runtime.resolve_device_dtype",
        lambda device, dtype, n, quantize: (torch.device("cuda"), torch.bfloat16),
    )
    with pytest.raises(MemoryPlanError) as refused:
        check_generation(
            {"device": "cuda"},
            release_config,
            TWENTY_MINUTES,
            slots=32,
            new_tokens=2048,
            available=lambda dev: 4 * 10**9,
        )
    message = str(refused.value)
    assert "LoRA" not in message and "dtype, quantize, batch_size and max_new_tokens" in message, message
    assert "the lightest, quantize=int4 batch_size=1 max_new_tokens=" in message and "still needs" in message
    shown = check_generation(
        {"device": "cuda", "plan": True, "plan_memory_gb": 4},
        release_config,
        TWENTY_MINUTES,
        slots=32,
        new_tokens=2048,
    )
    assert "does not fit" in shown.notes[0] and any("the lightest, quantize=int4" in n for n in shown.notes)


# ---------------------------------------------------------------------------------------------- old QLoRA checkpoints
def test_a_qlora_state_dict_from_before_the_digest_says_why_it_cannot_load(monkeypatch):
    """A QLoRA checkpoint written before 13acc76 holds each base's packed 4-bit weight and bitsandbytes' quant_state
    keys (its own `Linear4bit` state dict), no digest. Loading it into the rebuilt model listed a missing
    `base_digest` and six unexpected keys for every decoder linear; it now says once what the checkpoint is, why it
    cannot resume and what to do."""
    pytest.importorskip("bitsandbytes")
    from test_quantize_review16 import _let_cpu_quantize, _qlora

    from musicflamingo.model.lora import import_bitsandbytes, nf4_linear_class

    _let_cpu_quantize(monkeypatch)
    trained = _qlora().to("cpu")  # quantized, as on the GPU
    # what the old code saved: bitsandbytes' own state dict for each 4-bit base
    monkeypatch.setattr(
        nf4_linear_class(), "_save_to_state_dict", import_bitsandbytes().nn.Linear4bit._save_to_state_dict
    )
    old = trained.state_dict()
    assert "language_model.layers.0.self_attn.q_proj.base.weight.quant_state.bitsandbytes__nf4" in old
    monkeypatch.undo()
    _let_cpu_quantize(monkeypatch)
    with pytest.raises(RuntimeError) as refused:
        _qlora().load_state_dict(old, strict=True)
    message = str(refused.value)
    layer = "language_model.layers.0.self_attn.q_proj.base"
    assert f"{layer}: the checkpoint holds this layer's frozen 4-bit" in message
    assert "cannot resume" in message and "start the run afresh" in message and "hydra.run.dir" in message
    assert message.count("frozen 4-bit base weight") == 1 and "base_digest" not in message, message

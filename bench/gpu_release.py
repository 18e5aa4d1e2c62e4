"""The release-size model (`music_flamingo_2601`, 8.27 B) on a GPU: ours against the reference, each in a process of
its own, with random weights of the release's exact shapes made on the device (no 16 GB file to carry), in bf16.

    bash bench/gpu_check.sh release                                       # on a lent GPU: JSON to $OUT
    python bench/gpu_release.py --render gpu_release.json --doc docs/performance.md   # back here: the table
    python bench/gpu_release.py --preset tiny --device cpu --out /tmp/g.json   # smoke run (seconds)

Three workers: `qlora` (ours with the decoder's linears in bitsandbytes' NF4, rank-16 adapters, a 30 s clip + 256
tokens at batch 1, checkpointing: tokens/s, peak memory after the conversion, then the export's merge into bf16
checked on a prompt's logits), then `ours` and `ref`: time to first token for 30 s, 5 min and 20 min of audio (batch
1, `max_new_tokens=1`), decode tokens/s at batch 1, 8 and 32 from 64-token text prompts (eager; ours also with its
compiled decode step), and one LoRA step (rank 16 on the language model's attention and MLP projections, gradient
checkpointing, AdamW, 2 rows of 5 min of audio + 512 text tokens; the reference through `peft`), each with its peak
memory and, for ours, the memory planner's prediction; ours then runs one full fine-tune step (bf16-true, AdamW,
checkpointing) where the planner says it fits the card. The reference gets the very values ours drew (same seed, our
names renamed to its own). The full fine-tune's fit comes from the planner (`musicflamingo.planner`), which needs
no device. The JSON is written after every case, so a run cut short keeps what it measured; a case that fails is
recorded and the next one runs.

The lent GPU machines have no bitsandbytes and no network: `bash bench/gpu_site.sh` here, then the device call
carries `bench/gpu_site` (gpu_check.sh puts it on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from cases import (  # noqa: E402
    Clock,
    Int8StandIn,
    greedy_generate,
    random_model,
    release_inputs,
)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = {"enabled": True, "rank": 16, "alpha": 32, "dropout": 0.0, "targets": list(LORA_TARGETS)}
# peft matches the bare names anywhere (the audio tower has q/k/v_proj too): this keeps its adapters where ours are
PEFT_TARGETS = r".*language_model.*\.(" + "|".join(LORA_TARGETS) + ")"
LORA_STEP = {"seconds": 300.0, "text": 512, "rows": 2}  # 2 rows of 5 min of audio + 512 text tokens
QLORA_STEP = {"seconds": 30.0, "text": 256, "rows": 1}  # issue 23's QLoRA fit: a 30 s clip + 256 tokens ...
QLORA_FITS_GB = 20.0  # ... under 20 GB
# the same at the small presets' scale (CPU smoke runs)
SMOKE_LORA_STEP = {"seconds": 8.0, "text": 64, "rows": 2}
SMOKE_QLORA_STEP = {"seconds": 8.0, "text": 32, "rows": 1}
TIMEOUTS = "qlora=100,ours=250,ref=200"  # seconds per worker process: the three fit gpu_check.sh's 570 s
# Dense bf16 peaks (TFLOP/s, no sparsity) by device name, from the vendors' datasheets.
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# The best published LoRA figure for a 7-8 B decoder we found, printed beside ours (FP8, where ours is bf16; NeMo
# counts forward + backward model FLOPs with no recomputation: 4 per weight and token for frozen weights)
PUBLISHED_LORA = (
    "NeMo 24.12 performance summary, Llama 2 7B LoRA on 8 GPUs, FP8, rows packed to 4096 tokens: 24 824 tokens/s "
    "and 663 model TFLOP/s per GPU (docs.nvidia.com/nemo-framework/user-guide/24.12/nemotoolkit/performance/"
    "performance_summary.html)"
)
# compiled last: tracing takes the longest, and a run cut by its timeout keeps every case before it
DEFAULT_CASES = "qlora,ttft:30,ttft:300,ttft:1200,decode:1,decode:8,decode:32,lora,full,compiled:1,compiled:8"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    """The most memory tensors held at once since the last reset (what the planner predicts)."""
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def _reserved_gb(device: torch.device) -> float | None:
    """The most the caching allocator held from the device (what a smaller card must have free)."""
    return torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None


def reference_from(ours, device: torch.device):  # noqa: ANN001, ANN201
    """The reference model holding `ours`' values under its own names (`checkpoint.ours_to_hf`), bf16 on `device`."""
    from transformers import MusicFlamingoConfig as RefConfig
    from transformers import MusicFlamingoForConditionalGeneration

    from musicflamingo.checkpoint import ours_to_hf

    config = RefConfig.from_dict(ours.config.to_hf_dict(dtype="bfloat16"))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            ref = MusicFlamingoForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    state = {_module_name(ours_to_hf(k)): v for k, v in ours.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.text_config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise SystemExit(
            f"reference names differ: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return ref.eval()


def _module_name(name: str) -> str:
    """A checkpoint name as the reference's modules spell it (its `from_pretrained` renames the same way on load):
    `language_model.lm_head.*` -> `lm_head.*`, `language_model.model.*` -> `model.language_model.*`, the audio
    tower and projector under `model.`."""
    if name.startswith("language_model.lm_head."):
        return name.removeprefix("language_model.")
    if name.startswith("language_model.model."):
        return "model.language_model." + name.removeprefix("language_model.model.")
    return "model." + name


def _lora_inputs(
    config, seconds: float, rows: int, text: int, device: torch.device
) -> tuple[dict, torch.Tensor]:  # noqa: ANN001
    """`rows` rows of `seconds` of audio (whole windows) and `text` tokens on `device`, and their labels."""
    inputs = release_inputs(config, seconds, rows, text, labels=True)
    labels = inputs.pop("labels")
    return _on(inputs, device), labels.to(device)


def _step_setup(device: torch.device, inputs: dict, labels: torch.Tensor, **training: object):  # noqa: ANN202
    """The planner's `TrainingSetup` for one bf16-true, checkpointed step on `inputs` (`training`: what trains)."""
    from musicflamingo.planner import TrainingSetup

    return TrainingSetup(
        precision="bf16-true",
        device=device.type,
        checkpointing=True,
        tokens=inputs["input_ids"].numel(),
        windows=inputs["input_features"].shape[0],
        labelled=int((labels != -100).sum()),
        rows=inputs["input_ids"].shape[0],
        **training,
    )


def _on(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _seconds(device: torch.device, fn) -> float:  # noqa: ANN001
    with Clock(device) as c:
        fn()
    return c.seconds


def _plan_gb(plan) -> float:  # noqa: ANN001
    return plan.peak / 1e9


def plan_training_gb(
    config, device: torch.device, inputs: dict, labels: torch.Tensor, quantized: bool
) -> float:  # noqa: ANN001
    """The memory planner's peak for the LoRA / QLoRA step below (bf16 weights, adapters only, checkpointing)."""
    from musicflamingo.planner import plan_training

    setup = _step_setup(
        device,
        inputs,
        labels,
        train_audio_tower=False,
        train_projector=False,
        train_language_model=False,
        lora_rank=LORA["rank"],
        lora_targets=LORA_TARGETS,
        quantize_base="nf4" if quantized else None,
    )
    return _plan_gb(plan_training(config, setup))


def plan_generation_gb(config, device: torch.device, inputs: dict, new_tokens: int) -> float:  # noqa: ANN001
    """The planner's peak for `model.generate` on `inputs` (`engine.generate`: every prompt embedded first)."""
    from musicflamingo.planner import plan_inference

    rows, prompt = inputs["input_ids"].shape
    windows = inputs["input_features"].shape[0] // rows if "input_features" in inputs else 0
    return _plan_gb(
        plan_inference(
            config,
            dtype_bytes=2,
            slots=rows,
            prompt_tokens=prompt,
            new_tokens=new_tokens,
            windows=windows,
            embed_batch=True,
            device=device.type,
        )
    )


def quantizer(device: torch.device):  # noqa: ANN201
    """The class QLoRA's frozen base becomes: bitsandbytes' NF4 on CUDA (refused with the setting's own error where
    it cannot run), the int8 stand-in of bench/cases.py on CPU (smoke runs of the code path)."""
    if device.type != "cuda":
        return Int8StandIn, "int8 stand-in (CPU smoke run)"
    from musicflamingo.model.lora import check_quantize_base, import_bitsandbytes, nf4_linear_class

    check_quantize_base("nf4")
    return nf4_linear_class(), f"bitsandbytes {import_bitsandbytes().__version__} nf4"


def import_peft():  # noqa: ANN201
    """peft's `LoraConfig` and `get_peft_model`. peft imports bitsandbytes where it is installed, and a plain
    `import bitsandbytes` on a CPU with AVX512-BF16 asks the Hugging Face Hub for a kernel: bitsandbytes is
    imported first as the qlora worker imports it (`lora.import_bitsandbytes`), without the Hub."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        from musicflamingo.model.lora import import_bitsandbytes

        import_bitsandbytes()
    from peft import LoraConfig, get_peft_model

    return LoraConfig, get_peft_model


def lora_step(
    impl: str,
    model,
    config,
    device: torch.device,
    seconds: float,
    text: int,
    rows: int,
    quantized=None,
) -> dict:  # noqa: ANN001
    """Seconds of one LoRA optimizer step (the median of three; the first also warms kernels and the allocator),
    tokens per step, peak memory of the steps. `quantized` (ours only): the frozen decoder linears become that
    class first (QLoRA), and the peak counts from after that conversion."""
    if impl == "ours":
        from musicflamingo.model.build import add_lora

        model.requires_grad_(False)  # only the adapters train, as with peft on the reference
        add_lora(model, LORA, quantized)
        model.to(device)  # bitsandbytes quantizes a Params4bit when it moves to the GPU
        model.set_gradient_checkpointing(True)
    else:
        try:
            LoraConfig, get_peft_model = import_peft()
        except ImportError:
            return {"skipped": "peft is not installed here"}
        model.requires_grad_(False)
        # non-reentrant, as ours: the reentrant kind gives adapters inside a layer no gradient when the layer's
        # input needs none (frozen embeddings)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=PEFT_TARGETS
            ),
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs, labels = _lora_inputs(config, seconds, rows, text, device)
    _reset_peak(device)
    resident = torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None

    # ours computes the loss chunk by chunk, without the full logits
    extra = {"return_logits": False} if impl == "ours" else {}
    with_grad = []

    def step() -> None:
        loss = model(**inputs, labels=labels, **extra).loss
        loss.backward()
        with_grad.append(sum(p.grad is not None for p in params))
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = [_seconds(device, step) for _ in range(3)]
    tokens = int(inputs["attention_mask"].sum())
    trainable = sum(p.numel() for p in params)
    frames = inputs["input_features"].shape[0] * config.audio.max_source_positions
    seconds_step = sorted(times)[1]
    flops = lora_step_flops(config, tokens, frames, trainable)
    entry = {
        "step_s": seconds_step,
        "tokens": tokens,
        "tokens_s": tokens / seconds_step,
        "trainable": trainable,
        "trainable_tensors": len(params),
        "tensors_with_grad": min(with_grad),
        "model_tflops": flops / seconds_step / 1e12,
        "peak_gb": _peak_gb(device),
        "reserved_gb": _reserved_gb(device),
        "resident_gb": resident,
    }
    if impl == "ours":
        entry["plan_gb"] = plan_training_gb(config, device, inputs, labels, quantized is not None)
    return entry


def lora_step_flops(config, tokens: int, frames: int, trainable: int) -> int:  # noqa: ANN001
    """FLOPs a LoRA step executes, from the config's shapes (a 4-bit base packs two weights a byte, so parameter
    tensors would undercount it): the decoder's weight matmuls (its linears and the head; not the embedding lookup)
    in the forward, their recomputation under checkpointing and the input-gradient backward, 2 FLOPs per weight and
    token each; the adapters add their weight gradients (8 per adapter weight and token in all); the frozen audio
    tower runs forward only per encoder frame, the projector per audio token (half as many). Attention's own FLOPs are not counted."""
    from musicflamingo.planner import parameter_counts

    n, t = parameter_counts(config), config.text
    decoder = t.num_hidden_layers * n["decoder_layer"] + t.vocab_size * t.hidden_size
    tower = n["audio_tower"] - n["audio_positions"]
    return tokens * (6 * decoder + 8 * trainable) + 2 * tower * frames + n["projector"] * frames  # P/2 tokens


def full_step(model, config, device: torch.device, release: bool) -> dict:  # noqa: ANN001
    """One AdamW step of the whole model (bf16-true, checkpointing; 5 min of audio + 512 text tokens, batch 1)
    where the planner says it fits this device (an H200, not an H100): tokens/s and the peak against the plan. The
    model is left frozen and in eval mode for the cases after it."""
    from musicflamingo.planner import plan_training

    inputs, labels = _lora_inputs(config, 300.0 if release else 8.0, 1, 512 if release else 32, device)
    planned = _plan_gb(plan_training(config, _step_setup(device, inputs, labels)))
    total = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else None
    if total is not None and planned > 0.92 * total:
        return {
            "skipped": f"planned {planned:.1f} GB > 92 % of this GPU's {total:.0f} GB",
            "plan_gb": planned,
        }
    model.requires_grad_(True)
    model.audio_tower.embed_positions.requires_grad_(False)  # frozen, as in training
    model.set_gradient_checkpointing(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    _reset_peak(device)

    def step() -> None:
        model(**inputs, labels=labels, return_logits=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        seconds = [_seconds(device, step) for _ in range(2)][1]  # the second: AdamW's states exist
        tokens = inputs["input_ids"].numel()
        return {
            "step_s": seconds,
            "tokens_s": tokens / seconds,
            "peak_gb": _peak_gb(device),
            "reserved_gb": _reserved_gb(device),
            "plan_gb": planned,
        }
    finally:
        opt.state.clear()
        model.requires_grad_(False).eval()
        model.set_gradient_checkpointing(False)


def unwrap_lora(model) -> None:  # noqa: ANN001
    """Ours back to a plain inference model after its LoRA step (adapters merged, no checkpointing, eval), so the
    cases after it time what they would without it."""
    from musicflamingo.model.lora import merge_lora

    merge_lora(model)
    model.set_gradient_checkpointing(False)
    model.requires_grad_(False).eval()


def merge_check(model, config, device: torch.device) -> dict:  # noqa: ANN001
    """QLoRA export's merge on the trained model: every adapter folded into its dequantised base, in bf16. Logits
    of a 64-token prompt before and after: the difference's norm relative to theirs (bf16 rounding of the merged
    weights, compounded over the layers, is all that should remain), and how often the top token agrees."""
    from musicflamingo.model.lora import QuantizedLinear, QuantizedLoRALinear, merge_lora

    prompt = _on(release_inputs(config, 0, 1), device)
    model.eval()
    layer = model.language_model.layers[0]
    probes = {"q_proj": layer.self_attn, "down_proj": layer.mlp}  # an attention and an MLP adapter
    with torch.no_grad():
        expected = {}  # dequantised base + B A * scale, in float32, as the merge must store it (then in bf16)
        for name, parent in probes.items():
            a = getattr(parent, name)
            if isinstance(a, QuantizedLoRALinear):
                expected[name] = a.base.dequantize().float() + a.lora_B.float() @ a.lora_A.float() * a.scale
        before = model(**prompt).logits.float()
        with Clock(device) as c:
            merged = merge_lora(model, torch.bfloat16)
        after = model(**prompt).logits.float()
        weight_err = max(
            float((getattr(probes[n], n).weight.float() - w).abs().max() / w.abs().max())
            for n, w in expected.items()
        )
    left = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    return {
        "merge_s": c.seconds,
        "merged": merged,
        "quantized_left": left,
        "weight_rel_err": weight_err,  # bf16 rounding: <= 2^-8 of the largest weight
        "logits_rel_diff": float((after - before).norm() / before.norm()),
        "top1_agree": float((after.argmax(-1) == before.argmax(-1)).float().mean()),
    }


def worker(
    impl: str, preset: str, device: torch.device, cases: list[str], out: Path, decode_tokens: int
) -> None:
    """One implementation's cases in this process: `ours`, `ref`, or `qlora` (ours with the nf4 base)."""
    from musicflamingo import MusicFlamingoConfig

    config = MusicFlamingoConfig.from_name(preset)
    pad = config.text.pad_token_id or 0
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    release = preset == "music_flamingo_2601"

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))

    with Clock(device) as built:
        ours = random_model(config, device)
        model = ours if impl != "ref" else reference_from(ours, device)
    del ours  # the reference holds copies; ours is `model` itself otherwise
    result["build_s"] = built.seconds
    result["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    save()
    for case in cases:
        kind, _, arg = case.partition(":")
        _reset_peak(device)
        try:
            if kind == "ttft":
                inputs = _on(release_inputs(config, float(arg), 1), device)
                with torch.inference_mode():
                    greedy_generate(impl, model, inputs, 1, pad)  # warm: kernels, allocator
                    entry = {"s": _seconds(device, lambda x=inputs: greedy_generate(impl, model, x, 1, pad))}
                if impl == "ours":
                    entry["plan_gb"] = plan_generation_gb(config, device, inputs, 1)
            elif kind in ("decode", "compiled"):
                rows, c = int(arg), kind == "compiled"
                inputs = _on(release_inputs(config, 0, rows), device)
                with torch.inference_mode():
                    greedy_generate(
                        impl, model, inputs, 2, pad, compile=c
                    )  # warm (and trace the compiled step)
                    one = _seconds(
                        device, lambda x=inputs, c=c: greedy_generate(impl, model, x, 1, pad, compile=c)
                    )
                    full = _seconds(
                        device,
                        lambda x=inputs, c=c: greedy_generate(impl, model, x, decode_tokens, pad, compile=c),
                    )
                entry = {"tokens_s": rows * (decode_tokens - 1) / max(full - one, 1e-9)}
                if impl == "ours":
                    entry["plan_gb"] = plan_generation_gb(config, device, inputs, decode_tokens)
            elif kind == "lora":
                shape = LORA_STEP if release else SMOKE_LORA_STEP
                try:
                    entry = lora_step(impl, model, config, device, **shape)
                finally:
                    if impl == "ours":
                        unwrap_lora(model)  # the cases after it (compiled decode) time the plain model
            elif kind == "full":
                entry = full_step(model, config, device, release)
            elif kind == "qlora":
                cls, result["quantizer"] = quantizer(device)
                shape = QLORA_STEP if release else SMOKE_QLORA_STEP
                entry = lora_step("ours", model, config, device, quantized=cls, **shape)
                entry.update(merge_check(model, config, device))
            else:
                raise SystemExit(f"unknown case {case!r}")
        # a case that does not fit is a result, not the end of the run
        except torch.cuda.OutOfMemoryError as e:
            entry = {"out_of_memory": str(e).splitlines()[0]}
        except Exception as e:  # noqa: BLE001  one case's failure must not cost the run's other cases
            traceback.print_exc()
            entry = {"error": f"{type(e).__name__}: {e}"[:400]}
        entry.setdefault("peak_gb", _peak_gb(device))
        entry.setdefault("reserved_gb", _reserved_gb(device))
        result[case] = entry
        save()
        print(f"[{impl}] {case}: {entry}", flush=True)


def cases_of(impl: str, cases: list[str]) -> list[str]:
    """What one worker runs: the qlora worker only `qlora` (it changes the model for good), the reference neither
    compiled decode (ours' own compiled step) nor the full fine-tune step (a check of ours' planner)."""
    if impl == "qlora":
        return [c for c in cases if c == "qlora"]
    ours_only = ("compiled", "full")
    return [c for c in cases if c != "qlora" and not (impl == "ref" and c.startswith(ours_only))]


def full_finetune_plan(preset: str, gpu_gb: float) -> dict:
    """Whether one AdamW step of the whole model fits one GPU of `gpu_gb`, and else on how many with FSDP."""
    from musicflamingo import MusicFlamingoConfig
    from musicflamingo.planner import TrainingSetup, plan_training

    config = MusicFlamingoConfig.from_name(preset)
    out = {}
    for precision in ("bf16-mixed", "bf16-true"):
        one = plan_training(
            config, TrainingSetup(precision=precision, device="cuda", checkpointing=True, tokens=8192)
        )
        row = {"one_gpu_peak_gb": one.peak / 1e9, "fits_one": one.peak <= gpu_gb * 1e9}
        for n in () if row["fits_one"] else (2, 4, 8, 16):
            plan = plan_training(
                config,
                TrainingSetup(
                    precision=precision,
                    device="cuda",
                    checkpointing=True,
                    tokens=8192,
                    devices=n,
                    strategy="fsdp",
                ),
            )
            if plan.peak <= gpu_gb * 1e9:
                row["fsdp_gpus"], row["fsdp_peak_gb"] = n, plan.peak / 1e9
                break
        out[precision] = row
    return out


# ---------------------------------------------------------------------------------------------- report
ROWS = [
    ("ttft:30", "s", "time to first token, 30 s audio, s"),
    ("ttft:300", "s", "time to first token, 5 min audio, s"),
    ("ttft:1200", "s", "time to first token, 20 min audio, s"),
    ("decode:1", "tokens_s", "decode batch 1, tokens/s"),
    ("decode:8", "tokens_s", "decode batch 8, tokens/s"),
    ("decode:32", "tokens_s", "decode batch 32, tokens/s"),
    ("compiled:1", "tokens_s", "decode batch 1, compiled, tokens/s"),
    ("compiled:8", "tokens_s", "decode batch 8, compiled, tokens/s"),
    ("lora", "tokens_s", "LoRA step, tokens/s"),
    ("lora", "model_tflops", "LoRA step, model TFLOP/s"),
    ("full", "tokens_s", "full fine-tune step (bf16-true, AdamW), tokens/s"),
]


def _get(result: dict, impl: str, case: str, key: str) -> float | None:
    value = result.get(impl, {}).get(case, {}).get(key)
    return value if isinstance(value, (int, float)) else None


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def targets(result: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 23's inference and LoRA targets, where both sides were measured."""
    rows = []
    for case, seconds in (("ttft:30", "30 s"), ("ttft:300", "5 min"), ("ttft:1200", "20 min")):
        a, b = _get(result, "ours", case, "s"), _get(result, "ref", case, "s")
        if a and b:
            rows.append(
                (
                    f"time to first token, {seconds}, <= 0.5x reference",
                    f"{a / b:.2f}x",
                    _verdict(a / b <= 0.5),
                )
            )
    for batch in (1, 8):
        ref = _get(result, "ref", f"decode:{batch}", "tokens_s")
        eager = _get(result, "ours", f"decode:{batch}", "tokens_s")
        compiled = _get(result, "ours", f"compiled:{batch}", "tokens_s")
        best = max((x for x in (eager, compiled) if x), default=None)
        if ref and best:
            measured = ", ".join(
                f"{n} {x / ref:.2f}x" for n, x in (("eager", eager), ("compiled", compiled)) if x
            )
            rows.append((f"decode batch {batch}, >= 2x reference", measured, _verdict(best / ref >= 2)))
    a, b = _get(result, "ours", "lora", "tokens_s"), _get(result, "ref", "lora", "tokens_s")
    pa, pb = _get(result, "ours", "lora", "peak_gb"), _get(result, "ref", "lora", "peak_gb")
    if a and b and pa and pb:
        rows.append(
            (
                "LoRA step >= 1.3x reference tokens/s at <= 0.8x its peak memory",
                f"{a / b:.2f}x tokens/s, {pa / pb:.2f}x memory",
                _verdict(a / b >= 1.3 and pa / pb <= 0.8),
            )
        )
    tflops, peak = _get(result, "ours", "lora", "model_tflops"), result.get("bf16_peak_tflops")
    if tflops and peak:
        rows.append(
            (
                "LoRA utilisation of the bf16 dense peak (no target; executed FLOPs, recomputation included)",
                f"{tflops / peak:.1%} of {peak:g} TFLOP/s; published: {PUBLISHED_LORA}",
                "-",
            )
        )
    q = result.get("qlora", {}).get("qlora", {})
    if isinstance(q.get("reserved_gb"), (int, float)):
        fits = QLORA_FITS_GB
        rows.append(
            (
                f"QLoRA (nf4 base), 30 s + 256 tokens, batch 1, checkpointing: < {fits:g} GB",
                f"{q['reserved_gb']:.1f} GB reserved ({q['peak_gb']:.1f} GB allocated) at "
                f"{q['tokens_s']:.0f} tokens/s",
                _verdict(q["reserved_gb"] < fits),
            )
        )
    if isinstance(q.get("logits_rel_diff"), (int, float)):
        rows.append(
            (
                "QLoRA adapters merge into bf16 (merged weights within bf16 rounding; logits vs the 4-bit model: "
                "relative norm of the difference < 5 %)",
                f"{q['logits_rel_diff']:.2e}, top token agrees at {q.get('top1_agree', float('nan')):.0%} of "
                f"positions, {q['merged']} adapters, {q['quantized_left']} 4-bit linears left; merged weight = "
                f"dequantised base + B A scale to {q.get('weight_rel_err', float('nan')):.1e} of the largest",
                _verdict(
                    q["quantized_left"] == 0
                    and q["logits_rel_diff"] < 0.05
                    and q.get("weight_rel_err", 1) < 2**-7
                ),
            )
        )
    for case, planned, measured in planner_rows(result):
        ratio = planned / measured
        rows.append(
            (
                f"memory planner, {case}: within 15 % of the measured peak",
                f"{planned:.1f} vs {measured:.1f} GB ({ratio:.2f}x)",
                _verdict(abs(ratio - 1) <= 0.15),
            )
        )
    for precision, row in result.get("full_finetune", {}).items():
        fit = "fits one GPU" if row["fits_one"] else f"FSDP over {row.get('fsdp_gpus', '> 16')} GPUs"
        rows.append(
            (f"full fine-tune, AdamW, {precision} (planner)", f"{row['one_gpu_peak_gb']:.0f} GB on one", fit)
        )
    return rows


def planner_rows(result: dict) -> list[tuple[str, float, float]]:
    """(case, planned GB, measured GB) for each of ours' cases where the planner predicted and CUDA measured."""
    rows = []
    for impl in ("ours", "qlora"):
        for case, entry in result.get(impl, {}).items():
            if not isinstance(entry, dict):
                continue
            planned, measured = entry.get("plan_gb"), entry.get("peak_gb")
            if isinstance(planned, (int, float)) and isinstance(measured, (int, float)) and measured > 0:
                rows.append((case, planned, measured))
    return rows


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def render(result: dict) -> str:
    """The markdown table of a results JSON: each measure for ours and the reference, their ratio, peak memory."""
    lines = [
        f"Device: {result.get('ours', {}).get('device', '?')}, {result.get('gpu_gb', 0):.0f} GB; preset "
        f"`{result.get('preset')}`, bf16, random weights drawn on the device.",
        "",
        "| measure | ours | reference | ours / ref | peak GB, ours | peak GB, reference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, key, label in ROWS:
        a, b = _get(result, "ours", case, key), _get(result, "ref", case, key)
        if a is None and b is None:
            continue
        ratio = f"{a / b:.2f}x" if a and b else "-"
        pa, pb = _get(result, "ours", case, "peak_gb"), _get(result, "ref", case, "peak_gb")
        lines.append(f"| {label} | {_num(a)} | {_num(b)} | {ratio} | {_num(pa)} | {_num(pb)} |")
    for impl in ("qlora", "ours", "ref"):
        for case, entry in result.get(impl, {}).items():
            note = isinstance(entry, dict) and next(
                (entry[k] for k in ("out_of_memory", "skipped", "error") if k in entry), None
            )
            if note:
                lines.append(f"\n{impl} {case}: {note}")
        if result.get(impl, {}).get("exit") not in (None, 0):
            lines.append(f"\n{impl} worker exit: {result[impl]['exit']}")
    rows = targets(result)
    if rows:
        lines += ["", "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def update_doc(path: Path, result: dict) -> None:
    from report import write_marked

    begin, end = "<!-- bench:gpu_release:begin -->", "<!-- bench:gpu_release:end -->"
    block = f"{begin}\nCommand: `{result.get('command')}`, {time.strftime('%Y-%m-%d')}.\n\n{render(result)}\n{end}"
    write_marked(path, begin, end, block, "Results (release size, GPU)")


def parse_timeouts(text: str) -> dict[str, float]:
    """`250` (every worker) or `qlora=100,ours=250,ref=200` -> {impl: seconds} ("*": every worker)."""
    if "=" not in text:
        return {"*": float(text)}
    pairs = (item.partition("=") for item in text.split(",") if item)
    return {impl.strip(): float(seconds) for impl, _, seconds in pairs}


def _worker_here(
    impl: str, preset: str, device: torch.device, cases: list[str], out: Path, tokens: int
) -> int:
    """`--inprocess`: a worker run in this process, its exit status as a worker process's would be."""
    try:
        worker(impl, preset, device, cases, out, tokens)
    except Exception:  # noqa: BLE001  as a worker process's traceback and exit 1
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="music_flamingo_2601")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--impls", default="qlora,ours,ref", help="workers, in order (qlora: ours, nf4 base)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument(
        "--timeout", default=TIMEOUTS, help="seconds per worker process: one number, or impl=seconds,..."
    )
    ap.add_argument("--out", default=str(HERE / "results_gpu_release.json"))
    ap.add_argument(
        "--doc", default=None, help="write the table between the bench:gpu_release markers of this file"
    )
    ap.add_argument(
        "--render", default=None, help="only render this results JSON (with --doc: into that file)"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    # these workers in this process: the smoke test's tiny preset only (the release size needs their own processes)
    ap.add_argument("--inprocess", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    here = {impl for impl in args.inprocess.split(",") if impl}
    if here and args.preset == "music_flamingo_2601":
        ap.error("--inprocess is for small presets: the release size's workers need their own processes")
    if args.render:
        result = json.loads(Path(args.render).read_text())
        print(render(result))
        if args.doc:
            update_doc(Path(args.doc), result)
        return None
    device = torch.device(args.device)
    out = Path(args.out)
    cases = [c for c in args.cases.split(",") if c]
    if args.worker:
        return worker(args.worker, args.preset, device, cases, out, args.decode_tokens)
    command = " ".join(sys.argv if argv is None else [sys.argv[0], *argv])
    result: dict = {"preset": args.preset, "cases": cases, "command": command}
    timeouts = parse_timeouts(args.timeout)
    for impl in args.impls.split(","):
        mine = cases_of(impl, cases)
        if not mine:
            continue
        part = out.with_name(f"{out.stem}.{impl}.json")
        cmd = [sys.executable, __file__, "--worker", impl, "--preset", args.preset, "--device", args.device]
        cmd += ["--cases", ",".join(mine), "--decode-tokens", str(args.decode_tokens), "--out", str(part)]
        try:
            if impl in here:
                rc = _worker_here(impl, args.preset, device, mine, part, args.decode_tokens)
            else:
                rc = subprocess.run(
                    cmd,
                    timeout=timeouts.get(impl, timeouts.get("*", 240)),
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        result[impl] = json.loads(part.read_text()) if part.is_file() else {}
        result[impl]["exit"] = rc
        out.write_text(json.dumps(result, indent=1))
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 80.0
    name = result.get("ours", {}).get("device", "")
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    result["gpu_gb"], result["bf16_peak_tflops"] = gpu_gb, peak
    result["full_finetune"] = full_finetune_plan(args.preset, gpu_gb)
    out.write_text(json.dumps(result, indent=1))
    print(render(result))
    if args.doc:
        update_doc(Path(args.doc), result)


if __name__ == "__main__":
    main()

"""The memory planner, review round 9: generation plans (infer.py, eval.py, serve.py) against measured CPU peaks,
the engine's growing KV cache, the processor's feature extraction, refusals naming the settings that would fit,
and the release's plan for 20 minutes of audio against hand arithmetic from the spec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_planner import (
    _nbytes,
    _one_thread,  # noqa: F401  (autouse: this file's tests on one thread too)
    measured_peak,
)
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import MusicFlamingo, MusicFlamingoProcessor
from musicflamingo.model.config import MusicFlamingoConfig
from musicflamingo.planner import MemoryPlanError, check_generation, plan_inference

TOLERANCE = 0.15
# a tiny checkpoint (the tiny tokenizer's ids) with a wider cache: 4 kv heads of 64, 4 KB per position in float32
WIDE = {"text": {"hidden_size": 256, "intermediate_size": 256, "num_key_value_heads": 4}}


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "ckpt", **WIDE)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _measure(ckpt, files, dtype, batch, new, path):
    """Peak bytes of answering `files` as infer.py (`generate_answers`: an engine whose cache grows) or eval.py
    (`model.generate` on the processor's batch) does, the weights included."""
    from musicflamingo.engine import SamplingParams
    from musicflamingo.inference import DEFAULT_PROMPT, conversation, generate_answers

    model = MusicFlamingo.from_pretrained(str(ckpt), dtype=dtype).eval()
    processor = MusicFlamingoProcessor.from_pretrained(str(ckpt))
    if path == "infer":
        convs = [conversation(DEFAULT_PROMPT, f, None) for f in files]
        params = SamplingParams(max_new_tokens=new, stop_ids=())

        def run():
            generate_answers(model, processor, convs, files, params, batch, False, None, False)

    else:
        convs = [
            [
                {
                    "role": "user",
                    "content": [{"type": "audio", "path": f}, {"type": "text", "text": DEFAULT_PROMPT}],
                }
            ]
            for f in files
        ]

        def run():
            with torch.inference_mode():
                inputs = processor.apply_chat_template(
                    convs, tokenize=True, add_generation_prompt=True, return_dict=True
                )
                feeds = {k: v.to("cpu", dtype) if v.is_floating_point() else v for k, v in inputs.items()}
                feeds.pop("attention_mask", None)
                model.generate(**feeds, max_new_tokens=new, do_sample=False, stop_token_ids=[])

    return _nbytes([*model.parameters(), *model.buffers()]) + measured_peak(run)


def test_infer_plan_counts_the_cache_growing(wide_ckpt):
    """infer.py's and serve.py's engine starts with one block of keys and doubles it as answers grow, holding the
    old and new buffers while it copies: 4 slots of 500-token prompts and 20-token answers reach 1024 positions
    through a 512 + 1024 copy. The plan had counted prompt + new positions once (0.55 of the measured peak on
    `small` at batch 16 and 2500 tokens)."""
    from musicflamingo.engine import Engine, Request, SamplingParams

    model = MusicFlamingo.from_pretrained(str(wide_ckpt), dtype=torch.float32).eval()
    prompt = torch.randint(10, 290, (500,), generator=torch.Generator().manual_seed(0))

    def run():
        engine = Engine(model, slots=4)
        for _ in range(4):
            engine.admit(Request(prompt, SamplingParams(max_new_tokens=20, stop_ids=())))
        while engine.decoding:
            engine.step()

    peak = _nbytes([*model.parameters(), *model.buffers()]) + measured_peak(run)
    plan = plan_inference(model.config, dtype_bytes=4, slots=4, prompt_tokens=500, new_tokens=20, windows=0)
    assert plan.when == "while the KV cache grows"
    assert abs(plan.peak - peak) <= TOLERANCE * peak, (
        f"planned {plan.peak:,}, measured {peak:,}\n{plan.table()}"
    )


@pytest.mark.parametrize(
    "preset,dtype,batch,seconds,path",
    [
        # one 30 s window: the processor's log-mel (~10x the features, on the CPU) is most of the peak (plan 0.34)
        ("tiny", torch.float32, 1, 30.0, "infer"),
        # eval's batch: float32 features besides their bfloat16 copy, the batch's log-mel at once (plan 0.41)
        ("wide", torch.bfloat16, 2, 30.0, "eval"),
    ],
)
def test_generation_plan_matches_measured_memory(request, tmp_path, preset, dtype, batch, seconds, path):
    from musicflamingo.audio.io import audio_duration
    from musicflamingo.inference import DEFAULT_PROMPT

    ckpt = request.getfixturevalue(f"{preset}_ckpt")
    files = [str(write_audio(tmp_path / f"{i}.wav", make_tone(440.0 + i, seconds))) for i in range(batch)]
    peak = _measure(ckpt, files, dtype, batch, 4, path)
    settings = {"device": "cpu", "dtype": str(dtype).replace("torch.", ""), "plan": True}
    plan = check_generation(
        settings,
        ckpt,
        [audio_duration(f) for f in files],
        prompt_chars=len(DEFAULT_PROMPT),
        slots=batch,
        new_tokens=4,
        embed_batch=path == "eval",
    )
    assert abs(plan.peak - peak) <= TOLERANCE * peak, (
        f"planned {plan.peak:,}, measured {peak:,}\n{plan.table()}"
    )


@pytest.mark.parametrize("seconds,windows", [(30.0, 2), (3.0, 5)])
def test_feature_extraction_is_planned(seconds, windows):
    """The processor's log-mel of W windows at once (the CPU's part of every generation plan on a CPU)."""
    from musicflamingo.audio.features import SAMPLING_RATE, LogMelExtractor
    from musicflamingo.planner import feature_extraction_bytes

    extractor = LogMelExtractor(chunk_length=seconds)
    audio = (
        np.random.default_rng(0).standard_normal(int(seconds * SAMPLING_RATE) * windows).astype(np.float32)
    )
    waves = [audio[i * len(audio) // windows : (i + 1) * len(audio) // windows] for i in range(windows)]
    peak = measured_peak(lambda: extractor(waves)) + audio.nbytes
    config = MusicFlamingoConfig.from_name("tiny" if seconds == 30.0 else "small")
    planned = feature_extraction_bytes(config, windows, seconds * windows)
    assert abs(planned - peak) <= 0.03 * peak, (planned, peak)


def test_refusal_names_fewer_new_tokens_and_plan_true_lists_what_fits(wide_ckpt):
    """Long answers on a full batch: the refusal (and plan=true's verdict) names a smaller batch and fewer
    max_new_tokens that fit; before, only dtype, quantize and batch_size were tried, and plan=true said only
    'does not fit'."""
    base = {"device": "cpu", "dtype": "float32"}
    sizes = dict(prompt_chars=40, slots=8, new_tokens=8000)
    plan = check_generation({**base, "plan": True}, wide_ckpt, [3.0] * 8, **sizes)
    fewer = check_generation({**base, "plan": True}, wide_ckpt, [3.0] * 8, **{**sizes, "new_tokens": 2000})
    budget = (plan.peak + fewer.peak) // 2
    with pytest.raises(MemoryPlanError) as err:
        check_generation(base, wide_ckpt, [3.0] * 8, available=lambda dev: budget, **sizes)
    fixes = [line.split()[0] for line in str(err.value).splitlines() if line.startswith("  ")]
    assert "max_new_tokens=4000" in fixes and any(f.startswith("batch_size=") for f in fixes), fixes
    shown = check_generation(
        {**base, "plan": True, "plan_memory_gb": budget / 1e9}, wide_ckpt, [3.0] * 8, **sizes
    )
    assert "does not fit" in shown.notes[0] and any("max_new_tokens=4000" in n for n in shown.notes), (
        shown.notes
    )


def test_serve_plan_is_the_cache_the_engine_grows_to(wide_ckpt):
    """Without max_cached_tokens serve.py's engine has `max_batch` slots of one capacity: one long request grows
    every slot to it, doubling, one old layer's tensor alive beside the new cache while it grows. The plan's KV
    cache is that capacity and its growth that peak."""
    from musicflamingo.engine import Engine, Request, SamplingParams
    from musicflamingo.planner import check_serving

    settings = {
        "device": "cpu",
        "dtype": "float32",
        "plan": True,
        "max_batch": 3,
        "max_completion_tokens": 40,
    }
    plan = check_serving({**settings, "max_prompt_tokens": 500}, wide_ckpt)
    model = MusicFlamingo.from_pretrained(str(wide_ckpt), dtype=torch.float32).eval()
    engine = Engine(model, slots=3)
    prompt = torch.full((500,), 10)
    slot = engine.admit(Request(prompt, SamplingParams(max_new_tokens=40, stop_ids=())))
    while engine.decoding:
        engine.step()
    assert len(slot.tokens) == 40 and engine.cache.capacity == 1024
    per_slot = 2 * 2 * 4 * 64 * 4  # layers, kv heads, head_dim, float32
    assert plan.item("KV cache") == engine.cache.nbytes == 3 * per_slot * 1024, plan.table()
    # the short-prompt worst case doubles 512 -> 1024: the new cache and one of 2 x 2 old tensors of 512
    assert plan.item("KV cache growth") == 3 * per_slot * (1024 + 512 // 4)


def test_serve_plan_with_max_cached_tokens_is_the_fitted_cache(wide_ckpt):
    """With max_cached_tokens the engine's cache is fitted within that many positions in all (rows x capacity):
    the plan's KV cache is the bound, not max_batch slots of the longest request (was 3 x 768 positions)."""
    from musicflamingo.engine import Engine, Request, SamplingParams
    from musicflamingo.planner import check_serving

    settings = {"device": "cpu", "dtype": "float32", "plan": True, "max_batch": 3, "max_cached_tokens": 540}
    plan = check_serving(settings, wide_ckpt)
    model = MusicFlamingo.from_pretrained(str(wide_ckpt), dtype=torch.float32).eval()
    engine = Engine(model, slots=3, max_positions=540)
    most = engine.cache.nbytes
    prompt = torch.full((500,), 10)
    slot = engine.admit(Request(prompt, SamplingParams(max_new_tokens=40, stop_ids=())))
    while engine.decoding:
        engine.step()
        most = max(most, engine.cache.nbytes)
    assert len(slot.tokens) == 40
    per_position = 2 * 2 * 4 * 64 * 4  # layers, kv heads, head_dim, float32
    assert most == plan.item("KV cache") == 540 * per_position, plan.table()


def test_compiled_serve_plan_with_max_cached_tokens_is_the_doubled_cache(wide_ckpt, monkeypatch):
    """A compiled server's fitted cache keeps a row per slot and doubles its capacity (one traced step per
    capacity) until each row's share of the bound: 4 slots of 1024 positions for 600-token sequences under
    max_cached_tokens=8192 (the plan said 4 x 768)."""
    from musicflamingo import engine as engine_module
    from musicflamingo.engine import Engine, Request, SamplingParams, decode_step
    from musicflamingo.planner import check_serving

    monkeypatch.setattr(engine_module, "_compiled_decode_step", lambda: decode_step)  # eager stand-in
    settings = {"device": "cpu", "dtype": "float32", "plan": True, "max_batch": 4, "compile": True}
    settings |= {"max_cached_tokens": 8192, "max_prompt_tokens": 550, "max_completion_tokens": 50}
    plan = check_serving(settings, wide_ckpt)
    model = MusicFlamingo.from_pretrained(str(wide_ckpt), dtype=torch.float32).eval()
    engine = Engine(model, slots=4, compile=True, max_positions=8192)
    most = engine.cache.nbytes
    for n in (297, 547):  # sequences of 300, then 600 positions
        engine.admit(Request(torch.full((n,), 10), SamplingParams(max_new_tokens=3, stop_ids=())))
        while engine.decoding:
            engine.step()
            most = max(most, engine.cache.nbytes)
        engine.release(0)
    per_position = 2 * 2 * 4 * 64 * 4  # layers, kv heads, head_dim, float32
    assert most == plan.item("KV cache") == 4 * 1024 * per_position, plan.table()


def test_serve_refusal_names_the_servers_settings(wide_ckpt):
    """serve.py's levers by their names: max_batch and max_cached_tokens for the cache, max_queue for the
    features waiting requests keep on a CPU (never infer's batch_size / max_new_tokens)."""
    from musicflamingo.planner import check_serving

    settings = {"device": "cpu", "dtype": "float32", "max_batch": 16, "max_queue": 1, "max_audio_seconds": 30}
    peak = check_serving({**settings, "plan": True}, wide_ckpt).peak
    with pytest.raises(MemoryPlanError) as err:
        check_serving(settings, wide_ckpt, available=lambda dev: int(peak * 0.7))
    fixes = [line.split()[0] for line in str(err.value).splitlines() if line.startswith("  ")]
    assert any(f.startswith("max_batch=") for f in fixes), fixes
    assert any(f.startswith("max_cached_tokens=") for f in fixes), fixes
    assert not any(f.startswith(("batch_size", "max_new_tokens")) for f in fixes), fixes
    queued = {**settings, "max_batch": 1, "max_queue": 64, "max_audio_seconds": None}
    peak = check_serving({**queued, "plan": True}, wide_ckpt).peak
    with pytest.raises(MemoryPlanError, match=r"\n  max_queue=\d+ "):
        check_serving(queued, wide_ckpt, available=lambda dev: int(peak * 0.8))


def test_release_plan_for_twenty_minutes_matches_hand_arithmetic():
    """The release (spec §5: decoder 3584 wide, 18944 MLP, 28 layers, 28 heads, 4 kv heads of 128, vocab 151672,
    context 32768; encoder 1280 wide, 5120 MLP, 1500 positions; 40 windows of 30 s for 1200 s), infer.py at
    batch 1 in bfloat16 on a GPU, generation_config.json's 2048 new tokens."""
    config = MusicFlamingoConfig.from_name("music_flamingo_2601")
    prompt = 256 + 40 * 750  # markup and question + 20 minutes of <sound>
    plan = plan_inference(
        config, dtype_bytes=2, prompt_tokens=prompt, new_tokens=2048, windows=40, device="cuda"
    )
    per_position = 2 * 28 * 4 * 128 * 2  # keys and values, every layer, bf16: 57,344 B
    after_prefill = 30464  # prompt + 1 = 30257 positions, in blocks of 256
    assert plan.item("weights") == 8_267_215_360 * 2
    assert plan.item("KV cache") == per_position * 32768  # 30256 + 2047 > 30464: doubled, cut at the context
    # while copying: the new cache and one old layer's keys (or values), 1/(2 x 28 layers) of the old: 1.91 GB
    assert plan.item("KV cache growth") == per_position * (32768 + after_prefill // (2 * 28))
    window = 1500 * 2 * max(8 * 1280, 2 * 1280 + 2 * 5120) + 128 * 3000 * 2 + 750 * 2 * 3 * 3584
    assert plan.item("audio encoder") == 40 * window  # an encoder layer's MLP on all 40 windows at once
    features = 40 * 128 * 3000 * 4  # the engine moves the processor's float32 features to the GPU
    assert plan.item("audio features") == features
    assert plan.when == "while encoding audio"
    # weights + the cache after the prefill + float32 features + the encoder: 20.55 GB
    expected = 8_267_215_360 * 2 + per_position * after_prefill + features + 40 * window
    assert plan.peak == expected and 20.5e9 < plan.peak < 20.6e9
    assert "feature extraction" not in dict((n, b) for n, b, _ in plan.items)  # the CPU's, not the GPU's

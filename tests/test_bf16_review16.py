"""bf16 on the CPU (review 16): a researcher without a GPU runs inference in bf16 and trains under bf16-mixed or
bf16-true. Lightning's bf16-true runs every forward with torch's default dtype set to bfloat16, so float tensors
the model makes without a dtype are bf16 there."""

from __future__ import annotations

import pytest
import torch

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.model.encoder import conv_output_lengths
from musicflamingo.model.rote import build_audio_timestamps


@pytest.fixture
def bf16_default_dtype():
    """What Lightning's `HalfPrecision.forward_context` does under trainer.precision=bf16-true."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    yield
    torch.set_default_dtype(before)


def _timestamps(post: list[int], runs: list[int], frames: int = 750) -> torch.Tensor:
    ids = torch.full((len(runs), max(runs) + 4), 5)
    for row, n in enumerate(runs):
        ids[row, 2 : 2 + n] = 300
    return build_audio_timestamps(ids, torch.tensor(post), frames, 300, 0.01)


@pytest.mark.parametrize(
    "post, runs",
    [
        # 35 s + 7 s: window 3 (the second audio's first) starts at token 1524, which bf16 rounds to 1520 (inside
        # the first audio): it was counted as the first audio's 4th window
        ([750, 750, 24, 175], [1524, 175]),
        # 20 windows of one audio: window 19 starts at 570 s, 568 in bf16
        ([750] * 20, [15000]),
    ],
)
def test_audio_timestamps_do_not_depend_on_the_default_dtype(post, runs, bf16_default_dtype):
    got = _timestamps(post, runs)
    torch.set_default_dtype(torch.float32)
    expected = _timestamps(post, runs)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected), (got[:, 0].tolist(), expected[:, 0].tolist())
    if len(runs) == 2:
        assert expected[:, 0].tolist() == [0.0, 30.0, 60.0, 0.0]  # the second audio's window counts from 0


def _tiny_audio_batch(config: MusicFlamingoConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Two audios, left-padded: 30 s + 30 s + 1 s windows (one audio), 7 s (the other)."""
    frames = config.audio.mel_frames
    lengths = [frames, frames, 100, 701]
    g = torch.Generator().manual_seed(1)
    features = torch.randn(len(lengths), config.audio.num_mel_bins, frames, generator=g)
    mask = torch.zeros(len(lengths), frames, dtype=torch.long)
    for w, n in enumerate(lengths):
        mask[w, :n] = 1
        features[w, :, n:] = 0
    post = conv_output_lengths(torch.tensor(lengths))[1].tolist()
    s, bos, eos = config.audio_token_id, config.audio_bos_token_id, config.audio_eos_token_id
    rows = [[5, 6, bos] + [s] * sum(post[:3]) + [eos, 7, 8], [9, bos] + [s] * post[3] + [eos, 10]]
    T = max(map(len, rows))
    ids = torch.full((2, T), config.text.pad_token_id)
    attention = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r)
        attention[i, T - len(r) :] = 1
    return dict(
        input_ids=ids,
        attention_mask=attention,
        input_features=features.to(dtype),
        input_features_mask=mask,
        labels=ids.masked_fill(attention == 0, -100),
    )


def test_bf16_true_forward_equals_the_same_forward_outside_lightnings_dtype_context():
    """The whole model, bf16 weights: logits and the training loss read the same with torch's default dtype at
    bfloat16 (bf16-true's forward) as at float32 (inference)."""
    config = MusicFlamingoConfig.from_name("tiny")
    torch.manual_seed(0)
    model = MusicFlamingo(config).to(torch.bfloat16).eval()
    batch = _tiny_audio_batch(config, torch.bfloat16)
    with torch.no_grad():
        out = model(**batch)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            out_bf16 = model(**batch)
        finally:
            torch.set_default_dtype(before)
    assert torch.equal(out.logits, out_bf16.logits), (
        (out.logits.float() - out_bf16.logits.float()).abs().max()
    )
    assert out.loss.item() == out_bf16.loss.item()


def test_bf16_cached_greedy_equals_recomputation_or_differs_by_a_rounding_tie():
    """Left-padded audio prompts of different lengths, bf16 weights: the engine's cached decoding (plain-matmul decode
    attention, bf16 KV cache) picks the tokens a full recomputation at positions cumsum(mask) - 1 picks; where it does
    not, the recomputation's two best logits are within bf16 rounding of each other (a legitimate tie flip)."""
    config = MusicFlamingoConfig.from_name("tiny")
    torch.manual_seed(0)
    model = MusicFlamingo(config).to(torch.bfloat16).eval()
    assert model.pos_emb.position_angles.dtype == torch.float32
    assert model.language_model.rotary_emb.inv_freq.dtype == torch.float32
    batch = _tiny_audio_batch(config, torch.bfloat16)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    new = 10
    cached = model.generate(**inputs, max_new_tokens=new, stop_token_ids=[])
    S = inputs["input_ids"].shape[1]
    with torch.no_grad():
        embeds = model.embed(inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"])
        mask = inputs["attention_mask"]
        for step in range(new):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = (
                model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            )
            assert torch.isfinite(logits).all()
            token = cached[:, S + step]
            for row in range(2):
                best = logits[row].max()
                ulp = 2.0 ** (torch.floor(torch.log2(best.abs())) - 7)  # bf16 spacing at the best logit
                assert logits[row, token[row]] >= best - 2 * ulp, (step, row, logits[row].topk(2))
            embeds = torch.cat([embeds, model.language_model.embed_tokens(token[:, None])], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def test_rotary_buffers_cast_in_place_as_fsdp_mixed_precision_does_still_give_float32_numbers():
    """FSDP's MixedPrecision(buffer_dtype=bfloat16), which Lightning uses for bf16-mixed and bf16-true, casts every
    floating buffer with `buffer.data = buffer.to(dtype)` (torch's `_cast_buffers_to_dtype_and_device`), past
    `nn.Module._apply`. The RoPE and RoTE angles still come from float32 frequencies: a real FSDP wrap on the CPU
    (one gloo rank) gave logits 1.11 off (scale 2.6) before, 0.0 after."""
    config = MusicFlamingoConfig.from_name("tiny")
    torch.manual_seed(0)
    model = MusicFlamingo(config).to(torch.bfloat16).eval()
    batch = _tiny_audio_batch(config, torch.bfloat16)
    with torch.no_grad():
        expected = model(**batch).logits
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.data = buffer.to(dtype=torch.bfloat16)
        assert model.language_model.rotary_emb.inv_freq.dtype == torch.bfloat16
        assert model.pos_emb.position_angles.dtype == torch.bfloat16
        got = model(**batch).logits
    assert torch.equal(got, expected), (got.float() - expected.float()).abs().max().item()


def test_fsdp_validation_batch_counts_are_exact_under_bf16_true():
    """bf16-true sets torch's default dtype to bfloat16 for the whole fit: the validation batch count all-reduced
    to even out FSDP ranks (`on_validation_epoch_start`) was a bf16 tensor, so 301 batches became 300 or 302 and a
    rank ran a stand-in forward too many or too few (a hang in the next all-gather)."""
    from types import SimpleNamespace

    from musicflamingo.lit import MusicFlamingoLit

    fake = SimpleNamespace(
        _sharded=lambda: True,
        _val_batches=lambda: 301.0,
        device=torch.device("cpu"),
        trainer=SimpleNamespace(
            strategy=SimpleNamespace(reduce=lambda t, reduce_op: t)
        ),  # one rank: max is its own
    )
    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        MusicFlamingoLit.on_validation_epoch_start(fake)
    finally:
        torch.set_default_dtype(was)
    assert fake._val_stand_ins == 0

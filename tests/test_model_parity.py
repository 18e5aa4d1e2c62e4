"""Parity of our model against the reference `transformers` implementation on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch
from reference_model import build_batch, make_reference_model, random_audio

from musicflamingo import MusicFlamingo
from musicflamingo.engine import KEY_BLOCK, Engine, Request, SamplingParams, generate
from musicflamingo.model.layers import KVCache

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    ref = make_reference_model(seed=0)
    path = tmp_path_factory.mktemp("ref")
    ref.save_pretrained(path)
    return ref, path


@pytest.fixture(scope="module")
def ours(ref_dir):
    return MusicFlamingo.from_pretrained(ref_dir[1], dtype=torch.float32)


@pytest.fixture(scope="module")
def batch_b():
    # Two audios of 35 s and 7.0048 s (112077 samples): 3 windows, left padding.
    return build_batch([random_audio(35.0, seed=1), random_audio(samples=112077, seed=2)], [12, 5])


def _ref_out(ref, batch):
    with torch.no_grad():
        return ref(**batch)


def test_full_window_logits(ref_dir, ours):
    ref, _ = ref_dir
    batch = build_batch([random_audio(30.0, seed=3)], [10])
    assert int(batch["input_features_mask"].sum()) == 3000
    r = _ref_out(ref, batch)
    with torch.no_grad():
        o = ours(**batch)
    assert (o.logits - r.logits).abs().max().item() <= 1e-5
    assert abs(o.loss.item() - r.loss.item()) <= 1e-6


def test_left_padded_two_audio_batch(ref_dir, ours, batch_b):
    ref, _ = ref_dir
    assert batch_b["input_features"].shape[0] == 3
    assert int((batch_b["input_ids"] == 300).sum()) == 875 + 175
    r = _ref_out(ref, batch_b)
    with torch.no_grad():
        o = ours(**batch_b)
    valid = batch_b["attention_mask"].bool()
    diff = (o.logits - r.logits)[valid].abs().max().item()
    assert diff <= 1e-5, diff
    assert abs(o.loss.item() - r.loss.item()) <= 1e-6


def test_text_only(ref_dir, ours):
    ref, _ = ref_dir
    batch = build_batch([], [20, 9])
    r = _ref_out(ref, batch)
    with torch.no_grad():
        o = ours(**batch)
    valid = batch["attention_mask"].bool()
    assert (o.logits - r.logits)[valid].abs().max().item() <= 1e-5
    assert abs(o.loss.item() - r.loss.item()) <= 1e-6


def test_greedy_generate_matches_reference(ref_dir, ours, batch_b):
    ref, _ = ref_dir
    inputs = {k: v for k, v in batch_b.items() if k != "labels"}
    with torch.no_grad():
        r = ref.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=297)
    o = ours.generate(**inputs, max_new_tokens=20, do_sample=False, stop_token_ids=[])
    assert o.shape == r.shape == (2, inputs["input_ids"].shape[1] + 20)
    assert torch.equal(o, r)


def test_greedy_generate_with_stop_id_matches_reference(ref_dir, ours, batch_b):
    """Row 0 stops on its first id, then gets padding; the other row runs on (left-padded batch)."""
    ref, _ = ref_dir
    inputs = {k: v for k, v in batch_b.items() if k != "labels"}
    free = ours.generate(**inputs, max_new_tokens=12, stop_token_ids=[])
    S = inputs["input_ids"].shape[1]
    stop = int(free[0, S])
    assert stop not in free[1, S:].tolist()  # so row 1 runs all 12 steps
    with torch.no_grad():
        r = ref.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=stop, pad_token_id=297)
    o = ours.generate(**inputs, max_new_tokens=12, stop_token_ids=[stop], pad_token_id=297)
    assert torch.equal(o, r)
    assert o.shape[1] == S + 12 and int(o[0, S]) == stop and (o[0, S + 1 :] == 297).all()


def test_kv_cache_matches_recomputation(ours, batch_b):
    """Cached greedy decoding gives the same tokens as recomputing the whole sequence every step."""
    inputs = {k: v for k, v in batch_b.items() if k != "labels"}
    cached = generate(ours, **inputs, max_new_tokens=8, stop_token_ids=[])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(8):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = ours(
                ids,
                attention_mask=mask,
                input_features=inputs["input_features"],
                input_features_mask=inputs["input_features_mask"],
                position_ids=pos,
            ).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(cached, ids)


def test_bf16_parity_and_float32_buffers(ref_dir):
    _, path = ref_dir
    from transformers import MusicFlamingoForConditionalGeneration

    ref = MusicFlamingoForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = MusicFlamingo.from_pretrained(path, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    assert ours.pos_emb.inv_freq.dtype == torch.float32
    assert ours.pos_emb.position_angles.dtype == torch.float32
    assert ours.language_model.rotary_emb.inv_freq.dtype == torch.float32
    batch = build_batch([random_audio(35.0, seed=1), random_audio(samples=112077, seed=2)], [12, 5])
    batch["input_features"] = batch["input_features"].to(torch.bfloat16)
    with torch.no_grad():
        r = ref(**batch).logits.float()
        o = ours(**batch).logits.float()
    valid = batch["attention_mask"].bool()
    diff = (o - r)[valid].abs().max().item()
    scale = r[valid].abs().max().item()
    assert diff <= 0.02 * max(scale, 1.0), (diff, scale)
    # A frozen audio tower (LoRA on the decoder) in a step with grad mode on encodes as inference does: the bf16
    # CPU training attention is only for a tower a gradient flows through (it was used whenever grad mode was on).
    ours.audio_tower.requires_grad_(False)
    features, mask = batch["input_features"], batch["input_features_mask"]
    frozen = ours.audio_tower(features, mask)
    with torch.no_grad():
        assert torch.equal(frozen, ours.audio_tower(features, mask))
    # .to(bfloat16) on our model keeps rotary buffers float32 (the reference's .to() would not).
    ours.to(torch.bfloat16)
    assert ours.pos_emb.position_angles.dtype == torch.float32


def test_round_trip_save_loads_in_transformers(ref_dir, ours, batch_b, tmp_path):
    ref, _ = ref_dir
    from transformers import MusicFlamingoForConditionalGeneration

    r = _ref_out(ref, batch_b).logits
    valid = batch_b["attention_mask"].bool()
    for shard in ("5GB", "200KB"):
        out = tmp_path / f"ours-{shard}"
        ours.save_pretrained(out, max_shard_size=shard)
        if shard == "200KB":
            assert (out / "model.safetensors.index.json").is_file()
            assert len(list(out.glob("model-*.safetensors"))) > 1
        back = MusicFlamingoForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            b = back(**batch_b).logits
        assert (b - r)[valid].abs().max().item() <= 1e-5
        again = MusicFlamingo.from_pretrained(out)
        with torch.no_grad():
            assert torch.equal(again(**batch_b).logits, ours(**batch_b).logits)


def test_right_padded_rows_equal_unpadded(ours):
    """Training batches are right-padded and take SDPA's causal path with no mask: real tokens are unaffected."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 290, (n,), generator=g) for n in (13, 7)]
    ids = torch.full((2, 13), 297)
    mask = torch.zeros(2, 13, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = ours(r[None]).logits[0]
            assert (batched[i, : len(r)] - alone).abs().max().item() <= 1e-5


def test_decode_attention_matches_sdpa():
    """The plain-matmul decode attention (bf16/fp16 CPU steps) is SDPA's formula: GQA grouping and key mask."""
    from musicflamingo.model.qwen2 import decode_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 6, 1, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 2, 10, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., :4] = False  # a left-padded row
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(decode_attention(q, k, v, mask), expected, atol=1e-12)
    assert torch.allclose(
        decode_attention(q, k, v, None),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        atol=1e-12,
    )


def test_bf16_cached_decode_matches_recomputation(ref_dir, batch_b, monkeypatch):
    """bf16 on CPU: a cached decode step (plain-matmul attention, rotary table) gives the logits of a full bf16
    forward over the longer sequence, within bf16 rounding."""
    import musicflamingo.engine as engine
    import musicflamingo.model.qwen2 as qwen2

    ours = MusicFlamingo.from_pretrained(ref_dir[1], dtype=torch.bfloat16)
    calls = []  # (keys seen, mask width) per call
    plain = qwen2.decode_attention
    monkeypatch.setattr(
        qwen2, "decode_attention", lambda *a: calls.append((a[1].shape[2], a[3].shape[-1])) or plain(*a)
    )
    steps = []
    step = engine.decode_step
    monkeypatch.setattr(engine, "decode_step", lambda *a: steps.append(step(*a)) or steps[-1])
    inputs = {k: v for k, v in batch_b.items() if k != "labels"}
    inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
    out = generate(ours, **inputs, max_new_tokens=3, stop_token_ids=[])
    assert len(steps) == 2 and len(calls) == 2 * ours.config.text.num_hidden_layers
    # The steps see the cache in whole blocks of keys (one matmul shape for many steps), the mask as wide.
    assert all(n == w and n % KEY_BLOCK == 0 for n, w in calls), calls
    S = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        full = ours(
            out[:, : S + 2],
            attention_mask=mask,
            input_features=inputs["input_features"],
            input_features_mask=inputs["input_features_mask"],
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits.float()
    for i, logits in enumerate(steps):  # step i fed token S+i and predicts S+i+1
        expected = full[:, S + i]
        assert (logits.float() - expected).abs().max() <= 0.02 * max(expected.abs().max().item(), 1.0)


def _rows(inputs: dict) -> list[torch.Tensor]:
    """The unpadded prompt of each row of a left-padded batch."""
    return [ids[m.bool()] for ids, m in zip(inputs["input_ids"], inputs["attention_mask"])]


def _stale_engine(model, slots: int, capacity: int, **kwargs) -> Engine:
    """An engine whose cache holds NaN everywhere, as if an earlier, longer sequence had left it there."""
    e = Engine(model, slots=slots, capacity=capacity, **kwargs)
    for keys, values in e.cache.layers:
        keys.fill_(float("nan"))
        values.fill_(float("nan"))
    e.cache.dirty = [e.cache.capacity] * slots
    return e


def test_blocked_decode_widths_ignore_stale_cache_slots(ref_dir, batch_b):
    """CPU bf16 steps attend over whole key blocks under the mask: slots whose unwritten positions hold NaN (an
    earlier request's) give the same tokens as a fresh engine."""
    ours = MusicFlamingo.from_pretrained(ref_dir[1], dtype=torch.bfloat16)
    inputs = {k: v for k, v in batch_b.items() if k != "labels"}
    inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
    S = inputs["input_ids"].shape[1]
    fresh = generate(ours, **inputs, max_new_tokens=6, stop_token_ids=[])
    e = _stale_engine(ours, 2, S + 40)
    embeds = ours.embed(inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"])
    params = SamplingParams(max_new_tokens=6)
    mask = inputs["attention_mask"].bool()
    slots = [
        e.admit(Request(inputs["input_ids"][b], params, inputs_embeds=embeds[b][mask[b]])) for b in range(2)
    ]
    while e.decoding:
        e.step()
    assert [s.tokens for s in slots] == fresh[:, S:].tolist()


def test_kv_cache_views():
    """Prefill writes after a slot's length and sees exactly what it holds; decode rows write at their own
    positions (a row not decoding just past its keys, which then count as dirty); clear zeroes what was written;
    grow keeps it."""
    cache = KVCache(1, 2, 8, 1, 2, torch.float32, "cpu")
    k = torch.ones(1, 1, 3, 2)
    keys, _ = cache.view_prefill(1, 3).update(0, k, k)
    assert keys.shape == (1, 1, 3, 2) and cache.keys[0, 1, 0, :3].eq(1).all()
    cache.advance(1, 3)
    assert cache.lengths == [0, 3] and cache.dirty == [0, 3]
    view = cache.view_decode(2, torch.tensor([0, 3]), width=8)
    keys, _ = view.update(0, 2 * torch.ones(2, 1, 1, 2), 2 * torch.ones(2, 1, 1, 2))
    assert keys.shape == (2, 1, 8, 2) and keys.is_contiguous()  # as wide as the capacity: no copy for matmuls
    assert cache.keys[0, 1, 0, 3].eq(2).all() and cache.keys[0, 0, 0, 0].eq(2).all()
    assert cache.keys[0, 0, 0, 1:].eq(0).all() and cache.dirty == [1, 4]
    with pytest.raises(RuntimeError, match="overflow"):
        cache.view_prefill(1, 6)
    cache.grow(20)
    assert cache.capacity == 20 and cache.keys.shape[3] == 20 and cache.keys[0, 1, 0, 3].eq(2).all()
    cache.advance(1, 1)
    cache.clear(1)
    assert cache.lengths[1] == 0 and cache.keys[0, 1].eq(0).all()
    with pytest.raises(ValueError, match="capacity"):
        KVCache(1, 1, 0, 1, 2, torch.float32, "cpu")


def _right_padded(batch: dict) -> dict:
    """The same rows right-padded (training batches are): a causal mask with no dense mask."""
    out = dict(batch)
    ids, mask, labels = (batch[k].clone() for k in ("input_ids", "attention_mask", "labels"))
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        for t in (ids, mask, labels):
            t[i] = torch.cat([t[i, -n:], t[i, :-n]]) if n < t.shape[1] else t[i]
    out.update(input_ids=ids, attention_mask=mask, labels=labels)
    return out


@pytest.mark.parametrize("padding", ["left", "right"])
def test_training_loss_computes_last_layer_for_labelled_rows_only(ref_dir, batch_b, padding, monkeypatch):
    """`return_logits=False` runs the last decoder layer's queries/MLP on labelled positions only; the loss
    equals the reference's and loss and gradients equal the full forward's."""
    ref, path = ref_dir
    model = MusicFlamingo.from_pretrained(path, dtype=torch.float32).train()
    batch = batch_b if padding == "left" else _right_padded(batch_b)
    batch = dict(batch)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, : batch["labels"].shape[1] - 4] = -100  # row 0: only its last 4 tokens labelled
    counts = (batch["labels"][:, 1:] != -100).sum(1)
    seen = []
    last = model.language_model.layers[-1].mlp
    monkeypatch.setattr(
        last, "forward", lambda x, norm=None, f=last.forward: seen.append(x.shape) or f(x, norm)
    )

    def loss_and_grads(**kw):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **kw)
        out.loss.backward()
        return out.loss.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    lean, g_lean = loss_and_grads(return_logits=False)
    # the last MLP saw (B, K) rows, K = the most labelled positions in a row, far below S
    assert seen[-1][:2] == (2, int(counts.max())) and seen[-1][1] < batch["input_ids"].shape[1] // 2
    full, g_full = loss_and_grads(return_logits=True)
    assert seen[-1][1] == batch["input_ids"].shape[1]
    assert abs(lean.item() - full.item()) <= 1e-6
    with torch.no_grad():
        assert abs(lean.item() - ref(**batch).loss.item()) <= 1e-6
    assert g_lean.keys() == g_full.keys()
    for name, g in g_full.items():
        assert torch.allclose(g_lean[name], g, rtol=1e-4, atol=1e-6), name


def test_training_gradients_match_the_reference_pad_row_included(ref_dir, batch_b):
    """Gradients of a left-padded batch against the reference's: the embedding (whose pad row the reference's
    padding_idx keeps at zero gradient: ours had |g| ~2 there), the audio tower's first conv and the head."""
    ref, path = ref_dir
    model = MusicFlamingo.from_pretrained(path, dtype=torch.float32).train()
    model(**batch_b).loss.backward()
    ref.zero_grad(set_to_none=True)
    try:
        ref.train()
        ref(**batch_b).loss.backward()
        pairs = {
            "embed": (model.language_model.embed_tokens.weight, ref.get_input_embeddings().weight),
            "conv1": (model.audio_tower.conv1.weight, ref.model.audio_tower.conv1.weight),
            "head": (model.lm_head.weight, ref.get_output_embeddings().weight),
        }
        pad = model.config.text.pad_token_id
        assert int((batch_b["input_ids"] == pad).sum()) > 0  # the batch holds pad tokens
        for name, (ours_p, ref_p) in pairs.items():
            assert torch.allclose(ours_p.grad, ref_p.grad, rtol=1e-4, atol=1e-6), name
        assert model.language_model.embed_tokens.weight.grad[pad].abs().max() == 0
    finally:
        ref.zero_grad(set_to_none=True)
        ref.eval()


def test_labelled_rows_with_checkpointing_and_without_labels(ref_dir, batch_b):
    """Gradient checkpointing gives the same lean loss and gradients; a batch with no labels gives 0 and a
    backward that runs."""
    model = MusicFlamingo.from_pretrained(ref_dir[1], dtype=torch.float32).train()
    batch = _right_padded(batch_b)
    grads = []
    for ckpt in (False, True):
        model.language_model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        loss = model(**batch, return_logits=False).loss
        loss.backward()
        grads.append((loss.item(), model.language_model.layers[-1].mlp.down_proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    model.language_model.gradient_checkpointing = False
    none = dict(batch, labels=torch.full_like(batch["labels"], -100))
    out = model(**none, return_logits=False)
    assert out.loss.item() == 0.0 and out.num_label_tokens == 0
    out.loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_compiled_decode_matches_eager(ref_dir, batch_b, dtype):
    """`compile=True`: the compiled decode step (every slot, the whole capacity under the key mask) gives eager's
    tokens (left-padded batch, stop ids), also in an engine whose cache holds stale NaN values."""
    from torch._dynamo.utils import counters

    model = MusicFlamingo.from_pretrained(ref_dir[1], dtype=dtype)
    inputs = {k: v for k, v in batch_b.items() if k != "labels"}
    inputs["input_features"] = inputs["input_features"].to(dtype)
    eager = generate(model, **inputs, max_new_tokens=10, stop_token_ids=[])
    S = inputs["input_ids"].shape[1]
    frames = counters["stats"]["unique_graphs"]
    compiled = generate(model, **inputs, max_new_tokens=10, stop_token_ids=[], compile=True)
    assert counters["stats"]["unique_graphs"] > frames  # the steps really ran through torch.compile
    assert torch.equal(eager, compiled)
    e = _stale_engine(model, 2, S + 16, compile=True)  # longer than needed: masked
    embeds = model.embed(inputs["input_ids"], inputs["input_features"], inputs["input_features_mask"])
    mask = inputs["attention_mask"].bool()
    params = SamplingParams(max_new_tokens=10)
    slots = [
        e.admit(Request(inputs["input_ids"][b], params, inputs_embeds=embeds[b][mask[b]])) for b in range(2)
    ]
    while e.decoding:
        e.step()
    assert [s.tokens for s in slots] == eager[:, S:].tolist()
    stop = int(eager[0, S + 3])  # row 0 stops after 4 tokens, row 1 goes on (or stops where it emits it)
    a = generate(model, **inputs, max_new_tokens=10, stop_token_ids=[stop])
    b = generate(model, **inputs, max_new_tokens=10, stop_token_ids=[stop], compile=True)
    assert torch.equal(a, b)

"""Sequence packing: several conversations in one row, attention and positions kept within each.

The contract: a packed batch gives every conversation the logits and the loss (sum and token count) it gets in an
ordinary padded batch, and the training step's loss (the labelled-rows path) is the same mean.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.chat import IGNORE_INDEX as _
from musicflamingo.data.collate import collate, collate_packed
from musicflamingo.data.dataset import BadSample, ConversationDataset
from musicflamingo.data.manifest import read_manifest
from musicflamingo.data.sampler import TokenBudgetBatchSampler
from musicflamingo.model import qwen2
from musicflamingo.model.qwen2 import segment_mask, segment_positions
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.settings import SettingsError, check_train_settings
from musicflamingo.training import train

INPUTS = ("input_ids", "attention_mask", "input_features", "input_features_mask", "position_ids", "seq_ids")


def _sample(ids, labels, windows=0, value=0.0, name="x"):
    feats = torch.full((windows, 128, 10), value) if windows else None
    mask = torch.ones(windows, 10, dtype=torch.int32) if windows else None
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "input_features": feats,
        "input_features_mask": mask,
        "num_audio_tokens": 3 * windows,
        "id": name,
    }


def test_collate_packed_hand_written_layout():
    a = _sample([5, 6, 7], [5, 6, 7], name="a")  # labelled from its first token (train_on_prompt)
    b = _sample([8, 9], [_, 9], windows=2, value=1.0, name="b")
    c = _sample([4, 3], [4, 3], windows=1, value=2.0, name="c")
    d = _sample(list(range(10, 17)), list(range(10, 17)), windows=1, value=3.0, name="d")  # 7 > max_tokens
    bad = BadSample(index=9, id="bad", source="m.jsonl:10", reason="unreadable")
    batch = collate_packed([a, b, None, bad, c, d], pad_token_id=0, max_tokens=5)
    # rows: [a, b] (5 tokens), [c] (d does not fit after it), [d] (longer than a row: a row of its own)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, 0, 0],
        [4, 3, 0, 0, 0, 0, 0],
        [10, 11, 12, 13, 14, 15, 16],
    ]
    # each conversation's first label is ignored: the previous conversation's last token would predict it
    assert batch["labels"].tolist() == [
        [_, 6, 7, _, 9, _, _],
        [_, 3, _, _, _, _, _],
        [_, 11, 12, 13, 14, 15, 16],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0], list(range(7))]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, 1, 1, -1, -1], [2, 2, -1, -1, -1, -1, -1], [3] * 7]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 2, [1] * 2 + [0] * 5, [1] * 7]
    assert batch["input_features"][:, 0, 0].tolist() == [1.0, 1.0, 2.0, 3.0]  # windows in conversation order
    assert batch["input_features_mask"].shape == (4, 10)
    assert batch["ids"] == ["a", "b", "c", "d"] and batch["lengths"].tolist() == [3, 2, 2, 7]
    assert batch["num_audio_tokens"].tolist() == [0, 6, 3, 3] and batch["num_tokens"] == 14
    assert batch["num_samples"] == 6 and batch["bad_samples"] == [bad]
    assert collate_packed([a, b], 0, max_tokens=8, pad_to_multiple_of=4)["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        collate_packed([a], 0, max_tokens=0)


def test_segment_mask_is_block_diagonal_causal_and_positions_restart():
    seq = torch.tensor([[0, 0, 1, 1, 1, -1]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ]
    )
    mask = segment_mask(seq)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == expected.tolist()
    assert segment_positions(seq).tolist() == [[0, 1, 0, 1, 2, 0]]


def test_packed_sampler_fills_rows_by_token_sum():
    lengths = [10, 90, 20, 80, 30, 70, 40, 60, 50, 50] * 3
    packed = TokenBudgetBatchSampler(lengths, max_tokens=200, seed=1, packed=True)
    padded = TokenBudgetBatchSampler(lengths, max_tokens=200, seed=1)
    rows = list(packed)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 200 for row in rows)
    # the padded budget counts batch size * longest sample, so the same budget holds fewer samples
    assert len(rows) < len(list(padded))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model (fp32, eval) and four conversations with 1.5-2.5 s of audio (one or two windows),
    labelled from their first token (train_on_prompt) so that the boundary between packed conversations matters."""
    root = tmp_path_factory.mktemp("packing")
    proc_dir = write_processor(root / "proc")
    manifest = write_dataset(root / "data")
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    dataset = ConversationDataset(read_manifest(manifest), processor, train_on_prompt=True)
    samples = [dataset[i] for i in range(len(dataset))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = MusicFlamingoConfig.from_name("tiny", audio={"max_source_positions": 100})
        model = MusicFlamingo(config).eval()
    return model, processor, samples, proc_dir, manifest


def _inputs(batch, *keys):
    return {k: batch[k] for k in INPUTS + keys if batch.get(k) is not None}


def _loss_sum(logits, labels):
    """Shifted cross-entropy summed over one conversation's labelled tokens, and their count."""
    y = labels[1:]
    return F.cross_entropy(logits[:-1], y, ignore_index=_, reduction="sum"), int((y != _).sum())


@pytest.mark.parametrize("rows", ["one_row", "several_rows"])
@torch.no_grad()
def test_packed_equals_padded_per_conversation(tiny, rows):
    model, processor, samples, _dir, _manifest = tiny
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    # mixed lengths, some audio of two windows; first tokens labelled, so nothing may learn to predict them
    assert len(set(lengths)) > 1 and any(len(s["input_features"]) > 1 for s in samples)
    assert samples[1]["labels"][0] != _
    pad = processor.pad_token_id
    max_tokens = sum(lengths) if rows == "one_row" else lengths[0] + lengths[1]
    packed = collate_packed(samples, pad, max_tokens=max_tokens)
    padded = collate(samples, pad)
    assert (packed["input_ids"].shape[0] == 1) == (rows == "one_row")

    ref = model(**_inputs(padded)).logits  # (4, S, V)
    out = model(**_inputs(packed)).logits  # (R, L, V)
    # The wrong layout the test must catch: one causal sequence over the whole row (no seq_ids). (Positions
    # running on across conversations would not show: under the block mask RoPE sees only relative offsets.)
    mixed = model(**{k: v for k, v in _inputs(packed).items() if k not in ("seq_ids", "position_ids")}).logits
    embeds_ref = model.embed(padded["input_ids"], padded["input_features"], padded["input_features_mask"])
    embeds = model.embed(packed["input_ids"], packed["input_features"], packed["input_features_mask"])
    for k, n in enumerate(lengths):
        r, cols = torch.nonzero(packed["seq_ids"] == k, as_tuple=True)
        assert len(cols) == n and (r == r[0]).all()
        # RoTE is per audio: the spliced audio frames (and text embeddings) are those of the padded batch
        torch.testing.assert_close(embeds[r, cols], embeds_ref[k, :n], rtol=0, atol=1e-6)
        torch.testing.assert_close(out[r, cols], ref[k, :n], rtol=1e-5, atol=1e-5)
        loss, count = _loss_sum(out[r, cols], packed["labels"][r, cols])
        loss_ref, count_ref = _loss_sum(ref[k, :n], padded["labels"][k, :n])
        assert count == count_ref > 0
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        if int(cols[0]) > 0:  # a conversation after another one in its row
            assert (mixed[r, cols] - ref[k, :n]).abs().max() > 1e-3


@torch.no_grad()
def test_packed_training_loss_equals_padded(tiny):
    """The training path (labelled rows only in the last layer) and the full-logits loss give the padded batch's
    mean over the same label tokens; the model ignores each conversation's first label even when the caller did
    not."""
    model, processor, samples, _dir, _manifest = tiny
    pad = processor.pad_token_id
    # Each first label is never a target in the padded batch either (position 0 has no predecessor).
    padded = collate(samples, pad)
    packed = collate_packed(samples, pad, max_tokens=10_000)
    ref = model(**_inputs(padded, "labels"), return_logits=False)
    fast = model(**_inputs(packed, "labels"), return_logits=False)
    full = model(**_inputs(packed, "labels"))
    assert fast.num_label_tokens == full.num_label_tokens == ref.num_label_tokens
    torch.testing.assert_close(fast.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.loss, ref.loss, rtol=1e-5, atol=1e-6)
    raw = torch.cat([s["labels"] for s in samples])[None]  # concatenated labels, first tokens still labelled
    unguarded = model(**_inputs(packed), labels=raw, return_logits=False)
    assert unguarded.num_label_tokens == ref.num_label_tokens
    torch.testing.assert_close(unguarded.loss, ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("labels", [False, True], ids=["every_position", "labelled_rows"])
def test_runs_equal_the_block_mask_with_gradients(tiny, labels):
    """Attention run by run (`segment_attention`, the default) computes what the (T, T) block-diagonal mask does
    (`packed_attention="mask"`, what compiled layers take), outputs and gradients, for every position and for the
    last layer's labelled rows."""
    model, processor, samples, _dir, _manifest = tiny
    model = copy.deepcopy(model).train()
    packed = collate_packed(samples, processor.pad_token_id, max_tokens=10_000)
    inputs = _inputs(packed, "labels") if labels else _inputs(packed)
    results = []
    for mode in ("runs", "mask"):
        model.zero_grad(set_to_none=True)
        model.language_model.packed_attention = mode
        out = model(**inputs, return_logits=not labels)
        value = out.loss if labels else out.logits
        (value if labels else value.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((value.detach(), grads))
    (runs, g_runs), (mask, g_mask) = results
    torch.testing.assert_close(runs, mask, rtol=1e-5, atol=1e-6)
    assert g_runs.keys() == g_mask.keys() and g_runs
    for name in g_runs:
        torch.testing.assert_close(g_runs[name], g_mask[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_layers_take_the_block_mask(tiny):
    """A compiled layer would retrace for every new layout of runs: with compiled layers the model builds the mask."""
    model, *_ = tiny
    model = copy.deepcopy(model)
    assert not model.language_model._layers_compiled()
    model.compile_layers()  # wraps only: nothing is traced before a call
    assert model.language_model._layers_compiled()


def test_training_runs_packed(tiny, tmp_path, monkeypatch):
    """data.pack=true: one row per batch holding several conversations, the training step's forward attends within
    each."""
    _model, processor, samples, proc_dir, manifest = tiny
    budget = sum(int(s["input_ids"].shape[0]) for s in samples) + 64  # estimates may differ a little
    calls = []
    real_spans = qwen2.segment_spans
    monkeypatch.setattr(qwen2, "segment_spans", lambda s: calls.append(s.shape) or real_spans(s))
    cfg = compose_train(
        tmp_path, manifest, proc_dir, ["debug=fast", "data.pack=true", f"data.batch_max_tokens={budget}"]
    )
    metrics, obj = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert obj["trainer"].global_step == 2 and len(calls) >= 2 and calls[0][0] == 1  # one packed row
    dm = obj["datamodule"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and len(batch["ids"]) == len(samples)
    # lit's step inputs carry the packing: its loss is that of the same conversations in a padded batch
    lit = obj["model"].eval()
    rows = [dm.train_dataset[i] for i in next(iter(dm.train_sampler))]
    packed = collate_packed(rows, processor.pad_token_id, max_tokens=budget)
    padded = collate(rows, processor.pad_token_id)
    with torch.no_grad():
        packed_out = lit.model(**lit._model_inputs(packed), return_logits=False)
        padded_out = lit.model(**lit._model_inputs(padded), return_logits=False)
    assert packed_out.num_label_tokens == padded_out.num_label_tokens > 0
    torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-5, atol=1e-6)


def test_pack_setting_is_checked(tiny, tmp_path):
    *_, proc_dir, manifest = tiny
    cfg = compose_train(tmp_path, manifest, proc_dir, ["data.pack=maybe"])
    with pytest.raises(SettingsError, match="data.pack='maybe': expected true or false"):
        train(cfg)
    grpo = {"model": {"_target_": "musicflamingo.grpo.GRPOLit"}, "data": {"pack": True}}
    with pytest.raises(SettingsError, match="GRPO makes its prompts from padded batches"):
        check_train_settings(grpo)
    check_train_settings(
        {"model": {"_target_": "musicflamingo.lit.MusicFlamingoLit"}, "data": {"pack": True}}
    )

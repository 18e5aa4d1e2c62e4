"""Parity gaps of review round 6: config.json fields the reference honours, the tied head, encoder layerdrop,
batches the other parity tests do not build (text-only rows beside audio rows, several clips in one row, window
boundaries, right padding), checkpointing of the audio tower, bf16 training loss."""

from __future__ import annotations

import json

import pytest
import torch
from reference_model import build_batch, make_reference_model, random_audio, reference_features
from tiny_assets import TINY_IDS

from musicflamingo import MusicFlamingo
from musicflamingo.model import ConfigError, MusicFlamingoConfig

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


def _ref_config_json(ref_dir) -> dict:
    return json.loads((ref_dir[1] / "config.json").read_text())


# ---------------------------------------------------------------------------------------------- config.json fields
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["audio_config"].update(activation_function="relu"),
            "audio_config.activation_function='relu'",
        ),
        (lambda c: c["text_config"].update(hidden_act="gelu"), "text_config.hidden_act='gelu'"),
        (
            lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn", factor=4.0),
            "text_config.rope_parameters.rope_type='yarn'",
        ),
        (
            lambda c: c["text_config"].update(rope_scaling={"type": "linear", "factor": 2.0}),
            "text_config.rope_scaling.rope_type='linear'",
        ),
        (
            lambda c: c["text_config"].update(
                layer_types=["full_attention", "sliding_attention", "full_attention"]
            ),
            "text_config.layer_types holds ['sliding_attention']",
        ),
        (
            lambda c: (
                c["text_config"].pop("layer_types"),
                c["text_config"].update(use_sliding_window=True, sliding_window=8, max_window_layers=1),
            ),
            "text_config.use_sliding_window=true with sliding_window=8",
        ),
    ],
    ids=["encoder-act", "decoder-act", "rope-yarn", "rope-scaling", "layer-types", "sliding-window"],
)
def test_config_fields_the_reference_honours_are_refused_not_ignored(ref_dir, edit, message):
    """Each of these makes the reference compute other numbers (another activation, scaled RoPE, sliding-window
    layers); they were read past silently, so the model loaded and computed the plain model's numbers."""
    d = _ref_config_json(ref_dir)
    edit(d)
    with pytest.raises(ConfigError) as err:
        MusicFlamingoConfig.from_hf_dict(d, source="x/config.json")
    assert str(err.value).startswith("x/config.json: ") and message in str(err.value), str(err.value)


def test_config_fields_at_supported_values_still_load(ref_dir):
    """The reference's own config.json (layer_types all full, sliding_window null, hidden_act silu) loads, and so do
    the values that change nothing: sliding on from a layer past the last, a default rope_scaling."""
    d = _ref_config_json(ref_dir)
    assert (
        d["text_config"]["layer_types"] == ["full_attention"] * 3
        and d["text_config"]["sliding_window"] is None
    )
    base = MusicFlamingoConfig.from_hf_dict(d)
    d["text_config"].pop("layer_types")
    d["text_config"].update(use_sliding_window=True, sliding_window=8, max_window_layers=3)
    # the reference reads rope_scaling over rope_parameters (transformers' convert_rope_params_to_dict): its
    # rope_theta must come along, or it is Qwen2Config's 10000
    d["text_config"]["rope_scaling"] = {
        "rope_type": "default",
        "rope_theta": d["text_config"]["rope_parameters"]["rope_theta"],
    }
    assert MusicFlamingoConfig.from_hf_dict(d) == base


def test_layerdrop_is_read_written_and_matches_the_reference_in_training(tmp_path):
    """`layerdrop` (the reference skips each encoder layer in training with that probability) was ignored on load and
    written back as 0: a training step ran every layer."""
    ref = make_reference_model(seed=0)
    ref.config.audio_config.layerdrop = 0.5
    ref.save_pretrained(tmp_path)
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    assert ref.model.audio_tower.layerdrop == 0.5
    ours = MusicFlamingo.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.config.audio.layerdrop == 0.5
    assert ours.config.to_hf_dict()["audio_config"]["layerdrop"] == 0.5
    assert MusicFlamingoConfig.from_hf_dict(ours.config.to_hf_dict()) == ours.config
    ref_tower, tower = ref.model.audio_tower.train(), ours.audio_tower.train()
    batch = build_batch([random_audio(7.0, seed=4)], [3])
    feats, mask = batch["input_features"], batch["input_features_mask"]
    with torch.no_grad():
        tower.eval()
        full = tower(feats, mask)
        tower.train()
        outs = []
        for seed in range(4):  # some seeds drop a layer, some do not: each must agree with the reference
            torch.manual_seed(seed)
            r = ref_tower(feats, mask).last_hidden_state
            torch.manual_seed(seed)
            o = tower(feats, mask)
            assert (o - r).abs().max().item() <= 1e-5, seed
            outs.append(o)
    assert any((o - full).abs().max() > 1e-3 for o in outs)  # a layer really was skipped
    with pytest.raises(ConfigError, match="layerdrop"):
        MusicFlamingoConfig.from_name("tiny", audio={"layerdrop": 1.5})


# ---------------------------------------------------------------------------------------------- tied head
def test_tied_head_save_is_read_by_the_reference(tmp_path):
    """A tied model's save left out `lm_head.weight`; the reference never ties (`_tied_weights_keys = None`), so
    it started that head at random and computed other logits."""
    torch.manual_seed(0)
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny", text={"tie_word_embeddings": True})).eval()
    model.save_pretrained(tmp_path / "t")
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(
        tmp_path / "t", dtype=torch.float32
    )
    ids = torch.randint(0, 290, (2, 9))
    with torch.no_grad():
        assert (ref.eval()(input_ids=ids).logits - model(ids).logits).abs().max().item() <= 1e-5
    back = MusicFlamingo.from_pretrained(tmp_path / "t")
    assert back.lm_head.weight is back.language_model.embed_tokens.weight  # tied again: the head equals it


def test_reference_tied_config_with_its_own_head_loads_as_the_reference_computes(tmp_path):
    """A reference checkpoint with text_config.tie_word_embeddings=true stores a head of its own (the reference does
    not tie): our loader refused it (an unexpected key); now it loads that head and gives the reference's logits."""
    ref = make_reference_model(seed=1, tie_word_embeddings=True)
    assert not torch.equal(ref.lm_head.weight, ref.get_input_embeddings().weight)
    ref.save_pretrained(tmp_path / "r")
    ours = MusicFlamingo.from_pretrained(tmp_path / "r", dtype=torch.float32)
    assert ours.config.text.tie_word_embeddings
    assert ours.lm_head.weight is not ours.language_model.embed_tokens.weight
    batch = build_batch([random_audio(3.0, seed=2)], [5])
    with torch.no_grad():
        assert (ours(**batch).logits - ref(**batch).logits).abs().max().item() <= 1e-5
    ours.save_pretrained(tmp_path / "o")  # and it stays so through our own save
    again = MusicFlamingo.from_pretrained(tmp_path / "o", dtype=torch.float32)
    assert torch.equal(again.lm_head.weight, ref.lm_head.weight)


# ---------------------------------------------------------------------------------------------- batch layouts
def _right_padded(batch: dict) -> dict:
    out = dict(batch)
    ids, mask, labels = (batch[k].clone() for k in ("input_ids", "attention_mask", "labels"))
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        for t in (ids, mask, labels):
            t[i] = torch.cat([t[i, -n:], t[i, :-n]]) if n < t.shape[1] else t[i]
    out.update(input_ids=ids, attention_mask=mask, labels=labels)
    return out


def _two_clips_in_one_row() -> dict:
    """Row 0 holds two clips (4 s, then 31 s: two windows), row 1 one (2 s); left padded."""
    feats, mask, tokens = reference_features(
        [random_audio(4.0, seed=5), random_audio(31.0, seed=6), random_audio(2.0, seed=7)]
    )
    A, bos, eos = TINY_IDS.audio_token_id, TINY_IDS.audio_bos_token_id, TINY_IDS.audio_eos_token_id
    rows = [
        [5, 6, bos] + [A] * tokens[0] + [eos, 7, bos] + [A] * tokens[1] + [eos, 8],
        [9, bos] + [A] * tokens[2] + [eos, 10, 11],
    ]
    S = max(map(len, rows))
    ids = torch.full((2, S), TINY_IDS.pad_token_id)
    attn = torch.zeros(2, S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r) :], attn[i, S - len(r) :] = torch.tensor(r), 1
    labels = ids.masked_fill((attn == 0) | (ids == A) | (ids == bos) | (ids == eos), -100)
    return dict(
        input_ids=ids, attention_mask=attn, input_features=feats, input_features_mask=mask, labels=labels
    )


def _layouts() -> dict[str, dict]:
    # 30 s + 161 samples: the last window has 2 mel frames and 0 audio tokens (the RoTE quirk gives it to the
    # next audio); 479999 samples: one sample short of a window; a text-only row after the audio rows
    boundary = build_batch(
        [random_audio(samples=480161, seed=3), random_audio(samples=479999, seed=4)], [4, 6, 9]
    )
    mixed = build_batch([random_audio(9.0, seed=1), random_audio(samples=1600, seed=2)], [12, 3, 20])
    non_prefix = build_batch([random_audio(10.0, seed=8)], [5])
    m = non_prefix["input_features_mask"]
    shifted = torch.zeros_like(m)
    shifted[0, 7 : 7 + int(m.sum())] = 1  # the reference uses only the count of the mask
    non_prefix["input_features_mask"] = shifted
    return {
        "boundary-and-text-row": boundary,
        "mixed-right-padded": _right_padded(mixed),
        "two-clips-one-row": _two_clips_in_one_row(),
        "non-prefix-mask": non_prefix,
    }


def test_batch_layouts_match_the_reference(ref_dir, ours):
    ref, _ = ref_dir
    for name, batch in _layouts().items():
        with torch.no_grad():
            r, o = ref(**batch), ours(**batch)
            lean = ours(**batch, return_logits=False)
        valid = batch["attention_mask"].bool()
        assert (o.logits - r.logits)[valid].abs().max().item() <= 1e-5, name
        assert abs(o.loss.item() - r.loss.item()) <= 1e-5, name
        assert abs(lean.loss.item() - r.loss.item()) <= 1e-5, name


def test_audio_tower_checkpointing_gives_the_same_loss_and_gradients(ref_dir):
    """Gradient checkpointing of both stacks (the other test covers the decoder only): equal loss and gradients,
    and both equal the reference's."""
    ref, path = ref_dir
    model = MusicFlamingo.from_pretrained(path, dtype=torch.float32).train()
    batch = _right_padded(build_batch([random_audio(5.0, seed=1), random_audio(2.0, seed=2)], [6, 4]))
    results = []
    for ckpt in (False, True):
        model.set_gradient_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        loss = model(**batch, return_logits=False).loss
        loss.backward()
        results.append(
            (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (l0, g0), (l1, g1) = results
    assert l0 == pytest.approx(l1, abs=1e-6) and g0.keys() == g1.keys()
    assert "audio_tower.conv1.weight" in g0
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-5, atol=1e-6, msg=n)
    try:
        ref.train()
        ref.zero_grad(set_to_none=True)
        r = ref(**batch).loss
        r.backward()
        assert abs(r.item() - l1) <= 1e-5
        torch.testing.assert_close(
            g1["audio_tower.conv1.weight"], ref.model.audio_tower.conv1.weight.grad, rtol=1e-4, atol=1e-6
        )
    finally:
        ref.zero_grad(set_to_none=True)
        ref.eval()


def test_bf16_loss_close_to_the_reference_in_bf16(ref_dir):
    """A bf16 model's training loss (lean path: labelled rows only) against the reference loaded in bf16."""
    _, path = ref_dir
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(
        path, dtype=torch.bfloat16
    ).eval()
    ours = MusicFlamingo.from_pretrained(path, dtype=torch.bfloat16)
    batch = build_batch([random_audio(12.0, seed=1), random_audio(3.0, seed=2)], [8, 5, 7])
    batch["input_features"] = batch["input_features"].to(torch.bfloat16)
    with torch.no_grad():
        r = ref(**batch).loss.item()
        full = ours(**batch).loss.item()
        lean = ours(**batch, return_logits=False).loss.item()
    assert abs(full - r) <= 0.01 * max(abs(r), 1.0), (full, r)
    assert abs(lean - r) <= 0.01 * max(abs(r), 1.0), (lean, r)


def test_training_loss_of_a_decoder_without_layers():
    """`num_hidden_layers=0` (the config allows it): the lean training loss indexed the (B, T) hidden states with the
    (B, K) mask of wanted rows, which only the last layer gathers, and raised a bare IndexError."""
    torch.manual_seed(0)
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny", text={"num_hidden_layers": 0})).train()
    ids = torch.randint(0, 290, (2, 7))
    labels = ids.clone()
    labels[0, :4] = -100
    lean = model(ids, labels=labels, return_logits=False).loss
    full = model(ids, labels=labels).loss
    assert torch.isfinite(lean) and abs(lean.item() - full.item()) <= 1e-6
    lean.backward()

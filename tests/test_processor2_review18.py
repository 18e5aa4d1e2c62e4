"""Review 18 (the processor's parts called as transformers' MusicFlamingoProcessor's): ``processor.feature_extractor(
audio, sampling_rate=16000, return_tensors="pt")`` was a TypeError naming ``sampling_rate`` (and gave a tuple where
transformers' WhisperFeatureExtractor gives ``input_features``/``attention_mask``); tokenizer methods of transformers'
Qwen2 tokenizer were AttributeErrors. Each is compared with transformers' object read from the same tiny folder.
"""

import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

RNG = np.random.default_rng(18)
THREE_S = (RNG.standard_normal(16000 * 3 + 77) * 0.1).astype(np.float32)
SHORT = THREE_S[:20001]
LONG = (RNG.standard_normal(16000 * 31) * 0.1).astype(np.float32)  # past one 30-s window: cut, as there


def _same_features(r, o):
    assert list(o.keys()) == list(r.keys())
    for k in r:
        rv, ov = r[k], o[k]
        assert type(ov) is type(rv) and ov.dtype == rv.dtype and tuple(ov.shape) == tuple(rv.shape), k
        rv, ov = np.asarray(rv), np.asarray(ov)
        if k == "input_features":
            assert np.abs(rv - ov).max() <= 1e-4
        else:
            assert np.array_equal(rv, ov)


@pytest.mark.parametrize(
    "audio, kw",
    [
        (
            THREE_S,
            {"sampling_rate": 16000, "return_tensors": "pt"},
        ),  # the lead: transformers' per-sample mask
        (THREE_S, {"sampling_rate": 16000, "return_tensors": "pt", "return_attention_mask": True}),
        (THREE_S, {"sampling_rate": 16000}),  # numpy
        (torch.from_numpy(SHORT), {"return_tensors": "np", "return_attention_mask": False}),
        ([THREE_S, SHORT], {"sampling_rate": 16000, "return_tensors": "pt", "return_attention_mask": True}),
        ([SHORT, THREE_S], {"sampling_rate": 16000, "padding": True, "return_attention_mask": True}),
        (LONG, {"sampling_rate": 16000, "return_tensors": "pt", "return_attention_mask": True}),
        (
            SHORT.tolist()[:4000],
            {"max_length": 3000, "pad_to_multiple_of": 480, "return_attention_mask": True},
        ),
    ],
)
def test_feature_extractor_called_as_transformers(ref, ours, audio, kw):
    """A TypeError naming sampling_rate; the keys, types, shapes and values are transformers' now."""
    _same_features(ref.feature_extractor(audio, **kw), ours.feature_extractor(audio, **kw))


def test_feature_extractor_refusals_and_the_processor_call(ref, ours):
    """A wrong rate names both rates (transformers raises too); unknown keywords are named; the windows call the
    processor makes still gives its (features, frame mask) tuple, equal to what the reference processor passes."""
    with pytest.raises(ValueError, match=r"sampling_rate=8000: .*16000 Hz audio, not 8000 Hz"):
        ours.feature_extractor(THREE_S, sampling_rate=8000, return_tensors="pt")
    with pytest.raises(ValueError):
        ref.feature_extractor(THREE_S, sampling_rate=8000)
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['sample_rate'\]"):
        ours.feature_extractor(THREE_S, sample_rate=16000)
    with pytest.raises(ValueError, match=r"audio 1 has shape \(2, 100\)"):
        ours.feature_extractor([THREE_S, np.zeros((2, 100), np.float32)], sampling_rate=16000)
    feats, mask = ours.feature_extractor([THREE_S, SHORT])
    r = ref.feature_extractor(
        [THREE_S, SHORT], sampling_rate=16000, return_attention_mask=True, return_tensors="pt"
    )
    assert (feats - r["input_features"]).abs().max() <= 1e-4 and torch.equal(mask, r["attention_mask"])
    assert ours.feature_extractor.model_input_names == ref.feature_extractor.model_input_names


# ---------------------------------------------------------------- the tokenizer's remaining transformers methods
TEXTS = ["Key?", "What is the tempo of this <sound> piece?<|im_end|> é", "<|im_start|>user\nA minor , 92 bpm"]


def _tokenizers(folder):
    from musicflamingo.tokenizer import load_tokenizer

    return transformers.AutoTokenizer.from_pretrained(str(folder)), load_tokenizer(str(folder))


def _same(r, o):
    if isinstance(r, (torch.Tensor, np.ndarray)):
        assert type(o) is type(r) and o.dtype == r.dtype and o.tolist() == r.tolist()
    elif hasattr(r, "keys"):
        assert list(o.keys()) == list(r.keys())
        for k in r:
            _same(r[k], o[k])
    else:
        assert o == r


def test_tokenizer_methods_as_transformers(ref_dir):
    """convert_tokens_to_string, name_or_path, added_tokens_decoder and pad were AttributeErrors."""
    r, o = _tokenizers(ref_dir)
    for text in TEXTS:
        assert o.convert_tokens_to_string(o.tokenize(text)) == r.convert_tokens_to_string(r.tokenize(text))
    assert o.name_or_path == r.name_or_path == str(ref_dir)
    assert o.added_tokens_decoder == r.added_tokens_decoder
    with pytest.raises(ValueError, match=r"list of token strings, got NoneType None"):
        o.convert_tokens_to_string(["Key", None])
    rows = [r.encode(t) for t in TEXTS]
    calls = [
        ({"input_ids": rows}, {}),
        ([{"input_ids": x, "labels": x} for x in rows[:1]] * 2, {"return_tensors": "pt"}),
        ([{"input_ids": x} for x in rows], {"return_tensors": "np", "padding_side": "left"}),
        ({"input_ids": [torch.tensor(x) for x in rows]}, {}),  # tensors in: tensors out
        (dict(r(TEXTS[:2])), {"padding": "max_length", "max_length": 30, "return_tensors": "pt"}),
        ({"input_ids": rows}, {"pad_to_multiple_of": 8, "return_attention_mask": False}),
        ({"input_ids": rows[0]}, {"padding": "max_length", "max_length": 40}),  # one example
        ({"input_ids": rows}, {"padding": False}),
    ]
    for inputs, kw in calls:  # transformers' pad turns tensors in its argument into lists: ours goes first
        ours = o.pad(copy.deepcopy(inputs), **kw)
        _same(r.pad(copy.deepcopy(inputs), **kw), ours)
    r.padding_side = o.padding_side = "left"
    _same(r.pad({"input_ids": rows}), o.pad({"input_ids": rows}))
    with pytest.raises(
        ValueError, match=r"labels has rows of \[.*\] items, which return_tensors='pt' cannot stack"
    ):
        o.pad([{"input_ids": x, "labels": x} for x in rows], return_tensors="pt")


def _special(tok):
    return tok.all_special_tokens, tok.all_special_ids, tok.special_tokens_map, len(tok)


def test_special_tokens_as_transformers_5(ref_dir, tmp_path):
    """add_special_tokens was an AttributeError; add_tokens(..., special_tokens=True) put the new tokens in
    all_special_tokens (transformers 5 leaves them out: its list is the named tokens and extra_special_tokens)."""
    r, o = _tokenizers(ref_dir)
    assert r.add_tokens(["<n>"], special_tokens=True) == o.add_tokens(["<n>"], special_tokens=True) == 1
    assert _special(o) == _special(r) and o.decode(o.encode("a <n> b")) == r.decode(r.encode("a <n> b"), True)
    ids = o.encode("<|im_start|>a <n> b<sound>")
    assert o.convert_ids_to_tokens(ids, skip_special_tokens=True) == r.convert_ids_to_tokens(ids, True)
    for args in [
        ({"extra_special_tokens": ["<sound>", "<y>"]}, False),  # extend
        ({"pad_token": "<mypad>", "mask_token": "<mask>"}, True),
        ({"bos_token": "<|im_start|>", "additional_special_tokens": ["<x1>"]}, True),  # replace
    ]:
        assert o.add_special_tokens(*args) == r.add_special_tokens(*args)
        assert _special(o) == _special(r) and o.extra_special_tokens == r.extra_special_tokens
        assert o.encode("<x1> <mypad>a<y>") == r.encode("<x1> <mypad>a<y>")
    with pytest.raises(ValueError, match=r"'foo_token' is not a special token name"):
        o.add_special_tokens({"foo_token": "<f>"})
    o.save_pretrained(tmp_path / "saved")
    assert _special(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))) == _special(r)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.pop("extra_special_tokens"),  # no list: the named tokens only
        lambda c: c.update(extra_special_tokens=[], additional_special_tokens=["<sound>", "<|im_start|>"]),
        lambda c: c.update(audio_token="<sound>", sep_token="<|sound_bos|>"),  # model-specific named token
        lambda c: c.update(extra_special_tokens={"audio_token": "<sound>", "bos_audio": "<|sound_bos|>"}),
    ],
)
def test_all_special_tokens_follow_the_config_as_transformers(ref_dir, tmp_path, edit):
    """all_special_tokens listed every special token of tokenizer.json; transformers 5 lists the config's."""
    import json
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(ref_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    edit(config)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    r, o = _tokenizers(folder)
    assert _special(o) == _special(r)
    ids = o.encode(TEXTS[2] + TEXTS[1])
    assert o.convert_ids_to_tokens(ids, skip_special_tokens=True) == r.convert_ids_to_tokens(ids, True)


def test_a_null_return_attention_mask_reads_as_transformers_false():
    """`"return_attention_mask": null` in a preprocessor_config.json loaded before this round (transformers reads
    it as false); a value that is not a boolean is still refused by name."""
    from musicflamingo.audio.features import LogMelExtractor

    assert LogMelExtractor.from_dict({"return_attention_mask": None}).return_attention_mask is False
    assert LogMelExtractor.from_dict({}).return_attention_mask is False
    with pytest.raises(ValueError, match="return_attention_mask=1 must be true or false"):
        LogMelExtractor.from_dict({"return_attention_mask": 1})

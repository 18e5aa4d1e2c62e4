"""Review 18, a second look at this round's tokenizer/processor/feature-extractor and Jam-ALT commits: a tokenizer
folder loaded and saved again (checkpoints, exports) keeps its tokenizer_config.json byte for byte; a Jam-ALT run
whose language alt-eval does not know scores and reports instead of failing after every prediction; the processor's
own windows call never takes the transformers-shaped feature-extractor path."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from test_eval_release_formats import _bench, _run
from test_eval_review18 import REVISED, make_jam_alt_v12
from tiny_assets import write_tiny_tokenizer

from musicflamingo.audio.features import LogMelExtractor
from musicflamingo.tokenizer import load_tokenizer


def test_saved_tokenizer_config_is_the_loaded_one(tmp_path):
    """save_pretrained of a tokenizer read from a folder rewrote tokenizer_config.json: additional_special_tokens
    became an extra_special_tokens list (transformers 4 fails on a list there: 'list' object has no attribute
    'keys') and added_tokens_decoder was rebuilt from tokenizer.json (a token the file left undeclared, read as text
    by transformers, became one id there), and an AddedToken-form unk_token became a string. Unchanged since
    loading, the file is written as it was read."""
    src = write_tiny_tokenizer(tmp_path / "src")
    config = json.loads((src / "tokenizer_config.json").read_text())
    # a token of tokenizer.json the config's list leaves out (added with the tokenizers library)
    left_out = config["added_tokens_decoder"].pop(max(config["added_tokens_decoder"], key=int))
    # a named token written as an AddedToken (older transformers): kept in that form, not turned into a string
    config["unk_token"] = {
        "__type": "AddedToken",
        "content": "<|endoftext|>",
        "lstrip": False,
        "normalized": True,
    }
    (src / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    logging.getLogger(
        "musicflamingo.tokenizer"
    ).disabled = True  # its undeclared-token warning, expected here
    try:
        tok = load_tokenizer(src)
        tok.save_pretrained(tmp_path / "saved")
    finally:
        logging.getLogger("musicflamingo.tokenizer").disabled = False
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert list(saved) == list(config) and saved == config
    assert left_out["content"] not in {v["content"] for v in saved["added_tokens_decoder"].values()}
    assert (tmp_path / "saved" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()

    # a change since loading is written, under the key the file had (transformers 4 and 5 read it)
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "src2"))
    assert tok.add_special_tokens({"extra_special_tokens": ["<x1>"]}, replace_extra_special_tokens=False) == 1
    tok.save_pretrained(tmp_path / "saved2")
    saved = json.loads((tmp_path / "saved2" / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in saved and saved["additional_special_tokens"][-1] == "<x1>"
    assert "<x1>" in {v["content"] for v in saved["added_tokens_decoder"].values()}
    again = load_tokenizer(tmp_path / "saved2")
    assert again.all_special_tokens == tok.all_special_tokens and again.encode("a<x1>b") == tok.encode(
        "a<x1>b"
    )
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved2"))
    assert ref.all_special_tokens == tok.all_special_tokens
    assert ref("a<x1>b")["input_ids"] == tok.encode("a<x1>b")


def test_jam_alt_language_alt_eval_does_not_know(tmp_path):
    """A Jam-ALT table with a language alt-eval's iso639 table lacks ('zz') failed with a bare
    LanguageNotFoundError after every prediction was made (no results.json, no results.md), and a language name
    we lowercase ('Italian' -> 'italian') was one of them. Now an English name or a region tag is matched, an
    unknown code is named in results.json's alt_eval error and results.md, and the other languages are scored."""
    pytest.importorskip("alt_eval")
    root = make_jam_alt_v12(tmp_path)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    langs = {
        "HILA_-_Give_Me_the_Same": "zz",
        "Avercage_-_Embers": "Italian",
        "10._Disparan_-_criatura": "es-MX",
    }
    for r in rows:
        r["language"] = langs.get(r["name"], r["language"])
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    names = [it.id for it in _bench("jamendolyrics", root).items]
    results = _run("jamendolyrics", root, {n: REVISED[n] for n in names})
    lyrics = results["tasks"]["lyrics"]
    assert lyrics["wer"] == 0.0 and lyrics["n"] == 5  # our scores are all there
    alt = lyrics["alt_eval"]
    assert "'zz'" in alt["error"] and "italian" not in alt["error"] and "es-mx" not in alt["error"]
    per = alt["per_language"]
    assert "error" in per["zz"] and per["italian"]["WER"] == 0.0 and per["es-mx"]["WER_case"] == 0.0
    assert per["de"]["F1_pare"] is None  # NaN there: null, rendered n/a
    report = (root / "out" / "results.md").read_text()
    assert "alt-eval knows no language 'zz'" in report
    assert "| italian | 1 | 0.00% |" in report and "| de | 1 | 0.00% | 0.00% |" in report
    assert "nan" not in report.lower()


@pytest.mark.parametrize(
    "windows",
    [
        [np.zeros(16000, np.float32)],  # one window, as a list of one array
        [torch.zeros(16000)],  # one window, as a list of one tensor
        torch.zeros(2, 16000),  # windows as a [W, T] tensor
        [np.zeros(480000, np.float32), np.zeros(100, np.float32)],
    ],
)
def test_processor_windows_call_keeps_its_path(windows):
    """The feature extractor's new transformers-shaped dispatch (one waveform or its keywords) must never take the
    processor's windows: they give (features [W, 128, 3000], frame mask [W, 3000]) as before."""
    out = LogMelExtractor()(windows)
    assert isinstance(out, tuple) and len(out) == 2
    features, mask = out
    assert tuple(features.shape) == (len(windows), 128, 3000) and tuple(mask.shape) == (len(windows), 3000)
    assert mask.dtype == torch.int32


def test_alt_eval_failure_leaves_the_report():
    """A Jam-ALT reference our normalisation keeps but alt-eval's tokenisation finds no word in ("½") raised
    ZeroDivisionError from alt-eval (its German subset has no word) after every prediction was made: the run wrote no
    results. Now that language says why alt-eval has no numbers, the others are scored, and our WER is unchanged."""
    pytest.importorskip("alt_eval")
    from musicflamingo.eval.benchmarks import EvalItem
    from musicflamingo.eval.metrics import score_lyrics

    def item(i, answer, lang):
        meta = {"language": lang, "scorer": "alt-eval"}
        return EvalItem(id=str(i), audio="a.mp3", prompt="p", task="lyrics", answer=answer, meta=meta)

    items = [item(0, "½", "de"), item(1, "Hello there,\nfriend", "en")]
    summary, rows = score_lyrics(items, ["½", "hello there friend"])
    assert [r["error"] for r in rows] == [0.0, 0.0] and summary["n"] == 2
    alt = summary["alt_eval"]
    assert "error" not in alt and alt["n"] == 2  # overall, the English words are counted
    assert "alt-eval failed (ZeroDivisionError" in alt["per_language"]["de"]["error"]
    assert alt["per_language"]["en"]["WER"] == 0.0 and alt["per_language"]["en"]["WER_case"] > 0.0


def test_added_extra_tokens_keep_the_named_ones(tmp_path):
    """A tokenizer_config.json whose extra_special_tokens is transformers' mapping of model-specific named tokens
    ({"audio_token": "<sound>"}): add_special_tokens({"extra_special_tokens": [...]}) then save_pretrained wrote the
    list over the mapping, so audio_token was gone on reload (here and in transformers). It is kept as a top-level
    key, as transformers 5 saves it, and both read the folder as transformers' own save."""
    transformers = pytest.importorskip("transformers")
    src = write_tiny_tokenizer(tmp_path / "src")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("additional_special_tokens")
    config["extra_special_tokens"] = {"audio_token": "<sound>"}
    (src / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    ours, ref = load_tokenizer(src), transformers.AutoTokenizer.from_pretrained(str(src))
    for tok in (ours, ref):
        tok.add_special_tokens({"extra_special_tokens": ["<y>"]}, replace_extra_special_tokens=False)
        tok.save_pretrained(tmp_path / type(tok).__name__)
    want = transformers.AutoTokenizer.from_pretrained(str(tmp_path / type(ref).__name__))
    assert want.special_tokens_map["audio_token"] == "<sound>"  # transformers keeps it
    for reread in (
        load_tokenizer(tmp_path / "HFTokenizer"),
        transformers.AutoTokenizer.from_pretrained(str(tmp_path / "HFTokenizer")),
    ):
        assert reread.special_tokens_map == want.special_tokens_map
        assert (
            reread.all_special_tokens
            == want.all_special_tokens
            == ["<|im_end|>", "<|endoftext|>", "<sound>", "<y>"]
        )

"""Review 17 (tokenizer vocabulary): code ported from transformers reads ``tokenizer.vocab_size`` and passes
``add_special_tokens=True``.

``vocab_size`` counted the added tokens too (303 on the tiny files, transformers' 297): it is now the base vocabulary,
as there, and whatever means "every id" (the model's embedding size, the vocabulary checks) uses ``len(tokenizer)``.
``add_special_tokens=True`` was refused by the processor although Qwen2's tokenizer adds nothing with it: taken where
the tokenizer adds nothing, refused where it would add a token.
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from tiny_assets import BASE_VOCAB_SIZE, TINY_IDS

from musicflamingo.demo import model_overrides
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import TokenizerError, load_tokenizer
from musicflamingo.training import build_datamodule

transformers = pytest.importorskip("transformers")


def test_vocab_size_is_the_base_vocabulary_and_len_every_id_as_the_reference(ref_dir):
    ref = transformers.AutoTokenizer.from_pretrained(str(ref_dir))
    ours = load_tokenizer(ref_dir)
    assert ours.vocab_size == ref.vocab_size == BASE_VOCAB_SIZE
    assert len(ours) == len(ref) == TINY_IDS.vocab_size > BASE_VOCAB_SIZE
    assert max(ours.get_vocab().values()) == len(ours) - 1


def _model(processor, vocab):
    return SimpleNamespace(
        config=SimpleNamespace(
            window_seconds=processor.chunk_length,
            audio=SimpleNamespace(max_source_positions=1500),
            text=SimpleNamespace(vocab_size=vocab),
        )
    )


def test_vocabulary_checks_count_the_added_tokens(ref_dir, ours):
    """A model with room for the base vocabulary but not the added tokens (sound, chat tokens) is refused: their
    ids would index past its embeddings."""
    n = len(ours.tokenizer)
    with pytest.raises(
        TokenizerError, match=rf"the tokenizer has {n} ids but the model has a vocabulary of 300"
    ):
        ours.check_vocab(300)
    ours.check_vocab(n)
    cfg = OmegaConf.create({"data": {"processor": str(ref_dir)}})
    with pytest.raises(ValueError, match=rf"has {n} ids, model vocab is 300"):
        build_datamodule(cfg, _model(ours, 300))


def test_demo_model_has_an_embedding_for_every_id(ours):
    assert model_overrides(ours)["text"]["vocab_size"] == len(ours.tokenizer) == TINY_IDS.vocab_size


def test_add_special_tokens_true_gives_the_reference_ids(ref, ours):
    """processor(text, add_special_tokens=True) and the chat template with it (in text_kwargs too) were refused."""
    texts = ["Tempo?", "<|im_start|>user\nKey of this?<|im_end|>\n"]
    for kw in ({"add_special_tokens": True}, {"text_kwargs": {"add_special_tokens": True}}):
        r, o = ref(text=texts, padding=True, **kw), ours(text=texts, **kw)
        for k in ("input_ids", "attention_mask"):
            assert torch.equal(r[k], o[k]), (kw, k)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Key?"}]}]
    base = {"tokenize": True, "return_dict": True, "add_generation_prompt": True}
    for kw in ({"processor_kwargs": {"add_special_tokens": True}}, {"add_special_tokens": True}):
        r, o = ref.apply_chat_template(conv, **base, **kw), ours.apply_chat_template(conv, **base, **kw)
        assert torch.equal(r["input_ids"], o["input_ids"]), kw


def test_add_special_tokens_true_is_refused_where_the_tokenizer_would_add_a_token(ref_dir, tmp_path):
    """A tokenizer.json whose post-processor adds a BOS: True would give other ids than the chat template's."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    d = tmp_path / "bos"
    shutil.copytree(ref_dir, d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    bos = TINY_IDS.vocab_size - 5  # <|im_start|>
    tok.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    tok.save(str(d / "tokenizer.json"))
    assert json.loads((d / "tokenizer.json").read_text())["post_processor"]
    proc = MusicFlamingoProcessor.from_pretrained(d)
    assert proc.tokenizer.encode("x", add_special_tokens=True)[0] == bos  # it would add one
    assert not proc.adds_no_special_tokens()
    with pytest.raises(ValueError, match=r"add_special_tokens=True is not supported \(False only\)"):
        proc(["Tempo?"], add_special_tokens=True)
    conv = [{"role": "user", "content": [{"type": "text", "text": "Key?"}]}]
    with pytest.raises(ValueError, match=r"add_special_tokens=True is not supported"):
        proc.apply_chat_template(conv, tokenize=True, add_special_tokens=True)
    ids = proc(["Tempo?"], add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == proc.tokenizer.encode("Tempo?")  # False: still taken, nothing added

"""Review round 16, data: training samples cut audio tails with the processor's own hop length.

`ConversationDataset` cut a clip's trailing zero-token tail with the 160-sample hop whatever the processor's
feature extractor used; with a folder's `hop_length=320` a 321-640-sample tail past a window stayed, a window of 0
audio tokens that the reference never builds (and the estimate disagreed with the built sample).
"""

from __future__ import annotations

import json

from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import load_tokenizer


def test_a_tail_of_no_tokens_is_cut_with_the_processors_hop_length(tmp_path):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    p = MusicFlamingoProcessor(tok, chunk_length=1.0, max_audio_len=4.0, n_fft=512, hop_length=320)
    n = 16000 + 500  # 1 s + 500 samples: the tail is 1 frame at hop 320, no audio token
    assert p.usable_samples(n) == 16000
    write_audio(tmp_path / "t.wav", make_tone(440, n / 16000))
    conv = [{"role": "user", "content": "<sound>Q"}, {"role": "assistant", "content": "A"}]
    line = json.dumps({"id": "t", "sound": "t.wav", "conversations": conv})
    (tmp_path / "t.jsonl").write_text(line + "\n", encoding="utf-8")
    ds = ConversationDataset(read_manifest(tmp_path / "t.jsonl"), p)
    s = ds[0]
    assert s["input_features"].shape[0] == 1  # one window, the tail dropped
    assert s["num_audio_tokens"] == p.audio_token_count(16000)
    assert ds.estimate_lengths() == [len(s["input_ids"])]

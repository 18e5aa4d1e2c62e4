"""ConversationDataset: labels, parity with the processor, AF3 == ours, bad samples; collate and its shift convention."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_assets import (
    QWEN2_SPLIT_REGEX,
    SPECIAL_TOKENS,
    TINY_IDS,
    make_tone,
    write_audio,
    write_tiny_tokenizer,
)

from musicflamingo.audio.io import load_audio
from musicflamingo.chat import IGNORE_INDEX, expand_audio_tokens
from musicflamingo.data.collate import collate
from musicflamingo.data.dataset import (
    BadSample,
    BadSampleError,
    BadSampleTracker,
    ConversationDataset,
    TooManyBadSamplesError,
    estimate_num_tokens,
)
from musicflamingo.data.manifest import Message, read_manifest
from musicflamingo.data.sampler import TokenBudgetBatchSampler
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import HFTokenizer, load_tokenizer

_ = IGNORE_INDEX
IM_START, IM_END, NL = TINY_IDS.im_start_id, TINY_IDS.eos_token_id, 198
SOUND, BOS, EOS = TINY_IDS.audio_token_id, TINY_IDS.audio_bos_token_id, TINY_IDS.audio_eos_token_id


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    # 1-s windows keep the log-mel tiny; everything else is the reference processor.
    return MusicFlamingoProcessor(tok, chunk_length=1.0, max_audio_len=4.0)


def _msgs(*pairs):
    return [Message(r, c) for r, c in pairs]


TWO_TURNS = _msgs(
    ("system", "Be brief."),
    ("user", "Tempo?"),
    ("assistant", "96 BPM."),
    ("user", "Key?"),
    ("assistant", "C major."),
)


def test_labels_hand_written_two_turn_example(processor):
    ds = ConversationDataset([], processor)
    ids, labels = ds.encode_conversation(TWO_TURNS, [])
    # <|im_start|>system\nBe brief.<|im_end|>\n
    system = [IM_START, 82, 88, 82, 83, 68, 76, NL, 33, 68, 277, 81, 72, 68, 69, 13, IM_END, NL]
    user1 = [IM_START, 290, 268, NL, 51, 68, 76, 295, 30, IM_END, NL]  # <|im_start|>user\nTempo?<|im_end|>\n
    head = [IM_START, 64, 82, 82, 264, 83, 293, 83, NL]  # <|im_start|>assistant\n
    answer1 = [24, 21, 220, 33, 47, 44, 13, IM_END]  # 96 BPM.<|im_end|>
    user2 = [IM_START, 290, 268, NL, 42, 68, 88, 30, IM_END, NL]  # <|im_start|>user\nKey?<|im_end|>\n
    answer2 = [34, 263, 64, 73, 266, 13, IM_END]  # C major.<|im_end|>
    assert ids == system + user1 + head + answer1 + [NL] + user2 + head + answer2 + [NL]
    expected = (
        [_] * 18 + [_] * 11 + [_] * 9
        + [24, 21, 220, 33, 47, 44, 13, IM_END] + [_]
        + [_] * 10 + [_] * 9
        + [34, 263, 64, 73, 266, 13, IM_END] + [_]
    )  # fmt: skip
    assert labels == expected
    # the reference convention: everything labelled (no audio, no pad here)
    assert (
        ConversationDataset([], processor, train_on_prompt=True).encode_conversation(TWO_TURNS, [])[1] == ids
    )


@pytest.mark.parametrize(
    "messages",
    [
        TWO_TURNS,
        _msgs(("user", "<sound>Describe."), ("assistant", "\nLeading newline, trailing one\n")),
        _msgs(
            ("user", "<sound>  spaced <sound>"),
            ("assistant", "  two spaces"),
            ("user", "é ü"),
            ("assistant", ""),
        ),
        _msgs(("assistant", "starts with the assistant"), ("user", "<sound>"), ("assistant", "ok")),
    ],
)
def test_piecewise_tokenization_equals_whole(processor, messages):
    ds = ConversationDataset([], processor)
    counts = [5, 9][: sum(m.content.count("<sound>") for m in messages)]
    ids, labels = ds.encode_conversation(messages, counts)
    text = processor.render_chat(
        [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=False
    )
    assert ids == processor.tokenizer.encode(expand_audio_tokens(text, counts))
    assert len(labels) == len(ids)
    assert all(lab == IGNORE_INDEX for i, lab in zip(ids, labels) if i in (SOUND, BOS, EOS))
    # every labelled run directly follows an "<|im_start|>assistant\n" header and ends with <|im_end|>
    head = processor.tokenizer.encode("<|im_start|>assistant\n")
    learned = [lab != IGNORE_INDEX for lab in labels]
    starts = [t for t in range(len(ids)) if learned[t] and (t == 0 or not learned[t - 1])]
    ends = [t for t in range(len(ids)) if learned[t] and (t + 1 == len(ids) or not learned[t + 1])]
    assert len(starts) == sum(m.role == "assistant" for m in messages)
    assert all(ids[s - len(head) : s] == head for s in starts)
    assert all(ids[e] == IM_END and ids[e + 1] == NL for e in ends)


def _record_line(rid, audio, convs):
    return json.dumps({"id": rid, "audio": audio, "conversations": convs})


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    write_audio(d / "a.wav", make_tone(440, 1.4))
    write_audio(d / "b.flac", make_tone(660, 2.5))
    return d


def test_ids_and_labels_match_processor_apply_chat_template(processor, clips):
    convs = [
        {"role": "user", "content": "<sound>What is the tempo?"},
        {"role": "assistant", "content": "The tempo is 96."},
        {"role": "user", "content": "<sound>And this one?"},
        {"role": "assistant", "content": "C major."},
    ]
    audio = ["a.wav", {"path": "b.flac", "offset": 0.5, "duration": 1.2}]
    (clips / "m.jsonl").write_text(_record_line("x", audio, convs) + "\n", encoding="utf-8")
    (rec,) = read_manifest(clips / "m.jsonl")
    sample = ConversationDataset([rec], processor, train_on_prompt=True)[0]
    waves = [load_audio(clips / "a.wav"), load_audio(clips / "b.flac", offset=0.5, duration=1.2)]
    ref_conv = [
        {
            "role": m["role"],
            "content": [{"type": "audio", "audio": w}, {"type": "text", "text": m["content"][7:]}],
        }
        if m["role"] == "user"
        else m
        for m, w in zip(convs, [waves[0], None, waves[1], None])
    ]
    ref = processor.apply_chat_template(ref_conv, add_generation_prompt=False, output_labels=True)
    assert sample["input_ids"].tolist() == ref["input_ids"][0].tolist()
    assert (
        sample["labels"].tolist() == ref["labels"][0].tolist()
    )  # train_on_prompt = the reference convention
    assert torch.equal(sample["input_features"], ref["input_features"])
    assert torch.equal(sample["input_features_mask"], ref["input_features_mask"])
    assert sample["input_features"].shape == (4, 128, 100)  # 2 + 2 windows of 1 s
    assert sample["num_audio_tokens"] == int((sample["input_ids"] == SOUND).sum()) > 0
    # assistant-only labels: the same ids, far fewer labels, all inside the answers
    default = ConversationDataset([rec], processor)[0]
    assert torch.equal(default["input_ids"], sample["input_ids"])
    assert processor.decode(default["labels"][default["labels"] != IGNORE_INDEX].tolist(), False) == (
        "The tempo is 96.<|im_end|>C major.<|im_end|>"
    )
    assert estimate_num_tokens(rec, ConversationDataset([rec], processor)) == len(sample["input_ids"])


def test_af3_layout_and_ours_give_identical_batches(processor, clips):
    ours, af3 = [], []
    for i, (clip, q, a) in enumerate([("a.wav", "Tempo?", "96 BPM."), ("b.flac", "Key?", "A minor, slow.")]):
        ours.append(
            {
                "id": f"s{i}",
                "audio": clip,
                "conversations": [
                    {"role": "user", "content": f"<sound>{q}"},
                    {"role": "assistant", "content": a},
                ],
            }
        )
        af3.append(
            {
                "id": f"s{i}",
                "sound": clip,
                "conversations": [{"from": "human", "value": f"<sound>\n{q}"}, {"from": "gpt", "value": a}],
            }
        )
    (clips / "ours.jsonl").write_text("\n".join(json.dumps(r) for r in ours) + "\n", encoding="utf-8")
    (clips / "af3.json").write_text(json.dumps(af3, indent=1), encoding="utf-8")
    batches = []
    for name in ("ours.jsonl", "af3.json"):
        ds = ConversationDataset(read_manifest(clips / name), processor)
        batches.append(collate([ds[0], ds[1]], processor.pad_token_id))
    a, b = batches
    assert a.keys() == b.keys()
    assert [s.rsplit(":", 1)[0] for s in a.pop("sources") + b.pop("sources")] == [
        str(clips / n) for n in ("ours.jsonl", "ours.jsonl", "af3.json", "af3.json")
    ]  # the only difference: where each record is
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    assert a["input_features"].shape[0] == 2 + 3  # 1.4 s -> 2 windows, 2.5 s -> 3 windows


def _write_bad_clips(d):
    write_audio(d / "good.wav", make_tone(440, 0.5))
    sf.write(d / "empty.wav", np.zeros(0, dtype=np.float32), 16000, subtype="FLOAT")
    nan = make_tone(440, 0.5)
    nan[100] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    write_audio(d / "short.wav", make_tone(440, 0.05))
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage" * 10)


def _bad_manifest(d):
    _write_bad_clips(d)
    conv = [{"role": "user", "content": "<sound>Q"}, {"role": "assistant", "content": "A"}]
    text = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    lines = [_record_line(f"r{i}", f"{name}.wav", conv) for i, name in enumerate(
        ["good", "missing", "empty", "nan", "short", "corrupt"])]  # fmt: skip
    lines.append(json.dumps({"id": "text", "conversations": text}))
    (d / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return read_manifest(d / "bad.jsonl")


def test_bad_sample_policy_error_names_id_line_and_reason(processor, tmp_path):
    records = _bad_manifest(tmp_path)
    ds = ConversationDataset(records, processor)
    assert ds[0]["input_ids"].shape[0] > 0 and ds[6]["input_features"].shape == (0, 128, 100)
    reasons = {
        1: "not found",
        2: "empty",
        3: "non-finite",
        4: "shorter than min_audio_seconds",
        5: "cannot decode",
    }
    for i, reason in reasons.items():
        with pytest.raises(BadSampleError) as e:
            ds[i]
        assert f"sample 'r{i}' ({tmp_path / 'bad.jsonl'}:{i + 1})" in str(e.value)
        assert reason in str(e.value)
    long = ConversationDataset(records, processor, max_text_tokens=10)
    with pytest.raises(BadSampleError, match="more than max_text_tokens=10"):
        long[6]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_policy_counts_bad_files_exactly(processor, tmp_path, num_workers):
    records = _bad_manifest(tmp_path)
    ds = ConversationDataset(records, processor, bad_sample_policy="skip")
    assert isinstance(ds[1], BadSample) and ds[1].id == "r1"
    sampler = TokenBudgetBatchSampler(ds.estimate_lengths(), max_tokens=2000, seed=0)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=lambda s: collate(s, processor.pad_token_id),
        multiprocessing_context="fork" if num_workers else None,
    )
    tracker = BadSampleTracker(max_bad_fraction=None)
    good_ids = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for batch in loader:
            tracker.update_from_batch(batch)
            assert "bad_samples" not in batch and batch["input_ids"].shape[0] == len(batch["ids"])
            good_ids += batch["ids"]
    assert sorted(good_ids) == ["r0", "r0", "text", "text"]
    assert (tracker.num_seen, tracker.num_bad) == (14, 10)
    assert sorted(b.id for b in tracker.bad.values()) == ["r1", "r2", "r3", "r4", "r5"]
    tracker.write_jsonl(tmp_path / "bad_samples.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "bad_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {"index", "id", "source", "reason"} == set(rows[0])
    strict = BadSampleTracker(max_bad_fraction=0.5, min_seen=1)
    with pytest.raises(TooManyBadSamplesError, match=r"5 of 7 samples were skipped"):
        strict.update(7, list(tracker.bad.values()))


def test_zero_token_tail_is_trimmed(processor, tmp_path):
    # 1 s + 200 samples: the 200-sample tail would be a window of 0 audio tokens (reference RoTE quirk)
    write_audio(tmp_path / "t.wav", make_tone(440, 1.0 + 200 / 16000))
    conv = [{"role": "user", "content": "<sound>Q"}, {"role": "assistant", "content": "A"}]
    (tmp_path / "t.jsonl").write_text(_record_line("t", "t.wav", conv) + "\n", encoding="utf-8")
    ds = ConversationDataset(read_manifest(tmp_path / "t.jsonl"), processor)
    s = ds[0]
    assert s["input_features"].shape[0] == 1 and s["num_audio_tokens"] == processor.audio_token_count(16000)
    assert ds.estimate_lengths() == [len(s["input_ids"])]


def test_newline_merged_with_header_is_not_learned(tmp_path):
    """With a BPE that merges "\\n\\n", an answer starting with "\\n" shares a token with the header."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=270, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["assistant\n\nok fine\n\n"] * 50, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    proc = MusicFlamingoProcessor(HFTokenizer(tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    msgs = _msgs(("system", "s"), ("user", "q"), ("assistant", "\nok"))
    ids, labels = ConversationDataset([], proc).encode_conversation(msgs, [])
    text = proc.render_chat(
        [{"role": m.role, "content": m.content} for m in msgs], add_generation_prompt=False
    )
    assert ids == proc.tokenizer.encode(text)
    nn = proc.tokenizer.encode("\n\n")
    assert len(nn) == 1 and nn[0] in ids
    learned = [proc.tokenizer.decode([i], False) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert "".join(learned) == "ok<|im_end|>"


def test_collate_shift_convention_hand_example():
    a = {
        "input_ids": torch.tensor([5, 6, 7]),
        "labels": torch.tensor([_, 6, 7]),
        "id": "a",
        "num_audio_tokens": 0,
    }
    b = {
        "input_ids": torch.tensor([5, 8]),
        "labels": torch.tensor([_, 8]),
        "input_features": torch.ones(2, 128, 10),
        "input_features_mask": torch.ones(2, 10, dtype=torch.int32),
        "id": "b",
        "num_audio_tokens": 3,
    }
    c = {
        **b,
        "id": "c",
        "input_features": torch.full((1, 128, 10), 2.0),
        "input_features_mask": torch.ones(1, 10, dtype=torch.int32),
    }
    batch = collate([a, None, b, c], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0], [5, 8, 0]]
    assert batch["labels"].tolist() == [[_, 6, 7], [_, 8, _], [_, 8, _]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 0]]
    assert batch["lengths"].tolist() == [3, 2, 2] and batch["num_tokens"] == 7 and batch["num_samples"] == 4
    assert batch["input_features"][:, 0, 0].tolist() == [1.0, 1.0, 2.0]  # windows in sample order
    assert batch["ids"] == ["a", "b", "c"] and batch["num_audio_tokens"].tolist() == [0, 3, 3]
    # logits that put all mass on the NEXT token from each position: the shifted loss is ~0, unshifted is not
    vocab = 10
    logits = torch.full((3, 3, vocab), -30.0)
    for r, row in enumerate(batch["input_ids"].tolist()):
        for t in range(len(row) - 1):
            logits[r, t, row[t + 1]] = 30.0
    ce = torch.nn.functional.cross_entropy
    shifted = ce(logits[:, :-1].reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1), ignore_index=_)
    unshifted = ce(logits.reshape(-1, vocab), batch["labels"].reshape(-1), ignore_index=_)
    assert shifted < 1e-6 < 1.0 < unshifted
    left = collate([a, b], pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert left["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 5, 8]]
    assert left["labels"].tolist() == [[_, _, 6, 7], [_, _, _, 8]]
    text_only = collate([a], pad_token_id=0)
    assert text_only["input_features"] is None and text_only["input_features_mask"] is None


@pytest.mark.parametrize("min_audio_seconds", [0.0, 0.01])
def test_audio_too_short_for_one_token_is_a_bad_sample(processor, tmp_path, min_audio_seconds):
    """A clip of <= 320 samples (allowed by a min_audio_seconds below 0.02) gives 0 audio tokens but one encoder
    window: RoTE then puts the window's timestamps on the next audio (IndexError for the last). It is a bad sample
    whatever min_audio_seconds is, second audio of a record included."""
    write_audio(tmp_path / "long.wav", make_tone(440, 1.0))
    write_audio(tmp_path / "tiny.wav", make_tone(440, 0.015))  # 240 samples
    conv = [
        {"role": "user", "content": "<sound>Compare with <sound>."},
        {"role": "assistant", "content": "A"},
    ]
    line = json.dumps({"id": "two", "audio": ["long.wav", "tiny.wav"], "conversations": conv})
    (tmp_path / "t.jsonl").write_text(line + "\n", encoding="utf-8")
    records = read_manifest(tmp_path / "t.jsonl")
    strict = ConversationDataset(records, processor, min_audio_seconds=min_audio_seconds)
    with pytest.raises(BadSampleError, match=r"tiny.wav: audio lasts 0.015 s \(240 samples\), too short"):
        strict[0]
    skip = ConversationDataset(
        records, processor, min_audio_seconds=min_audio_seconds, bad_sample_policy="skip"
    )
    assert isinstance(skip[0], BadSample) and skip[0].id == "two"

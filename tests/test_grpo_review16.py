"""GRPO review 16: model.tasks as the data module's record filter (an over-budget record it drops is never refused),
micro-batches smaller than a group, and think answers ended by a `</answer>` stop string."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_grpo import SHORT, _net, _rewrite, _weights
from train_fixtures import ANSWERS, compose_train, grpo_module, write_dataset, write_processor

from musicflamingo import grpo
from musicflamingo.grpo import GRPOLit, Prompt
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.reasoning import parse_think, think_report
from musicflamingo.rewards import FormatReward, Target
from musicflamingo.training import train

LONG = " ".join(["la"] * 900)  # ~900 tokens: more than data.batch_max_tokens=800


def _mixed_tasks_one_long(tmp_path, n: int = 8):  # noqa: ANN001, ANN202
    """n tone records: even ones multiple choice (task mcq), odd ones task 'other', record 1 longer than 800 tokens."""

    def change(i, r):  # noqa: ANN001, ANN202
        if i % 2 == 0:
            r.update(task="mcq", choices=ANSWERS)
        else:
            r.update(task="other")
        if i == 1:
            r["conversations"][0]["content"] += " " + LONG

    return _rewrite(write_dataset(tmp_path / "data", n=n), change)


# ---------------------------------------------------------------------------------------------- record filter
def test_the_data_module_applies_a_record_filter_before_batching(tmp_path):
    """The data module takes a record filter and applies it when it builds its datasets: lengths, the token budget's
    bad samples, batches and fingerprints count the kept records; a record left out is never refused as too long
    (bad_sample_policy=error used to stop at setup on a record model.tasks drops)."""
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    proc = write_processor(tmp_path / "proc")
    manifest = _mixed_tasks_one_long(tmp_path)
    keep = grpo.TaskFilter(frozenset({"mcq"}))
    dm = MusicFlamingoDataModule(str(manifest), processor=str(proc), batch_max_tokens=800, record_filter=keep)
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.train_sampler.lengths) == 4
    records = dm.train_dataset.datasets[0].records
    assert [r.id for r in records] == ["c0", "c2", "c4", "c6"]
    assert len(records.digests) == 4  # the DDP ranks compare every kept record
    unfiltered = MusicFlamingoDataModule(str(manifest), processor=str(proc), batch_max_tokens=800)
    with pytest.raises(ValueError, match=r"'c1'.*more than data.batch_max_tokens=800"):
        unfiltered.setup("fit")


def test_an_over_budget_record_the_task_filter_drops_does_not_stop_the_run(tmp_path):
    """train.py with model.tasks=[mcq]: the data module takes the filter from the GRPO module at its setup, so the
    'other' record longer than the token budget never reaches the bad-sample check (it stopped the run at setup)."""
    proc = write_processor(tmp_path / "proc")
    manifest = _mixed_tasks_one_long(tmp_path)
    overrides = [
        "experiment=grpo",
        "model.rewards.format=null",
        "model.think=false",
        "model.tasks=[mcq]",
        "model.rollout.group_size=2",
        "model.rollout.max_new_tokens=2",
        "data.batch_max_tokens=800",
        "trainer.max_steps=1",
        "export=false",
    ]
    _, obj = train(compose_train(tmp_path, manifest, proc, overrides))
    dm = obj["datamodule"]
    assert obj["trainer"].global_step == 1
    assert dm.record_filter == grpo.TaskFilter(frozenset({"mcq"}))
    assert len(dm.train_dataset) == 4 and obj["trainer"].num_training_batches == 2
    assert dm.train_bad_samples.num_bad == 0


# ---------------------------------------------------------------------------------------------- micro-batches
def test_micro_batches_smaller_than_a_group_split_it_and_match_whole_groups(tmp_path, monkeypatch):
    """micro_batch_size=3 with group_size=4 ran each micro-batch with a whole group (4 completions, more than asked:
    the memory bound did not hold). Each group is now split into pieces of at most 3 completions, and the weights
    after a step (plain SGD: Adam's first step is the gradient's sign) equal those of one micro-batch (the loss is a
    sum over tokens)."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=2)
    sizes: list[int] = []
    logprobs = GRPOLit.sequence_logprobs

    def recording(self, model, prompts, completions, *args):  # noqa: ANN001, ANN202
        if torch.is_grad_enabled():  # the policy's pass (the reference's runs without gradients)
            sizes.append(len(completions))
        return logprobs(self, model, prompts, completions, *args)

    monkeypatch.setattr(GRPOLit, "sequence_logprobs", recording)
    common = [
        "experiment=grpo",
        SHORT,
        "model.rollout.group_size=4",
        "model.rollout.max_new_tokens=4",
        "model.optimizer._target_=torch.optim.SGD",
        "~model.optimizer.betas",
        "~model.optimizer.eps",
        "model.optimizer.lr=1.0",
        "model.loss.max_grad_norm=null",
        "data.batch_max_tokens=800",
        "trainer.max_steps=1",
        "export=false",
    ]
    _, small = train(
        compose_train(tmp_path / "a", manifest, proc, common + ["model.loss.micro_batch_size=3"])
    )
    assert sizes and max(sizes) <= 3 and 1 in sizes  # 4 = 3 + 1
    sizes.clear()
    _, whole = train(
        compose_train(tmp_path / "b", manifest, proc, common + ["model.loss.micro_batch_size=8"])
    )
    assert max(sizes) >= 4  # whole groups
    wa, wb = _weights(small["model"].model), _weights(whole["model"].model)
    assert any("lora_B" in k and wa[k].abs().sum() > 1e-3 for k in wa)  # the adapters did train
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k


# ---------------------------------------------------------------------------------------------- stop strings
def test_a_think_answer_ended_by_the_answer_close_stop_string_parses_as_complete():
    cut = "<think>the bass holds C</think><answer>C major"
    assert parse_think(cut).status == "broken"
    done = parse_think(cut, stop="</answer>")
    assert (done.status, done.thinking, done.answer, done.text) == ("ok", "the bass holds C", "C major", cut)
    # a stop string that does not complete the layout leaves the parse as it is
    assert parse_think(cut, stop="<|im_end|>").status == "broken"
    assert parse_think("<think>still thinking", stop="</think>").status == "broken"
    answers, rows, summary = think_report({"a": cut, "b": cut}, stops={"a": "</answer>"})
    assert rows["a"]["think_status"] == "ok" and rows["b"]["think_status"] == "broken"
    assert answers == {"a": "C major", "b": "C major"} and (summary["ok"], summary["broken"]) == (1, 1)


def test_rollouts_ended_by_an_answer_close_stop_string_are_well_formed(tmp_path):
    """generation_config.json stop_strings ["</answer>"]: the rollout's scored text is cut before `</answer>`, so
    every think completion parsed as broken and the format reward was 0 for all of them (nothing to learn)."""
    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    tok = processor.tokenizer
    lit = grpo_module(_net(lora=True), think=True, rewards={"format": FormatReward()})
    lit._trainer = SimpleNamespace(datamodule=SimpleNamespace(processor=processor), strategy=None)
    lit.model.generation_defaults = {**lit.model.generation_defaults, "stop_strings": ["</answer>"]}
    prompts = [Prompt("p0", [1, 2, 3], Target("qa", "qa", "C major"), slice(0, 0))]
    ended = tok.encode("<think>the bass holds C</think><answer>C major</answer>")
    truncated = tok.encode("<think>the bass holds C</think><answer>C maj")
    roll = lit.score(prompts, [[ended, truncated]])
    done, cut = roll.outputs[0]
    assert "</answer>" not in done.text and done.status == "ok" and done.answer == "C major"
    assert cut.status == "broken"  # the token limit ended it: not complete
    assert roll.rewards.tolist() == [[1.0, 0.0]] and roll.truncated == 1


# ---------------------------------------------------------------------------------------------- reward config
def test_rewards_that_all_weigh_zero_are_refused():
    """model.rewards.<each>.weight=0 ran: every reward 0, every group tied, nothing learnt, silently."""
    from musicflamingo.rewards import AccuracyReward

    with pytest.raises(
        grpo.GRPOConfigError, match=r"every weight is 0 \(format.weight=0, accuracy.weight=0\)"
    ):
        grpo_module(_net(lora=True), rewards={"format": FormatReward(0.0), "accuracy": AccuracyReward(0)})
    grpo_module(_net(lora=True), rewards={"format": FormatReward(0.0), "accuracy": AccuracyReward(-1.0)})


def test_rewards_that_apply_to_no_training_record_are_said_at_start(tmp_path, caplog):
    """Questions only, the caption facts reward alone: every reward None, so every completion's reward 0 and no
    step learns anything (no word of it)."""
    from test_grpo import _attach_manifests

    from musicflamingo.rewards import AccuracyReward, CaptionFactsReward

    manifest = write_dataset(tmp_path / "data")
    lit = _attach_manifests(
        grpo_module(_net(lora=True), think=False, rewards={"facts": CaptionFactsReward()}), manifest
    )
    with caplog.at_level("WARNING", logger="musicflamingo.grpo"):
        lit._record_table("train")
    warned = [
        r.getMessage() for r in caplog.records if "apply to none of the training records" in r.getMessage()
    ]
    assert len(warned) == 1 and "facts apply" in warned[0] and "4 question(s), 0 caption(s)" in warned[0]
    caplog.clear()
    lit = _attach_manifests(
        grpo_module(_net(lora=True), think=False, rewards={"accuracy": AccuracyReward()}), manifest
    )
    with caplog.at_level("WARNING", logger="musicflamingo.grpo"):
        lit._record_table("train")
    assert not [r for r in caplog.records if "apply to none" in r.getMessage()]

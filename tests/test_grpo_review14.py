"""GRPO review 14: model.tasks applied before batching, think-layout records under model.think=false, a NaN reward
named with its record, and the logged metrics against a hand computation."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from test_grpo import _attach_manifests, _metrics, _net, _rewrite
from train_fixtures import ANSWERS, compose_train, grpo_module, write_dataset, write_processor

from musicflamingo.chat import THINK_SUFFIX
from musicflamingo.data.manifest import read_manifest
from musicflamingo.grpo import GRPOConfigError, GRPOLit, Prompt
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.rewards import AccuracyReward, Target
from musicflamingo.training import train


def _mixed_tasks(tmp_path, n: int = 8):  # noqa: ANN001, ANN202
    """n tone records: even ones multiple choice (task mcq), odd ones task 'other'."""
    return _rewrite(
        write_dataset(tmp_path / "data", n=n),
        lambda i, r: r.update(task="mcq", choices=ANSWERS) if i % 2 == 0 else r.update(task="other"),
    )


def test_tasks_are_kept_before_batching(tmp_path, monkeypatch):
    """model.tasks=[mcq] on 8 records (4 mcq), batches of 2 records (data.batch_max_tokens=800, ~370 tokens each):
    the filter used to drop the other task's records from each batch after decoding them (a step had 0-2 prompts
    where the budget holds 2, and an epoch was 4 batches of the 8 records); now every step has 2 mcq prompts and an
    epoch is the 4 mcq records."""
    proc = write_processor(tmp_path / "proc")
    manifest = _mixed_tasks(tmp_path)
    seen: list[list[str]] = []
    score = GRPOLit.score

    def recording(self, prompts, completions):  # noqa: ANN001, ANN202
        seen.append([p.target.task for p in prompts])
        return score(self, prompts, completions)

    monkeypatch.setattr(GRPOLit, "score", recording)
    overrides = [
        "experiment=grpo",
        "model.rewards.format=null",
        "model.think=false",
        "model.tasks=[mcq]",
        "model.rollout.group_size=2",
        "model.rollout.max_new_tokens=2",
        "model.loss.micro_batch_size=4",
        "data.batch_max_tokens=800",
        "trainer.max_steps=2",
        "export=false",
    ]
    _, obj = train(compose_train(tmp_path, manifest, proc, overrides))
    dm = obj["datamodule"]
    assert seen == [["mcq", "mcq"], ["mcq", "mcq"]]
    assert len(dm.train_dataset) == 4 and len(dm.train_sampler.lengths) == 4
    assert obj["trainer"].num_training_batches == 2
    assert all(rec.extra["task"] == "mcq" for ds in dm.train_dataset.datasets for rec in ds.records)


def test_tasks_that_keep_no_validation_record_are_refused(tmp_path):
    """A validation manifest of other tasks gave no val/reward at all, silently: refused naming its tasks."""
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    proc = write_processor(tmp_path / "proc")
    train_manifest = _mixed_tasks(tmp_path)
    val = _rewrite(write_dataset(tmp_path / "val", n=2), lambda i, r: r.update(task="other"))
    dm = MusicFlamingoDataModule(
        str(train_manifest), val=str(val), processor=str(proc), batch_max_tokens=4096
    )
    dm.setup("fit")
    lit = grpo_module(_net(lora=True), think=False, rewards={"accuracy": AccuracyReward()}, tasks=["mcq"])
    lit._trainer = SimpleNamespace(datamodule=dm, strategy=None)
    with pytest.raises(
        GRPOConfigError, match=r"keeps no record of the data.val manifests \(their tasks: other, qa\)"
    ):
        lit.setup("fit")
    assert len(dm.train_dataset) == 4  # the training split was applied first


def _think_batch(tmp_path, lit):  # noqa: ANN001, ANN202
    """One MF-Think record (the suffix in its question, its answer in the layout) as a batch for `lit`."""
    from musicflamingo.data.collate import collate
    from musicflamingo.data.dataset import ConversationDataset

    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))

    def to_think(i, r):  # noqa: ANN001, ANN202
        r["conversations"][0]["content"] += "\n" + THINK_SUFFIX
        r["conversations"][1]["content"] = f"<think>it hums</think><answer>{ANSWERS[i % 4]}</answer>"

    manifest = _rewrite(write_dataset(tmp_path / "data", n=2), to_think)
    _attach_manifests(lit, manifest)
    lit._processor = lambda: processor
    records = read_manifest(manifest)
    batch = collate([ConversationDataset(records, processor)[i] for i in range(len(records))], 297, "left")
    return processor, batch


def test_think_layout_records_without_think_mode_score_the_answer(tmp_path, caplog):
    """model.think=false over records whose own question carries the think suffix: the prompt asks for the layout,
    and a completion `<think>..</think><answer>a low hum</answer>` was scored as a whole (its reasoning in the
    answer: accuracy 0). Its <answer> text is scored now (as eval.py think=true does); a completion without tags is
    still all answer; the records are counted at fit start."""
    lit = grpo_module(_net(lora=True), think=False, rewards={"accuracy": AccuracyReward()})
    processor, batch = _think_batch(tmp_path, lit)
    prompts = lit.batch_prompts(batch)
    tok = processor.tokenizer
    texts = [
        "<think>a low hum or a bright tone</think><answer>a low hum</answer>",  # right answer, reasoning names others
        "<think>a low hum?</think><answer>a bright tone</answer>",  # wrong answer, reasoning names the right one
        "a low hum",  # no tags: all answer
    ]
    group = [tok.encode(t) for t in texts]
    roll = lit.score(prompts[:1], [group])
    assert [o.answer for o in roll.outputs[0]] == ["a low hum", "a bright tone", "a low hum"]
    assert roll.components["accuracy"] == [1.0, 0.0, 1.0]
    lit._records.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.grpo"):
        lit._record_table("train")
    assert "2 record(s) ask for the think layout" in caplog.text
    # a prompt without the suffix stays all answer under model.think=false
    plain = grpo_module(_net(lora=True), think=False, rewards={"accuracy": AccuracyReward()})
    assert not plain.asks_think(read_manifest(write_dataset(tmp_path / "plain", n=1))[0])


class NaNForSecond:
    """NaN for the completions of the second record (train.jsonl:2), 1/(1+len) elsewhere."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, output, target) -> float:  # noqa: ANN001
        return float("nan") if target.answer == ANSWERS[1] else 1.0 / (1.0 + len(output.text))


def test_a_nan_reward_is_named_with_its_reward_and_record(tmp_path):
    """A reward returning NaN stopped the run with "GRPO loss is nan ... records [...]" (the micro-batch's records,
    not the reward): the error names the reward and the record whose completion it scored."""
    stops_naming_the_reward(tmp_path, "test_grpo_review14.NaNForSecond", "nan")


def stops_naming_the_reward(tmp_path, reward: str, value: str) -> None:  # noqa: ANN001
    """A one-step GRPO run whose only reward is `reward` (a class path, non-finite for record c1) stops with
    NonFiniteLossError naming the reward, `value` and the record."""
    from musicflamingo.lit import NonFiniteLossError

    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=2)
    overrides = [
        "experiment=grpo",
        "model.rewards.format=null",
        "model.rewards.accuracy=null",
        f"+model.rewards.mine={{_target_:{reward},weight:1.0}}",
        "model.think=false",
        "model.rollout.group_size=2",
        "model.rollout.max_new_tokens=2",
        "trainer.max_steps=1",
        "export=false",
    ]
    with pytest.raises(
        NonFiniteLossError, match=rf"model.rewards.mine returned {value} for record 'c1' \(.*train.jsonl:2\)"
    ):
        train(compose_train(tmp_path, manifest, proc, overrides))


class SaysBright:
    """1 when the completion says "bright"."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, output, target) -> float:  # noqa: ANN001
        return float("bright" in output.text)


def test_logged_metrics_equal_a_hand_computation(tmp_path, monkeypatch):
    """One step on fixed rollouts (generation replaced): two prompts of three completions, one group tied. Every
    logged metric against its hand computation: rewards, lengths (stop token included), truncated share, tied
    groups and their reward std, and the loss, which at step 0 (fresh adapters: KL 0, ratio 1) is minus the token-weighted mean advantage
    of the group that is not tied."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=2)
    tok = MusicFlamingoProcessor.from_pretrained(proc).tokenizer
    texts = {
        ANSWERS[0]: [("a bright tone", True), ("a low hum", True), ("a bright", False)],  # rewards 1, 0, 1
        ANSWERS[1]: [("a low hum", True), ("hum", True), ("a low", False)],  # 0, 0, 0: tied
    }

    def fixed(self, prompts, features, mask, group_size, params, generator):  # noqa: ANN001, ANN202
        eos = self._stop_ids()[0]
        return [
            [tok.encode(t) + ([eos] if stop else []) for t, stop in texts[p.target.answer]] for p in prompts
        ]

    monkeypatch.setattr(GRPOLit, "generate", fixed)
    overrides = [
        "experiment=grpo",
        "model.rewards.format=null",
        "model.rewards.accuracy=null",
        "+model.rewards.bright={_target_:test_grpo_review14.SaysBright,weight:2.0}",
        "model.think=false",
        "model.rollout.group_size=3",
        "model.rollout.max_new_tokens=16",
        "trainer.max_steps=1",
        "trainer.log_every_n_steps=1",
        "export=false",
    ]
    train(compose_train(tmp_path, manifest, proc, overrides))
    row = next(r for r in _metrics(tmp_path / "run") if "train/reward" in r)
    lengths = {a: [len(tok.encode(t)) + stop for t, stop in g] for a, g in texts.items()}
    everything = [n for g in lengths.values() for n in g]
    assert float(row["train/reward"]) == pytest.approx(2.0 * 2 / 6)  # weighted sum, mean over the 6
    assert float(row["train/reward/bright"]) == pytest.approx(2 / 6)  # the reward's own value
    assert float(row["train/completion_length"]) == pytest.approx(sum(everything) / 6)
    assert float(row["train/truncated"]) == pytest.approx(2 / 6)
    assert float(row["train/zero_variance_groups"]) == pytest.approx(1 / 2)
    r = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64)
    # the mean over the two groups of each one's sample std (the tied group's is 0)
    assert float(row["train/reward_std"]) == pytest.approx(float(r.std()) / 2)
    adv = (r - r.mean()) / (r.std() + 1e-4)
    n = torch.tensor(lengths[ANSWERS[0]], dtype=torch.float64)
    assert float(row["train/loss"]) == pytest.approx(float(-(adv * n).sum() / n.sum()), abs=1e-5)
    assert float(row["train/kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(row["train/clip_fraction"]) == 0.0
    assert float(row["train/optimizer_step"]) == 1.0


class NaNWeight(SaysBright):
    weight = float("nan")

    def __init__(self) -> None:
        pass


def test_a_reward_weight_that_is_no_finite_number_is_refused_naming_the_reward():
    """`model.rewards.format.weight=null` said only "a reward weight must be a number"; a NaN weight (`.nan`, or a
    reward of one's own) was taken, and every reward and loss was NaN."""
    from musicflamingo.rewards import CaptionFactsReward, FormatReward

    with pytest.raises(ValueError, match=r"FormatReward weight \(model.rewards.<name>.weight\) .* got None"):
        FormatReward(weight=None)
    with pytest.raises(ValueError, match=r"CaptionFactsReward weight .* finite number, got nan"):
        CaptionFactsReward(weight=float("nan"))
    with pytest.raises(GRPOConfigError, match=r"model.rewards.mine.weight=nan: expected a finite number"):
        grpo_module(_net(lora=True), think=False, rewards={"mine": NaNWeight()})


class NaNOnSecondBatch:
    """NaN for every completion of the second batch scored (calls 5-8: two records, groups of 2), 1/(1+len)
    elsewhere."""

    calls = 0

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, output, target) -> float:  # noqa: ANN001
        NaNOnSecondBatch.calls += 1
        return float("nan") if 5 <= NaNOnSecondBatch.calls <= 8 else 1.0 / (1.0 + len(output.text))


def test_a_skipped_batch_logs_no_throughput_of_its_own(tmp_path):
    """model.nonfinite_loss=skip: the skipped batch's row carried the previous batch's train/samples_per_s (the
    value was kept from the last step that finished); it has none now, and the warning names the reward."""
    NaNOnSecondBatch.calls = 0
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=2)
    overrides = [
        "experiment=grpo",
        "model.rewards.format=null",
        "model.rewards.accuracy=null",
        "+model.rewards.mine={_target_:test_grpo_review14.NaNOnSecondBatch,weight:1.0}",
        "model.think=false",
        "model.nonfinite_loss=skip",
        "model.rollout.group_size=2",
        "model.rollout.max_new_tokens=2",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "export=false",
    ]
    _, obj = train(compose_train(tmp_path, manifest, proc, overrides))
    assert obj["trainer"].global_step == 2
    rows = _metrics(tmp_path / "run")
    skipped = [r for r in rows if "train/nonfinite_steps" in r]
    assert len(skipped) == 1 and "train/reward" not in skipped[0]
    assert "train/samples_per_s" not in skipped[0], skipped[0]
    assert sum("train/samples_per_s" in r for r in rows) == 2  # the two batches that stepped


def test_a_resume_under_another_task_filter_names_model_tasks(tmp_path):
    """The epochs are the records model.tasks keeps: a resume under another filter is refused naming it (the
    sampler's record count differs; the message named data.train alone)."""
    from musicflamingo.lit import CheckpointMismatchError

    proc = write_processor(tmp_path / "proc")
    manifest = _mixed_tasks(tmp_path, n=4)
    common = [
        "experiment=grpo",
        "model.rewards.format=null",
        "model.think=false",
        "model.rollout.group_size=2",
        "model.rollout.max_new_tokens=2",
        "data.batch_max_tokens=800",
        "export=false",
    ]
    train(compose_train(tmp_path, manifest, proc, common + ["model.tasks=[mcq]", "trainer.max_steps=1"]))
    with pytest.raises(
        CheckpointMismatchError, match=r"written with 2 training samples .*model.tasks\), .* give 4"
    ):
        train(compose_train(tmp_path, manifest, proc, common + ["model.tasks=null", "trainer.max_steps=2"]))


def test_rollouts_end_at_generation_config_stop_strings_and_are_scored_cut(tmp_path):
    """generation_config.json's stop_strings end infer.py's, eval.py's and serve.py's answers, but rollouts ran past
    them (no tokenizer in the engine) and were scored on the whole text: rewards for answers inference never gives.
    A rollout now ends at the token that completes the stop string, its scored text is cut before it, and it does not
    count as truncated."""
    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    tok = processor.tokenizer
    lit = grpo_module(_net(lora=True), think=False, rewards={"accuracy": AccuracyReward()})
    lit._trainer = SimpleNamespace(datamodule=SimpleNamespace(processor=processor), strategy=None)
    lit.max_new_tokens = 12
    g = torch.Generator().manual_seed(3)
    prompts = [
        Prompt("p0", torch.randint(0, 290, (6,), generator=g).tolist(), Target("qa", "qa", "x"), slice(0, 0))
    ]

    free = lit.generate(prompts, None, None, 1, lit.rollout_params(sample=False), None)[0][0]
    assert len(free) == 12 and not set(free) & set(lit._stop_ids())
    assert lit.score(prompts, [[free]]).truncated == 1
    full = tok.decode(free)
    # two characters of the text (no piece of a multi-byte one) past its start, and the token that completes them
    at = next(
        i for i in range(1, len(full) - 1) if "\ufffd" not in full[i : i + 2] and full[i : i + 2].strip()
    )
    stop = full[at : at + 2]
    completes = next(n for n in range(1, 13) if stop in tok.decode(free[:n]))
    assert completes < 12

    lit.model.generation_defaults = {**lit.model.generation_defaults, "stop_strings": [stop]}
    params = lit.rollout_params(sample=False)
    assert params.stop_strings == (stop,) and lit.rollout_params(sample=True).stop_strings == (stop,)
    stopped = lit.generate(prompts, None, None, 1, params, None)[0][0]
    assert stopped == free[:completes]
    roll = lit.score(prompts, [[stopped]])
    assert roll.outputs[0][0].text == full[: full.index(stop)] and stop not in roll.outputs[0][0].text
    assert roll.truncated == 0

    lit.model.generation_defaults["stop_strings"] = [""]
    with pytest.raises(GRPOConfigError, match="generation_config.json"):
        lit.rollout_params(sample=True)

"""GRPO review 17: the record table follows the data module's datasets (a module reused over a rebuilt data module),
a group of infinite rewards is a non-finite loss (not a silent tie), and model.seed is checked when the module is
made."""

from __future__ import annotations

import math

import pytest
import torch
from test_grpo import _attach_manifests, _net, _rewrite
from train_fixtures import ANSWERS, grpo_module, write_dataset, write_processor

from musicflamingo.data.collate import collate
from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest
from musicflamingo.grpo import GRPOConfigError, group_advantages
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.rewards import AccuracyReward


# ---------------------------------------------------------------------------------------------- the record table
def _batch(records, processor):  # noqa: ANN001, ANN202
    return collate([ConversationDataset(records, processor)[i] for i in range(len(records))], 297, "left")


def test_a_module_reused_over_a_rebuilt_data_module_reads_the_new_records(tmp_path):
    """The table of records by source was built once per split and kept for good: a module fitted again over another
    data module (a notebook's second trainer.fit) looked the new batch's records up in the old table ("batch record
    ... is not in the train manifests"), and never checked the new records' reward fields."""
    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    first = write_dataset(tmp_path / "first", n=2)
    second = _rewrite(
        write_dataset(tmp_path / "second", n=2),
        lambda i, r: r["conversations"][1].update(content=ANSWERS[3 - i]),
    )
    lit = grpo_module(_net(lora=True), think=False, rewards={"accuracy": AccuracyReward()})
    lit._processor = lambda: processor
    _attach_manifests(lit, first)
    assert [p.target.answer for p in lit.batch_prompts(_batch(read_manifest(first), processor))] == ANSWERS[
        :2
    ]
    _attach_manifests(lit, second)  # a rebuilt data module: other dataset objects
    prompts = lit.batch_prompts(_batch(read_manifest(second), processor))
    assert [p.target.answer for p in prompts] == [ANSWERS[3], ANSWERS[2]]
    assert all(p.source.startswith(str(second)) for p in prompts)


def test_a_rebuilt_data_module_of_the_same_sources_gives_its_own_targets(tmp_path):
    """Records held in memory (a plain list: nothing re-reads the file) under the same `file:line` sources as before,
    their answers corrected: the kept table handed the batch the old answers, silently, so the accuracy reward
    scored against labels the data no longer has."""
    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    manifest = write_dataset(tmp_path / "data", n=2)
    before = list(read_manifest(manifest))
    lit = grpo_module(_net(lora=True), think=False, rewards={"accuracy": AccuracyReward()})
    lit._processor = lambda: processor
    _attach_manifests(lit, manifest)
    lit._trainer.datamodule.train_dataset.datasets[0].records = before
    assert [p.target.answer for p in lit.batch_prompts(_batch(before, processor))] == ANSWERS[:2]
    _rewrite(manifest, lambda i, r: r["conversations"][1].update(content=ANSWERS[2 + i]))
    after = list(read_manifest(manifest))
    assert [r.source for r in after] == [r.source for r in before]
    _attach_manifests(lit, manifest)
    lit._trainer.datamodule.train_dataset.datasets[0].records = after
    assert [p.target.answer for p in lit.batch_prompts(_batch(after, processor))] == ANSWERS[2:4]


def test_the_record_table_is_kept_while_the_dataset_is_the_same(tmp_path):
    """Built once per dataset: every batch of a fit looks its records up without scanning the split again."""
    manifest = write_dataset(tmp_path / "data", n=2)
    lit = _attach_manifests(grpo_module(_net(lora=True)), manifest)
    table = lit._record_table("train")
    assert lit._record_table("train") is table


# ---------------------------------------------------------------------------------------------- advantages
def test_a_group_of_infinite_rewards_is_not_a_tie():
    """Equal infinite rewards compared equal, so their group was flagged as having nothing to teach and left out of
    the loss: the step went on with finite numbers, model.nonfinite_loss never saw the broken reward. Such a group's
    advantages are NaN now (as a NaN reward's are); a group of equal finite rewards still ties."""
    inf = math.inf
    rewards = torch.tensor(
        [[inf, inf], [-inf, -inf], [inf, 0.0], [1.0, 1.0], [0.0, 1.0], [math.nan, math.nan]]
    )
    adv, zero = group_advantages(rewards)
    assert zero.tolist() == [False, False, False, True, False, False]
    assert torch.isnan(adv[[0, 1, 2, 5]]).all()
    assert adv[3].tolist() == [0.0, 0.0]
    assert adv[4].tolist() == pytest.approx([-0.70705, 0.70705], abs=1e-4)


class InfiniteForSecond:
    """+inf for every completion of the second record (train.jsonl:2), 1/(1+len) elsewhere."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, output, target) -> float:  # noqa: ANN001
        return math.inf if target.answer == ANSWERS[1] else 1.0 / (1.0 + len(output.text))


def test_an_infinite_reward_stops_the_run_naming_the_reward(tmp_path):
    """A reward returning inf for a whole group: the group tied, was left out, the run trained on and logged
    train/reward inf. Under nonfinite_loss=stop it stops now, naming the reward and the record (as for NaN)."""
    from test_grpo_review14 import stops_naming_the_reward

    stops_naming_the_reward(tmp_path, "test_grpo_review17.InfiniteForSecond", "inf")


# ---------------------------------------------------------------------------------------------- the seed
@pytest.mark.parametrize("seed", [None, -1, 1.5, True])
def test_a_rollout_seed_that_cannot_seed_is_refused_naming_model_seed(seed):
    """`seed=null` (train.py's seed_everything takes it: a random seed) made GRPOLit's int(None) a bare TypeError
    inside Hydra's instantiation; a negative seed passed and failed in numpy at the first rollout, after the model
    and data were set up."""
    with pytest.raises(GRPOConfigError, match=r"model.seed=.*expected an integer >= 0.*top-level seed"):
        grpo_module(_net(lora=True), seed=seed)


# ---------------------------------------------------------------------------------------------- rewards
def test_answers_in_scripts_with_vowel_signs_are_compared_whole():
    """normalize_answer made every non-alphanumeric character a space, combining marks too: Thai "ดนตรี" (music)
    matched the answer "ดนตร", and Hindi "संगीत" (music) became "स ग त", which holds "गीत" (song, "ग त") as a whole
    phrase: a caption saying music was credited with the fact song. Marks are kept now."""
    from musicflamingo.rewards import Fact, Target, answer_matches, caption_fact_score, normalize_answer

    assert normalize_answer("संगीत") == "संगीत" and normalize_answer("(B) C# minor.") == "b c# minor"
    assert not answer_matches("ดนตร", Target.from_record({}, "ดนตรี"))
    assert answer_matches("ดนตรี!", Target.from_record({}, "ดนตรี"))
    song = (Fact("genre", ("गीत",)),)
    assert caption_fact_score("एक मधुर संगीत", song) == 0.0
    assert caption_fact_score("एक मधुर गीत", song) == 1.0


class FailsOnSecond:
    """A reward of one's own with a bug: a KeyError for every answer but the first record's."""

    weight = 1.0

    def __call__(self, output, target) -> float:  # noqa: ANN001
        return {ANSWERS[0]: 1.0}[target.answer]


def test_a_reward_that_raises_is_named_with_its_record(tmp_path):
    """An exception inside a reward stopped the run with the reward's bare traceback (a KeyError: 'a bright tone'),
    which record and which completion it was scoring unsaid."""
    from musicflamingo.grpo import Prompt
    from musicflamingo.rewards import Target

    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    lit = grpo_module(_net(lora=True), think=False, rewards={"mine": FailsOnSecond()})
    lit._processor = lambda: processor
    ids = processor.tokenizer.encode("hum")
    first = Prompt("c0", [1], Target.from_record({}, ANSWERS[0]), slice(0, 0), "data/train.jsonl:1")
    assert lit.score([first], [[ids, ids]]).components["mine"] == [1.0, 1.0]
    second = Prompt("c1", [1], Target.from_record({}, ANSWERS[1]), slice(0, 0), "data/train.jsonl:2")
    with pytest.raises(
        GRPOConfigError,
        match=r"model.rewards.mine raised KeyError: 'a bright tone' for record 'c1' \(data/train.jsonl:2\) on the "
        r"completion 'hum'",
    ) as e:
        lit.score([first, second], [[ids, ids], [ids, ids]])
    assert isinstance(e.value.__cause__, KeyError)  # the reward's own traceback stays chained

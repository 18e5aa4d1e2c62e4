"""GRPO and think mode, review round 6: the learning rate each step logs, the stop ids of rollouts, think_record's
refusals, `model.tasks` given as one string, and reward metrics over every DDP rank."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_grpo import SHORT, _attach_manifests, _net, _rewrite
from train_fixtures import TINY_OVERRIDES, compose_train, grpo_module, write_dataset, write_processor

from musicflamingo.checkpoint import stop_token_ids
from musicflamingo.model import MusicFlamingo
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.reasoning import parse_think, think_record
from musicflamingo.training import train

ROOT = Path(__file__).resolve().parents[1]


def _rows(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if v} for r in csv.DictReader(open(run / "csv" / "metrics.csv"))]


def test_lr_logged_is_the_rate_the_step_used(tmp_path):
    """`lr/<group>` is the rate each optimizer step used (configs/callbacks/default.yaml, the SFT module): GRPO read it
    after `scheduler.step()`, so a warmup of 2 logged 1e-5 at step 0, which stepped with 5e-6."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=2)
    overrides = [
        "experiment=grpo",
        SHORT,
        "model.rollout.max_new_tokens=2",
        "model.optimizer.lr=1e-5",
        "model.scheduler.warmup_steps=2",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "export=false",
    ]
    train(compose_train(tmp_path, manifest, proc, overrides))
    lrs = [float(r["lr/language_model"]) for r in _rows(tmp_path / "run") if "lr/language_model" in r]
    assert lrs == pytest.approx([5e-6, 1e-5], rel=1e-5)


def test_rollouts_stop_where_eval_stops(tmp_path):
    """infer.py and eval.py stop on the eos ids of the checkpoint's generation_config.json too
    (`checkpoint.stop_token_ids`); GRPO's rollouts did not, so a completion ran on past one, and was scored (and
    counted as truncated) on text eval never sees."""
    net = _net(lora=False)
    net.generation_defaults = {"eos_token_id": [5, 299]}  # 5: not the config's nor the tokenizer's eos
    net.save_pretrained(tmp_path / "ckpt")
    net = MusicFlamingo.from_pretrained(tmp_path / "ckpt")
    lit = grpo_module(net, beta=0.0)
    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    lit._processor = lambda: processor
    eval_stops = stop_token_ids(tmp_path / "ckpt", net.config)
    assert 5 in eval_stops
    assert set(eval_stops) <= set(lit._stop_ids())
    assert lit._stop_ids()[0] == net.config.text.eos_token_id  # the padding fallback is unchanged


QUESTION = {"role": "user", "content": "<sound>What is the key?"}


def _record(answer: str) -> dict:
    return {
        "id": "q7",
        "audio": "a.wav",
        "conversations": [QUESTION, {"role": "assistant", "content": answer}],
    }


@pytest.mark.parametrize(
    "answer, thinking, error",
    [
        (
            "<think>hmm</think>C major",
            "because",
            r"'q7'.* tags but is not",
        ),  # nested in <answer> when wrapped
        ("C major</answer>", "because", r"'q7'.* tags but is not"),
        ("C major", "the bass </think> says", r"'q7'.* thinking holds a think/answer tag"),
        ("   ", "because", r"'q7'.* the last answer is empty"),
    ],
)
def test_think_record_refuses_what_it_would_break(answer, thinking, error):
    """think_record wrapped these silently into texts that are not the layout (nested or stray tags, an empty
    <answer>), which think-mode SFT then learnt."""
    with pytest.raises(ValueError, match=error):
        think_record(_record(answer), thinking)


def test_think_record_still_wraps_and_keeps_the_layout():
    out = think_record(_record("C major"), "the bass holds C")["conversations"][1]["content"]
    parsed = parse_think(out)
    assert parsed.well_formed and (parsed.thinking, parsed.answer) == ("the bass holds C", "C major")
    done = _record("<think>x</think><answer>C major</answer>")
    assert think_record(done, "ignored")["conversations"][1] == done["conversations"][1]


def test_tasks_given_as_one_string(tmp_path):
    """`model.tasks=mcq` (the command line's spelling of one task) was read as the tasks m, c and q: every record
    was left out and the error listed ['c', 'm', 'q']."""
    manifest = _rewrite(
        write_dataset(tmp_path / "data"),
        lambda i, r: r.update(
            task="mcq", choices=["a low hum", "a bright tone", "a middle note", "a very high whistle"]
        ),
    )
    lit = _attach_manifests(grpo_module(_net(lora=True), tasks="mcq"), manifest)
    assert lit.tasks == {"mcq"}
    assert len(lit._record_table("train")) == 4  # kept, no "keeps no record" error


class RankReward:
    """1 on DDP rank 1, 0 on rank 0: a metric of rank 0's share alone reads 0."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, output, target) -> float:  # noqa: ANN001
        return float(os.environ.get("LOCAL_RANK") == "1")


@pytest.mark.slow
def test_reward_metrics_cover_every_rank(tmp_path):
    """Two CPU processes: `train/reward`, `val/reward` and their per-reward keys were rank 0's share only (the
    validation mean of half the validation set); now the ranks' sums are added up."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=4)
    run = tmp_path / "ddp_run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=grpo",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=1",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.num_sanity_val_steps=0",
        "trainer.val_check_interval=1",
        "model.rewards.format=null",
        "model.rewards.accuracy=null",
        "model.rewards.caption_facts=null",
        "+model.rewards.rank={_target_:test_grpo_review6.RankReward,weight:1.0}",
        "model.rollout.max_new_tokens=2",
        f"data.train={manifest}",
        f"data.val={manifest}",
        f"data.processor={proc}",
        "data.batch_max_tokens=4096",
        "logger=csv",
        "export=false",
        f"+model.net.overrides={TINY_OVERRIDES}",
        f"hydra.run.dir={run}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(run)
    train_rows = [r for r in rows if "train/reward" in r]
    val_rows = [r for r in rows if "val/reward" in r]
    assert train_rows and val_rows, rows
    for key, r in [("train/reward", train_rows[0]), ("train/reward/rank", train_rows[0])]:
        assert 0.0 < float(r[key]) < 1.0, (key, r)
    for key in ("val/reward", "val/reward/rank"):
        assert float(val_rows[-1][key]) == pytest.approx(0.5), (key, val_rows[-1])  # 2 of the 4 on each rank


class SaysYes:
    """A reward of one's own that returns a word, not a number."""

    weight = 1.0

    def __call__(self, output, target):  # noqa: ANN001, ANN204
        return "yes"


def test_a_reward_that_returns_no_number_is_named_with_its_record(tmp_path):
    """`float("yes")` stopped the run with a bare ValueError naming neither the reward nor the record."""
    from musicflamingo.grpo import GRPOConfigError, Prompt
    from musicflamingo.rewards import Target

    lit = grpo_module(_net(lora=True), think=False, rewards={"mine": SaysYes()})
    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    lit._processor = lambda: processor
    prompt = Prompt("q7", [1, 2, 3], Target("qa", "qa", "x"), slice(0, 0))
    prompt.source = "train.jsonl:3"
    with pytest.raises(
        GRPOConfigError, match=r"model.rewards.mine returned 'yes' for record 'q7' \(train.jsonl:3\)"
    ):
        lit.score([prompt], [[[5, 6], [7]]])


def test_the_progress_line_shows_grpo_s_reward(caplog):
    """Piped output (`make demo > log`, a cluster job): GRPO's line said only "loss 0.0000" (the on-policy loss is
    ~0 whatever happens); it now carries the mean reward when the module logs one, and SFT's line is unchanged."""
    import logging
    from types import SimpleNamespace

    from musicflamingo.callbacks import ProgressLog

    def line(metrics: dict) -> str:
        cb = ProgressLog(every_n_steps=1)
        trainer = SimpleNamespace(
            global_step=0,
            max_steps=4,
            estimated_stepping_batches=4,  # Lightning's: min(max_steps, the epochs' steps)
            callbacks=[],
            is_global_zero=True,
            callback_metrics=metrics,
        )
        cb.on_train_start(trainer, None)
        trainer.global_step = 2
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="musicflamingo.callbacks"):
            cb.on_train_batch_end(trainer, None, None, {}, 0)
        return caplog.records[-1].getMessage()

    grpo = line({"train/loss": torch.tensor(0.0), "train/reward": torch.tensor(0.625)})
    assert grpo.startswith("step 2/4 | loss 0.0000 | reward 0.625 | "), grpo
    sft = line({"train/loss": torch.tensor(1.5)})
    assert sft.startswith("step 2/4 | loss 1.5000 | ") and "reward" not in sft, sft

"""Review round 16, engine stop strings and eval resume: `AnswerText` does bounded work per token (it grew its text by
concatenation and re-sliced the whole answer at every token: quadratic in the answer's length) with the answers
it gave before; `stop=` is refused by `check_eval_settings` itself; an eval rerun with other row filters
(`benchmark.tasks`, ...) into the same folder resumes, reusing the predictions of the items the runs share."""

from __future__ import annotations

import json
import random
import tracemalloc
from collections.abc import Sequence

import pytest
from release_fixtures import make_mmau
from test_eval_release_formats import _cfg as release_cfg
from tiny_assets import write_tiny_tokenizer

from musicflamingo.engine import AnswerText, _partial_stop, check_stop_strings
from musicflamingo.eval import EvalConfigError, evaluate
from musicflamingo.settings import SettingsError, check_eval_settings
from musicflamingo.tokenizer import IncrementalDecoder, load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


# ------------------------------------------------------------------------------------------------ AnswerText
class _WholeTextAnswer:
    """The AnswerText of review 14 (whole-text matching, as it was): the reference the pieces must agree with."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = check_stop_strings(tuple(stops))
        self.decoded, self.text, self.stop, self.ends, self.finished = "", "", None, [], False
        special = set(getattr(tokenizer, "special_tokens", ()))
        self.special = {tokenizer.token_to_id(s): s for s in self.stops if s in special}

    def push(self, token: int) -> bool:
        if token in self.special:
            self.finish()
            self.stop = self.stop or self.special[token]
            return True
        self._add(self.decoder.push(token))
        self.ends.append(len(self.decoded))
        return self.stop is not None

    def finish(self) -> None:
        if self.finished:
            return
        if self.stop is None:
            self._add(self.decoder.flush())
        if self.stop is None:
            self.text = self.decoded
        self.finished = True

    def _add(self, delta: str) -> None:
        if not delta:
            return
        self.decoded += delta
        if not self.stops:
            self.text = self.decoded
            return
        start = len(self.text)
        found = [i for i in (self.decoded.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stop = next(s for s in self.stops if self.decoded.find(s, start) == min(found))
            self.text = self.decoded[: min(found)]
            self.finished = True
            return
        self.text = self.decoded[: len(self.decoded) - _partial_stop(self.decoded, self.stops)]


_STOPS = [
    ["\n\n"],
    ["END", "ENDING", "é"],  # one a start of another; a two-byte character
    ["<|im_start|>", "ab"],  # a special token
    ["xyz", "yz!", "aaa"],  # overlapping candidates
    [],
]


def _random_tokens(tok, rng: random.Random, n_pieces: int) -> list[int]:
    """Text made of words, stop strings' pieces, multi-byte characters and specials, encoded, with some random ids
    (lone bytes of a character split anywhere) spliced in."""
    words = [
        "hello",
        " world",
        "\n",
        "\n\n",
        "E",
        "EN",
        "END",
        "ING",
        "é",
        "日本",
        "🎵",
        "a",
        "aa",
        "b",
        "x",
        "yz",
        "!",
    ]
    words += ["<|im_start|>", " ", "zz"]
    ids = tok.encode("".join(rng.choice(words) for _ in range(n_pieces)))
    for _ in range(len(ids) // 20):
        ids.insert(rng.randrange(len(ids) + 1), rng.randrange(len(tok)))
    return ids


@pytest.mark.parametrize("stops", _STOPS, ids=lambda s: "|".join(map(repr, s)) or "none")
def test_answer_text_gives_the_answers_of_whole_text_matching(tok, stops):
    """On long random streams every step (push's result, the text shown, the stop) and the end (text, kept tokens)
    are those of the former whole-text implementation."""
    rng = random.Random(16)
    for _ in range(40):
        ids = _random_tokens(tok, rng, rng.randrange(1, 200))
        new, old = AnswerText(tok, stops), _WholeTextAnswer(tok, stops)
        shown = 0
        for token in ids:
            hit = new.push(token)
            assert hit == old.push(token)
            assert new.text == old.text and new.stop == old.stop and len(new) == len(old.text)
            assert new.since(shown) == old.text[shown:]
            shown = len(new)
            if hit:
                break
        new.finish(), old.finish()
        assert (new.text, new.stop, new.ends, new.decoded) == (old.text, old.stop, old.ends, old.decoded)
        if new.stop is not None:
            old.kept_tokens = AnswerText.kept_tokens.__get__(old)
            assert new.kept_tokens() == old.kept_tokens()
        else:
            assert new.text == tok.decode(ids) and new.kept_tokens() == len(ids)
        for start in (0, 1, len(new) // 2, len(new), len(new) + 3):
            assert new.since(start) == new.text[start:]


@pytest.mark.parametrize("stops", [(), ("\n\n", "END")])
def test_answer_text_work_per_token_does_not_grow_with_the_answer(tok, stops):
    """Each push used to copy the whole answer (`decoded += delta`, `text = decoded[:...]`): the memory 20 pushes
    allocate is measured after 40k characters; it must be far below the answer's length."""
    answer = AnswerText(tok, stops)
    ids = tok.encode("hello world, a long answer. " * 40)  # no stop string in it
    while len(answer.text) < 40_000:
        for token in ids:
            answer.push(token)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for token in ids[:20]:
            answer.push(token)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8_000, f"a push allocated up to {peak} bytes with a {len(answer.text)}-character answer"
    assert answer.text.startswith("hello world, a long answer. hello") and not answer.finished


def test_reading_what_a_token_added_costs_that_text(tok):
    """`since(shown)`, what infer.py's printer and chat stream read at each token, allocates the new text only
    (`text[shown:]` joined the whole answer first)."""
    answer = AnswerText(tok, ("END",))
    ids = tok.encode("hello world, a long answer. " * 40)
    while len(answer) < 40_000:
        for token in ids:
            answer.push(token)
    shown = len(answer)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for token in ids[:20]:
            answer.push(token)
            assert len(answer.since(shown)) < 200
            shown = len(answer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8_000 and answer.text[-shown:] == answer.since(0)[-shown:]


# ------------------------------------------------------------------------------------------------ eval stop=
@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"a": 1}, r"^stop=\{'a': 1\}: expected text or a list of texts"),
        ([""], r"^stop=\[''\]: an empty stop string"),
        ([["x"]], r"^stop\[0\]=\['x'\]: expected text"),
        ("", r"^stop=\[''\].*stop=\[\] \(or null\) for none"),
    ],
)
def test_check_eval_settings_refuses_a_bad_stop_naming_it(value, match):
    """The settings check, which eval.py runs before anything loads, read no `stop` (runner checked it after)."""
    with pytest.raises(SettingsError, match=match):
        check_eval_settings({"stop": value})
    for good in (None, [], "###", ["\\n\\n", 42]):
        check_eval_settings({"stop": good})


def test_evaluate_refuses_a_bad_stop_as_both_error_kinds(tmp_path):
    root = make_mmau(tmp_path / "mmau")
    cfg = release_cfg("mmau", root, tmp_path / "out", f"ckpt={tmp_path / 'none'}")
    cfg.stop = [""]
    with pytest.raises(EvalConfigError, match="^stop") as e:
        evaluate(cfg)
    assert isinstance(e.value, SettingsError) and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ eval filters
class _Predictor:
    def __init__(self, tag: str = "A") -> None:
        self.seen: list[str] = []
        self.tag = tag

    def __call__(self, batch):
        self.seen += [it.id for it in batch]
        return [self.tag for _ in batch]


def _run(root, out, predictor, *extra):
    return evaluate(release_cfg("mmau", root, out, *extra), predict_fn=predictor)


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_eval_resume_with_other_task_filters_reuses_shared_predictions(tmp_path):
    """A researcher who ran tasks=[music] and now wants [music, speech]: the music items are not asked again, the
    speech ones are, and the report counts exactly this run's items; narrowing back asks nothing and reports the
    narrower set. No prediction row is ever dropped. Refused before: `differs in: benchmark_cfg.tasks`."""
    root, out = make_mmau(tmp_path / "mmau"), tmp_path / "out"
    by_task: dict[str, list[str]] = {}
    for rec in json.loads((root / "mmau-test-mini.json").read_text(encoding="utf-8")):
        by_task.setdefault(rec["task"], []).append(rec["id"])
    music, speech = by_task["music"], by_task["speech"]
    first = _Predictor()
    r = _run(root, out, first, "benchmark.tasks=[music]")
    assert sorted(first.seen) == sorted(music) and r["num_items"] == len(music)
    wider = _Predictor()
    r = _run(root, out, wider, "benchmark.tasks=[music,speech]")
    assert sorted(wider.seen) == sorted(speech)  # music reused
    assert r["num_items"] == r["num_predicted"] == len(music) + len(speech)
    per_item = [json.loads(x)["id"] for x in (out / "per_item.jsonl").read_text().splitlines()]
    assert sorted(per_item) == sorted(music + speech)
    narrower = _Predictor()
    r = _run(root, out, narrower, "benchmark.tasks=[speech]")
    assert narrower.seen == [] and r["num_items"] == len(speech) and r["num_scored"] == len(speech)
    assert sorted(x["id"] for x in _rows(out)) == sorted(music + speech)  # every row kept, none twice
    everything = _Predictor()
    r = _run(root, out, everything)  # no filter: only the sound items are new
    assert sorted(everything.seen) == sorted(by_task["sound"]) and r["num_items"] == 6
    assert len(_rows(out)) == 6
    run = json.loads((out / "run.json").read_text())
    assert run["benchmark_cfg"]["tasks"] is None
    assert {"tasks": ["music"]} in run["earlier_filters"] and {"tasks": ["speech"]} in run["earlier_filters"]


def test_eval_resume_with_other_filters_still_refuses_what_changes_predictions(tmp_path):
    """A filter change together with another prompt, or a change of answer-making settings, is refused as before."""
    root, out = make_mmau(tmp_path / "mmau"), tmp_path / "out"
    _run(root, out, _Predictor(), "benchmark.tasks=[music]")
    with pytest.raises(EvalConfigError, match=r"differs in: benchmark_cfg.prompt .*benchmark_cfg.tasks"):
        _run(root, out, _Predictor(), "benchmark.tasks=[speech]", "benchmark.prompt='{question} {options}'")
    with pytest.raises(EvalConfigError, match=r"differs in: .*max_new_tokens"):
        _run(root, out, _Predictor(), "benchmark.tasks=[speech]", "max_new_tokens=7")
    with pytest.raises(EvalConfigError, match=r"differs in: .*stop_strings"):
        _run(root, out, _Predictor(), "benchmark.tasks=[speech]", "stop=zz")
    assert json.loads((out / "run.json").read_text())["benchmark_cfg"]["tasks"] == ["music"]


def test_eval_resume_with_other_filters_refuses_an_item_read_otherwise(tmp_path, monkeypatch):
    """If a shared id had another prompt under the earlier filters (a reader whose items depend on the rows kept),
    its prediction is not reused: refused naming the item."""
    import musicflamingo.eval.runner as runner

    root, out = make_mmau(tmp_path / "mmau"), tmp_path / "out"
    _run(root, out, _Predictor(), "benchmark.tasks=[music]")
    build = runner.build_benchmark

    def rebuilt(cfg):  # the earlier filters' benchmark gives its items another prompt
        bench = build(cfg)
        if cfg.get("tasks") == ["music"]:
            for it in bench.items:
                it.prompt += " (other)"
        return bench

    monkeypatch.setattr(runner, "build_benchmark", rebuilt)
    with pytest.raises(EvalConfigError, match=r"benchmark_cfg.tasks .*item \S+ has another prompt"):
        _run(root, out, _Predictor(), "benchmark.tasks=[music,speech]")

"""The generation engine: continuous batching gives every request the tokens it gets alone; a chat slot persists
across turns; generate() refuses arguments it does not implement."""

from __future__ import annotations

import pytest
import torch

from musicflamingo.engine import KEY_BLOCK, Engine, Request, SamplingParams, generate
from musicflamingo.model import MusicFlamingo, MusicFlamingoConfig

AUDIO = 300  # the tiny preset's <sound> id


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).eval()


def _prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 290, (int(k),), generator=g) for k in torch.randint(5, 30, (n,), generator=g)]


def _alone(model, ids: torch.Tensor, n: int, stops=(), **kw) -> list[int]:
    """Greedy tokens of one request run by itself (a batch of one), the stop id included."""
    out = generate(model, ids[None], max_new_tokens=n, stop_token_ids=list(stops), pad_token_id=-1, **kw)
    new = out[0, ids.shape[0] :].tolist()
    return [t for t in new if t != -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requests_joining_and_leaving_get_their_single_row_tokens(model, dtype):
    """Five requests through three slots: they join at different steps (as slots free up), finish at different
    steps (a stop id for some, max_new_tokens for others), and each gets exactly its tokens when run alone."""
    m = model.to(dtype)
    prompts = _prompts(5)
    budgets = [12, 5, 9, 14, 3]
    probe = _alone(m, prompts[2], 9)
    stops = (probe[3],)  # request 2 (at least) stops early, on its 4th token
    expected = [_alone(m, p, n, stops) for p, n in zip(prompts, budgets)]
    assert len(expected[2]) == 4 and expected[2][-1] == stops[0]

    engine = Engine(m, slots=3)
    got: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    joined_at, step = [], 0
    pending = list(range(5))
    while pending or engine.decoding:
        if (
            pending and engine.free_slots() and (step % 2 == 0 or not engine.decoding)
        ):  # join every other step
            i = pending.pop(0)
            slot = engine.admit(
                Request(prompts[i], SamplingParams(max_new_tokens=budgets[i], stop_ids=stops))
            )
            owner[slot.index], got[i] = i, [slot.tokens[-1]]
            joined_at.append(step)
        for index, token in engine.step():
            got[owner[index]].append(token)
        for s in list(engine.slots):
            if s is not None and s.done:
                engine.release(s.index)
        step += 1
    assert [got[i] for i in range(5)] == expected
    assert len(set(joined_at)) == 5  # really joined at five different steps
    model.float()


def test_chat_slot_across_three_turns_equals_from_scratch(model):
    """A slot extended turn by turn (audio in the first turn) gives, each turn, the tokens a from-scratch run over
    the whole history gives; its cache keeps the history between turns."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(1, 128, 3000, generator=g)
    features_mask = torch.ones(1, 3000, dtype=torch.int32)
    turn1 = torch.cat([torch.tensor([5, 6, 301]), torch.full((750,), AUDIO), torch.tensor([302, 7, 8, 9])])
    turns = [turn1, torch.tensor([11, 12, 13]), torch.tensor([21, 22, 23, 24])]
    params = SamplingParams(max_new_tokens=6)
    engine = Engine(model, slots=2, capacity=16)  # too small on purpose: it grows, keeping the cache
    other = engine.admit(Request(_prompts(1, seed=3)[0], SamplingParams(max_new_tokens=20)), index=1)
    history: list[int] = []
    for k, ids in enumerate(turns):
        if k == 0:
            slot = engine.admit(Request(ids, params, features, features_mask), index=0)
        else:
            slot = engine.extend(0, ids, params)
        while not slot.done:
            engine.step()
        history += ids.tolist()
        full = generate(
            model,
            torch.tensor([history]),
            input_features=features,
            input_features_mask=features_mask,
            max_new_tokens=6,
            stop_token_ids=[],
        )
        assert slot.tokens == full[0, len(history) :].tolist(), k
        history += slot.tokens
        assert engine.cache.lengths[0] == len(history) - 1  # the last token is fed with the next turn
    assert engine.cache.capacity >= len(history) and engine.cache.capacity % KEY_BLOCK == 0
    while engine.decoding:
        engine.step()
    assert other.done and other.tokens == _alone(model, _prompts(1, seed=3)[0], 20)


def test_sampling_is_seeded_per_request(model):
    """A seeded sampled request gives the same tokens alone and next to another request."""
    p = _prompts(2, seed=4)
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.9, top_k=20, seed=7)
    alone = Engine(model, slots=1)
    a = alone.admit(Request(p[0], params))
    while alone.decoding:
        alone.step()
    shared = Engine(model, slots=2)
    b = shared.admit(Request(p[0], params))
    shared.admit(Request(p[1], SamplingParams(max_new_tokens=8, do_sample=True, seed=1)))
    while shared.decoding:
        shared.step()
    assert a.tokens == b.tokens


def test_a_chat_turns_seed_is_its_own(model):
    """`extend` with new sampling params samples the turn from their seed: the same tokens whatever the first turn
    was (greedy left no generator, so the turn drew from torch's global RNG; a seeded first turn kept its own)."""
    prompt, turn = _prompts(2, seed=5)
    seeded = SamplingParams(max_new_tokens=8, do_sample=True, temperature=1.5, seed=1234)

    def second_turn(first: SamplingParams, global_seed: int) -> list[int]:
        torch.manual_seed(global_seed)
        engine = Engine(model, slots=1)
        slot = engine.admit(Request(prompt, first), index=0)
        while not slot.done:
            engine.step()
        slot = engine.extend(0, turn, seeded)
        while not slot.done:
            engine.step()
        return slot.tokens

    greedy = SamplingParams(max_new_tokens=4)
    other = SamplingParams(max_new_tokens=4, do_sample=True, seed=7)
    assert second_turn(greedy, 0) == second_turn(greedy, 1) == second_turn(other, 2)


def test_seed_outside_64_bits_is_refused_up_front():
    SamplingParams(do_sample=True, seed=2**64 - 1)
    SamplingParams(do_sample=True, seed=-(2**63))
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed must be a 64-bit integer"):
            SamplingParams(do_sample=True, seed=seed)


def test_cache_capacity_never_passes_the_context(model):
    """A capacity asked from prompt + max_new_tokens is cut at the context (it used to allocate it all)."""
    limit = model.config.text.max_position_embeddings
    assert Engine(model, slots=1, capacity=40 * limit).cache.capacity == limit
    assert Engine(model, slots=1, capacity=KEY_BLOCK + 1).cache.capacity == 2 * KEY_BLOCK  # whole key blocks


def test_cache_grows_with_the_tokens_made_not_with_max_new_tokens(model):
    """A request allowed 20000 tokens that stops after a few leaves the cache at one key block (sizing it by the
    budget grew every slot to 20000+ positions for good); one that runs past a block grows it on the way, and
    its tokens are those of a cache allocated whole up front."""
    prompt = _prompts(1, seed=5)[0]
    first = _alone(model, prompt, 1)
    engine = Engine(model, slots=2)
    slot = engine.admit(Request(prompt, SamplingParams(max_new_tokens=20000, stop_ids=(first[0],))))
    assert slot.done and engine.cache.capacity == KEY_BLOCK
    engine.release(slot.index)
    n = KEY_BLOCK + 40  # past the first block
    slot = engine.admit(Request(prompt, SamplingParams(max_new_tokens=n)))
    assert engine.cache.capacity == KEY_BLOCK
    while engine.decoding:
        engine.step()
    assert engine.cache.capacity == 2 * KEY_BLOCK
    whole = Engine(model, slots=1, capacity=len(prompt) + n)
    ref = whole.admit(Request(prompt, SamplingParams(max_new_tokens=n)))
    while whole.decoding:
        whole.step()
    assert slot.tokens == ref.tokens and len(slot.tokens) == n


def test_unknown_and_unsupported_arguments_raise(model):
    ids = _prompts(1)[0][None]
    with pytest.raises(TypeError, match="num_beam"):
        generate(model, ids, num_beam=4)
    with pytest.raises(TypeError, match=r"^generate\(\) got an unexpected keyword argument .bogus"):
        model.generate(ids, bogus=1)
    with pytest.raises(TypeError, match="lengths"):
        model(ids, lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match="num_beams=4"):
        generate(model, ids, num_beams=4)
    with pytest.raises(ValueError, match="repetition_penalty must be a number > 0"):
        generate(model, ids, repetition_penalty=0)
    with pytest.raises(ValueError, match="max_new_tokens or max_length"):
        generate(model, ids, max_new_tokens=3, max_length=10)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, do_sample=True, top_p=0.0)


def test_hugging_face_aliases(model):
    """`max_length` counts the prompt; `eos_token_id` (int or list) is the stop set."""
    ids = _prompts(1)[0][None]
    S = ids.shape[1]
    assert generate(model, ids, max_length=S + 5, stop_token_ids=[]).shape[1] == S + 5
    free = generate(model, ids, max_new_tokens=8, stop_token_ids=[])[0, S:].tolist()
    stop = free[2]
    for eos in (stop, [stop, 999]):
        out = generate(model, ids, max_new_tokens=8, eos_token_id=eos)[0, S:].tolist()
        assert out == free[: free.index(stop) + 1]


def test_prompt_past_the_context_is_refused(model):
    limit = model.config.text.max_position_embeddings
    engine = Engine(model, slots=1)
    with pytest.raises(ValueError, match="context"):
        engine.admit(Request(torch.zeros(limit, dtype=torch.long)))
    assert engine.free_slots() == [0]  # the failed request left the slot free
    slot = engine.admit(Request(_prompts(1)[0], SamplingParams(max_new_tokens=3)))
    while engine.decoding:
        engine.step()
    before = (list(slot.tokens), slot.last, engine.cache.lengths[0])
    with pytest.raises(ValueError, match="context"):  # a chat turn too long for what is left
        engine.extend(0, torch.zeros(limit, dtype=torch.long))
    assert (slot.tokens, slot.last, engine.cache.lengths[0]) == before and slot.done
    engine.extend(0, torch.tensor([5, 6]))  # the conversation goes on
    assert len(slot.tokens) == 1


def test_engine_runs_under_autocast(model):
    """A float32 model generating under bf16 autocast (GRPO rollouts inside a bf16-mixed run): the cache keeps its
    dtype and every request still gets tokens."""
    engine = Engine(model, slots=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for p in _prompts(2, seed=5):
            engine.admit(Request(p, SamplingParams(max_new_tokens=4)))
        while engine.decoding:
            engine.step()
    assert engine.cache.keys.dtype == torch.float32
    assert all(len(s.tokens) == 4 for s in engine.slots)


def test_each_prompt_of_a_seeded_run_has_its_own_stream():
    """`for_prompt(i)`: a seed per prompt from (seed, i), so one song sampled N times gives N draws; prompt 0 keeps
    the seed (a one-prompt run is unchanged), unseeded settings stay unseeded."""
    params = SamplingParams(do_sample=True, seed=0)
    seeds = [params.for_prompt(i).seed for i in range(4)]
    assert seeds[0] == 0 and len(set(seeds)) == 4
    assert seeds == [params.for_prompt(i).seed for i in range(4)]  # the same every run
    assert SamplingParams(do_sample=True, seed=1).for_prompt(1).seed not in seeds
    assert SamplingParams(do_sample=True, seed=-(2**63)).for_prompt(3).seed < 2**64
    assert SamplingParams(do_sample=True).for_prompt(5).seed is None

"""Review round 16, serve: the worker streams each token's new text without joining the whole answer.

`EngineWorker._fan_out` read `slot.text.text[job.shown:]` at every token, joining the answer's pieces each time
(quadratic in the answer's length since `AnswerText` keeps its text in pieces); it reads `since(shown)` now.
"""

from __future__ import annotations

from test_serve import MODEL, QUESTION, ckpt, loaded, songs, user_turn  # noqa: F401
from test_serve_stop_review14 import _body, _settings, app, worker_events  # noqa: F401

from musicflamingo.engine import AnswerText
from musicflamingo.serve.protocol import parse_chat_request, prepare
from musicflamingo.serve.worker import EngineWorker


def test_the_worker_never_joins_the_whole_answer_while_streaming(app, songs, loaded, monkeypatch):  # noqa: F811
    tok = loaded[1].tokenizer
    state = app.state.server
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    # a stop string no answer holds: the slot has an AnswerText, and the answer runs to its length
    req = parse_chat_request(_body(msgs, 40, stop=["\x07never\x07"]), state.settings)
    prepared = prepare(req, state.processor, state.settings, state.context, state.stop_ids)
    worker = EngineWorker(loaded[0], slots=1, tokenizer=tok)
    reads = []
    whole = AnswerText.text

    def counted(self):  # noqa: ANN001, ANN202
        reads.append(1)
        return whole.fget(self)

    monkeypatch.setattr(AnswerText, "text", property(counted))

    events = worker_events(worker, prepared)
    assert events[-1].error is None and sum(len(e.tokens) for e in events) > 10
    streamed = "".join(e.text for e in events)
    n = len(reads)
    assert n == 0, f"the worker joined the whole answer {n} times for {len(events)} tokens"
    # what was streamed is the answer the engine holds, nothing lost by reading it in pieces
    assert streamed == tok.decode([t for e in events for t in e.tokens], skip_special_tokens=True)

"""Review round 15, serve: `max_queue` counts the requests waiting for a slot, beyond the free slots. Requests still
being prepared (audio decoding) counted against it even when engine slots were free: with max_batch=2 max_queue=4,
8 simultaneous requests got 4 refusals instead of 2. What requests not yet decoding hold stays bounded by
max_queue + max_batch (the memory plan's count)."""

from __future__ import annotations

import threading

import httpx
from test_serve import (  # noqa: F401  (fixtures)
    MODEL,
    QUESTION,
    _wait,
    ckpt,
    loaded,
    running_server,
    songs,
    user_turn,
)

from musicflamingo.checkpoint import stop_token_ids
from musicflamingo.serve import ServeSettings, create_app


def test_free_slots_take_requests_beyond_max_queue(loaded, ckpt, songs, monkeypatch):  # noqa: F811
    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=2, max_queue=4, prepare_threads=8, retry_after_s=2)
    app = create_app(model, processor, settings, stop_token_ids(ckpt, model.config))
    release = threading.Event()
    template = processor.apply_chat_template

    def slow_template(*args, **kwargs):  # every request held in its preparation until all 8 were sent
        release.wait(30)
        return template(*args, **kwargs)

    monkeypatch.setattr(processor, "apply_chat_template", slow_template)
    msgs = [user_turn(QUESTION, songs / "songs" / "tone_a.wav")]
    statuses: list[int] = []
    with running_server(app) as base:

        def ask() -> None:
            body = {"model": MODEL, "messages": msgs, "max_tokens": 2}
            statuses.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            _wait(lambda: len(statuses) + app.state.server.preparing == 8, timeout=20)
            refused = list(statuses)
        finally:
            release.set()
            for t in threads:
                t.join(60)
    assert refused == [503, 503]  # 2 run, 4 wait: only the 7th and 8th are refused
    assert sorted(statuses) == [200] * 6 + [503] * 2
    worker = app.state.server.worker
    assert worker.stats()["queued"] == 0 and worker._taken == 0  # every slot given back

"""Review round 8 of the server: requests whose client is gone at an awkward moment."""

from __future__ import annotations

import asyncio
import json

import pytest
from test_serve import MODEL, loaded  # noqa: F401  (loaded: a fixture)
from tiny_checkpoint import write_tiny_checkpoint

import musicflamingo.serve.app as serve_app
from musicflamingo.serve import ServeSettings, create_app


@pytest.fixture(scope="module")  # the checkpoint test_serve's `loaded` reads
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def test_stream_whose_client_left_before_the_first_byte_frees_its_slot(loaded, monkeypatch, caplog):  # noqa: F811
    """The stream's job was cancelled only by the body generator's `finally`, which never runs when the
    response's first send (the headers) fails: the job then decoded its whole max_tokens in a slot nobody read.
    The client's leaving is no server error (it was logged as 'unexpected error' with a traceback)."""
    model, processor = loaded
    jobs = []

    class Recorded(serve_app.Job):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            jobs.append(self)

    monkeypatch.setattr(serve_app, "Job", Recorded)
    app = create_app(model, processor, ServeSettings(model_name=MODEL, max_batch=1), stop_ids=())
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 400}
    ).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }

    async def main():
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never says it left: the failing send is all there is

        async def send(message):
            if message["type"] == "http.response.start":
                raise OSError("connection reset by peer")  # what uvicorn's send raises for a gone client

        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
            assert len(jobs) == 1
            job = jobs[0]
            for _ in range(200):  # the worker sees the flag before its next step and frees the slot
                if job.cancelled and app.state.server.worker.stats()["live"] == 0:
                    break
                await asyncio.sleep(0.01)
            return job

    job = asyncio.run(main())
    assert job.cancelled, "the job of a stream that never started kept decoding"
    assert job.generated < 400
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_create_app_stops_where_infer_and_eval_stop(ckpt, tmp_path):
    """`create_app(model, processor, settings)` without stop_ids stopped on config.json's eos alone; infer.py,
    eval.py and serve.py's own loader also stop on generation_config.json's eos ids (a Qwen-style file names
    <|endoftext|> too): an API user's server ran past them."""
    import json
    import shutil

    import torch

    from musicflamingo import MusicFlamingo, MusicFlamingoProcessor
    from musicflamingo.checkpoint import stop_token_ids

    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [7, 11]
    (d / "generation_config.json").write_text(json.dumps(gen))
    model = MusicFlamingo.from_pretrained(d, dtype=torch.float32, device="cpu").eval()
    app = create_app(model, MusicFlamingoProcessor.from_pretrained(d), ServeSettings(model_name=MODEL))
    assert app.state.server.stop_ids == tuple(stop_token_ids(d, model.config))
    assert {7, 11, model.config.text.eos_token_id} <= set(app.state.server.stop_ids)


def test_serve_plan_true_prints_the_worst_case_without_loading(ckpt, monkeypatch, capsys):
    """serve.py had no memory plan: `plan=true` prints it (slots, KV cache) and loads nothing;
    `memory_check=true` refuses a server whose worst case does not fit, naming the server's own settings."""
    import musicflamingo.runtime as runtime
    from musicflamingo.planner import MemoryPlanError
    from musicflamingo.serve.app import serve
    from musicflamingo.settings import SettingsError

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(serve_app, "load_model", no_loading)
    cfg = {"ckpt": str(ckpt), "plan": True, "device": "cpu", "dtype": "float32", "max_batch": 4}
    serve(cfg)
    table = capsys.readouterr().out
    assert "KV cache" in table and "4 slots" in table
    from musicflamingo.serve.app import plan_server

    peak = plan_server(cfg).peak
    monkeypatch.setattr(runtime, "available_memory", lambda device: peak - 1)
    with pytest.raises(MemoryPlanError, match="max_batch"):
        serve({**cfg, "plan": False, "memory_check": True})
    with pytest.raises(SettingsError, match="plan_memory_gb"):
        serve({**cfg, "plan": False, "plan_memory_gb": 8})

"""An OpenAI-compatible server on the generation engine, with a web page (`python serve.py ckpt=DIR`).

settings.py   configs/serve.yaml -> ServeSettings (limits, key, audio_root, batching)
errors.py     APIError: status + OpenAI-style error body naming the field
audio.py      base64 / data: / file:// audio -> checked 16 kHz waveforms
protocol.py   chat-completions JSON -> ChatRequest -> model inputs (Prepared)
text.py       the engine's answer text (cut at stop strings) -> streamed deltas, think mode's reasoning apart
worker.py     EngineWorker: the one thread that runs the engine (continuous batching, stop strings)
app.py        the Starlette app, build_server(cfg), serve(cfg)
static/       the page: index.html, app.js, style.css
"""

from musicflamingo.serve.app import build_server, create_app, serve
from musicflamingo.serve.errors import APIError
from musicflamingo.serve.settings import ServeConfigError, ServeSettings

__all__ = ["APIError", "ServeConfigError", "ServeSettings", "build_server", "create_app", "serve"]

"""musicflamingo: train, run and evaluate Music Flamingo audio-language models in plain PyTorch."""

__all__ = ["MusicFlamingo", "MusicFlamingoConfig", "MusicFlamingoProcessor"]

# Imported on first use: `import musicflamingo.cli` (every entry point's first step) then needs no torch, so a
# command line Hydra refuses is named in a fraction of a second.
_LAZY = {
    "MusicFlamingo": "musicflamingo.model",
    "MusicFlamingoConfig": "musicflamingo.model",
    "MusicFlamingoProcessor": "musicflamingo.processor",
}


def __getattr__(name: str):  # noqa: ANN202
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'musicflamingo' has no attribute {name!r}")

"""Plain-PyTorch Music Flamingo: no Lightning, Hydra or transformers imports below this package."""

from musicflamingo.model.config import AudioEncoderConfig, ConfigError, MusicFlamingoConfig, TextConfig

__all__ = [
    "AudioEncoderConfig",
    "ConfigError",
    "MusicFlamingo",
    "MusicFlamingoConfig",
    "MusicFlamingoOutput",
    "TextConfig",
]


def __getattr__(name: str):  # noqa: ANN202
    # The model module imports musicflamingo.checkpoint, which imports model.config: loaded on first use, so that
    # importing checkpoint first (a checkpoint writer that needs no model) does not run into a half-made module.
    if name in ("MusicFlamingo", "MusicFlamingoOutput"):
        from musicflamingo.model import musicflamingo

        return getattr(musicflamingo, name)
    raise AttributeError(f"module 'musicflamingo.model' has no attribute {name!r}")

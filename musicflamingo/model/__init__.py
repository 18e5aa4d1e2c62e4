"""Plain-PyTorch Music Flamingo: no Lightning, Hydra or transformers imports below this package."""

from musicflamingo.model.config import AudioEncoderConfig, ConfigError, MusicFlamingoConfig, TextConfig
from musicflamingo.model.musicflamingo import MusicFlamingo, MusicFlamingoOutput

__all__ = [
    "AudioEncoderConfig",
    "ConfigError",
    "MusicFlamingo",
    "MusicFlamingoConfig",
    "MusicFlamingoOutput",
    "TextConfig",
]

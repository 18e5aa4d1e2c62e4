"""musicflamingo: train, run and evaluate Music Flamingo audio-language models in plain PyTorch."""

from musicflamingo.model import MusicFlamingo, MusicFlamingoConfig

__all__ = ["MusicFlamingo", "MusicFlamingoConfig", "MusicFlamingoProcessor"]


def __getattr__(name: str):  # noqa: ANN202
    # The processor pulls in audio/tokenizer dependencies; import it lazily.
    if name == "MusicFlamingoProcessor":
        from musicflamingo.processor import MusicFlamingoProcessor

        return MusicFlamingoProcessor
    raise AttributeError(f"module 'musicflamingo' has no attribute {name!r}")

"""Training data: manifests -> samples -> token-budget batches (see ``manifest.py`` for the file format)."""

from musicflamingo.chat import IGNORE_INDEX
from musicflamingo.data.collate import collate, collate_packed
from musicflamingo.data.dataset import (
    BadSample,
    BadSampleError,
    BadSampleTracker,
    ConversationDataset,
    TooManyBadSamplesError,
    estimate_num_tokens,
)
from musicflamingo.data.manifest import AudioRef, ManifestError, Message, Record, read_manifest
from musicflamingo.data.sampler import MixtureDataset, TokenBudgetBatchSampler

__all__ = [
    "IGNORE_INDEX",
    "AudioRef",
    "BadSample",
    "BadSampleError",
    "BadSampleTracker",
    "ConversationDataset",
    "ManifestError",
    "Message",
    "MixtureDataset",
    "Record",
    "TokenBudgetBatchSampler",
    "TooManyBadSamplesError",
    "collate",
    "collate_packed",
    "estimate_num_tokens",
    "read_manifest",
]

"""reco-qdrant: retrieval-enhanced contrastive vision-text models (RECO) with a Qdrant memory."""

from .classifier import TEMPLATES, RecoClassifier
from .encoders import Encoder, OpenClipEncoder, SentenceTransformersEncoder, load_encoder
from .fusion import FusionConfig, FusionModel
from .memory import (
    EncoderMismatchError,
    Memory,
    MemoryDamagedError,
    MemoryFullError,
    MemoryInUseError,
    MemoryUnavailableError,
    Neighbours,
    RecoMemoryError,
    Restored,
)
from .training import TrainConfig, train_fusion

__version__ = "0.1.0"
__all__ = [
    "Memory", "Neighbours", "Encoder", "OpenClipEncoder", "SentenceTransformersEncoder", "load_encoder",
    "FusionConfig", "FusionModel", "TrainConfig", "train_fusion", "RecoClassifier", "TEMPLATES",
    "EncoderMismatchError", "MemoryInUseError", "MemoryUnavailableError", "MemoryDamagedError",
    "MemoryFullError", "RecoMemoryError", "Restored",
]

"""reco-qdrant: retrieval-enhanced contrastive vision-text models (RECO) with a Qdrant memory.

Training: `train_fusion` trains the fusion model, chosen on classes it never saw; given labels and class
embeddings it also calls `adapt_fusion`, the weights for the classes trained on (`FusionModel.adapted`).
"""

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
from .training import TrainConfig, adapt_fusion, train_fusion

__version__ = "0.1.0"
__all__ = [
    "Memory", "Neighbours", "Encoder", "OpenClipEncoder", "SentenceTransformersEncoder", "load_encoder",
    "FusionConfig", "FusionModel", "TrainConfig", "train_fusion", "adapt_fusion", "RecoClassifier", "TEMPLATES",
    "EncoderMismatchError", "MemoryInUseError", "MemoryUnavailableError", "MemoryDamagedError",
    "MemoryFullError", "RecoMemoryError", "Restored",
]

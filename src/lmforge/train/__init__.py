"""Training: the Trainer (and its settings) plus the in-memory text data path of the Python API."""

from lmforge.data.text import TextDataset, create_dataloaders
from lmforge.train.trainer import Trainer, TrainSettings

__all__ = ["Trainer", "TrainSettings", "TextDataset", "create_dataloaders"]

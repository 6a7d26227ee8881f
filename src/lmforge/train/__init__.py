"""Training: the Trainer, its settings, and the in-memory text data of the Python API.

Nothing heavy is imported here: `lmforge.train.checkpoint` (what inference and export use) loads
without the trainer. `from lmforge.train import Trainer` imports it when asked for.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Trainer": "lmforge.train.trainer",
    "TrainSettings": "lmforge.train.trainer",
    "TextDataset": "lmforge.data.text",
    "create_dataloaders": "lmforge.data.text",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.train' has no attribute {name!r}")

"""What a phase brings to the one run pipeline (`lmforge.train.pipeline`).

Pretraining and instruction tuning are built the same way; they differ only in where the model,
the tokenizer and the batches come from, and in a few settings. Each phase module
(`train/pretrain.py`, `train/sft.py`) reads and checks its inputs and returns a `Phase`, having
written nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Phase:
    name: str  # "pretrain" | "sft": recorded in every checkpoint and in run_info.json
    model: Any  # the Transformer, on the CPU, before any resume
    tokenizer: Any
    train_batches: Any  # a trainer `Batches`
    val_batches: Any
    data_identity: dict[str, Any]  # what the batches are read from: a resume must see the same
    describe: list[str]  # header lines: the model and the data, as the user should read them
    settings: dict[str, Any] = field(default_factory=dict)  # TrainSettings the phase decides
    run_info: dict[str, Any] = field(default_factory=dict)  # its part of run_info.json
    chat: bool = False  # periodic samples go through the chat template
    vocab_limit: int = 0  # ids the model may emit when sampling
    init_from: Path | None = None  # the checkpoint it starts from, never its run folder
    warnings: list[str] = field(default_factory=list)

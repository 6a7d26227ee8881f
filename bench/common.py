"""What every benchmark prints beside its figures: the machine, the versions, and the JSON file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }


def report(name: str, result: dict[str, Any]) -> None:
    """Print the machine and config lines and write bench/results/NAME.json (plus the JSON line)."""
    result = {"machine": machine(), **result}
    print(f"machine: {result['machine']}")
    print(f"config:  {result.get('config')}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def dump(name: str) -> None:
    print((RESULTS / f"{name}.json").read_text().replace("\n", " "))

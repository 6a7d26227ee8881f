"""What every benchmark prints beside its figures: the machine, the versions, and the JSON file.

The machine record holds the load average when the figures were taken: on a machine whose cores
are shared, an absolute time means little without it (compare variants as ratios within one run).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.device import cpu_model

RESULTS = Path(__file__).parent / "results"


def cpu_flags() -> list[str]:
    """The CPU's vector extensions that decide fp32/bf16 speed (avx2, avx512f, avx512_bf16, amx)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [flag for flag in wanted if flag in flags]


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages (runnable threads, this process included)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 15.0) -> dict[str, Any]:
    """Wait until the 1-minute load average is below `max_load` (0: do not wait), at most
    `max_wait_s`. Returns what was found: the load, the seconds waited, and whether it was quiet."""
    start = time.monotonic()
    while True:
        load = load_average()
        quiet = load is None or max_load <= 0 or load[0] < max_load
        waited = time.monotonic() - start
        if quiet or waited >= max_wait_s:
            return {"load_average": load, "waited_s": round(waited), "quiet": quiet,
                    "max_load": max_load}  # fmt: skip
        print(f"load average {load[0]:.2f} >= {max_load}: waiting ({waited:.0f} s so far)")
        time.sleep(poll_s)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
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

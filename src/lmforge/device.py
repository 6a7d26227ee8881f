"""The one place that picks the device and the precision, and says why."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from lmforge.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    device: torch.device
    dtype: str  # fp32 | bf16 | fp16: the autocast dtype of forward/backward (weights stay fp32)
    use_scaler: bool  # fp16 needs a GradScaler against underflowing gradients
    reason: str

    def autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    def describe(self) -> str:
        return f"device {self.device}, precision {self.dtype} ({self.reason})"


def physical_cores() -> int:
    """Physical cores (hyper-threads slow small matmuls down); falls back to logical CPUs."""
    logical = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return logical
    cores, socket = set(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            socket = value.strip()
        elif key.strip() == "core id":
            cores.add((socket, value.strip()))
    return max(1, min(len(cores), logical)) if cores else logical


def cpu_bf16_native() -> str | None:
    """The CPU flag that makes bf16 matmuls fast (avx512_bf16 or amx_bf16), if it has one.

    fp32 stays the CPU default (exact, and the only fast path on most laptops); where this
    returns a flag, ``--train.dtype=bf16`` trains about 1.3x faster (the demo turns it on).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)
    except OSError:
        pass
    return None


def pick(device: str = "auto", dtype: str = "auto") -> Precision:
    """cuda -> mps -> cpu; bf16 where supported, else fp16 + scaler; fp32 on CPU unless asked."""
    if device == "auto":
        if torch.cuda.is_available():
            dev, why = torch.device("cuda"), "CUDA is available"
        elif torch.backends.mps.is_available():
            dev, why = torch.device("mps"), "Apple GPU (MPS) is available"
        else:
            dev, why = torch.device("cpu"), "no CUDA or MPS device found"
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UserError(
                f"train.device: unknown device '{device}' (auto, cuda, mps, cpu)"
            ) from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device=cuda but CUDA is not available: use train.device=auto")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError("train.device=mps but MPS is not available: use train.device=auto")
        why = "asked for"
    if dtype == "auto":
        if dev.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(dev, "bf16", False, f"{why}; bf16 autocast is supported")
            return Precision(dev, "fp16", True, f"{why}; no bf16 on this GPU: fp16 + grad scaler")
        if dev.type == "mps":
            return Precision(dev, "bf16", False, f"{why}; bf16 autocast on the Apple GPU")
        flag = cpu_bf16_native()
        hint = (f"fp32 is exact; this CPU has {flag}: --train.dtype=bf16 is faster" if flag
                else "fp32 is fastest and exact on CPU")  # fmt: skip
        return Precision(dev, "fp32", False, f"{why}; {hint}")
    if dtype not in DTYPES:
        raise UserError(f"train.dtype: unknown dtype '{dtype}' (auto, fp32, bf16, fp16)")
    if dtype == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.dtype=bf16 is not supported on this GPU: use fp16 or auto")
    return Precision(
        dev, dtype, dtype == "fp16" and dev.type == "cuda", f"{why}; asked for {dtype}"
    )


def setup_threads(threads: int) -> int:
    """CPU threads for intra-op parallelism (0 = physical cores). Returns the number used."""
    n = threads or physical_cores()
    torch.set_num_threads(n)
    return n


def enable_tf32() -> None:
    """TF32 matmuls on Ampere+ GPUs: ~8x faster fp32 matmuls with 10-bit mantissas."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_peak_flops(dtype: str = "fp32", remeasure: bool = False) -> float:
    """The CPU's dense matmul rate in FLOP/s at this thread count, for fp32 or bf16: what MFU is
    measured against on a CPU (no datasheet gives an honest figure for one).

    Measured once per machine (2048 x 2048 matmuls, best of a few, under a second per dtype) and
    cached in ~/.cache/lmforge/cpu_peak.json, keyed by CPU model, threads and torch version.
    """
    import json
    import time

    kind = "bf16" if dtype in ("bf16", "fp16") else "fp32"
    key = f"{cpu_model()} | threads {torch.get_num_threads()} | torch {torch.__version__} | {kind}"
    cache_dir = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(cache_dir, "lmforge", "cpu_peak.json")
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    if not remeasure and isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    n = 2048
    rng = torch.Generator().manual_seed(0)  # its own: a run's RNG stream must not depend on it
    a = torch.rand(n, n, generator=rng).to(DTYPES[kind])
    b = torch.rand(n, n, generator=rng).to(DTYPES[kind])
    a @ b  # warm-up: thread pool, packing buffers
    best, deadline = float("inf"), time.perf_counter() + 0.6
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    peak = 2 * n**3 / best
    cached[key] = peak
    try:
        from lmforge.files import write_json

        write_json(path, cached)
    except Exception:  # a read-only home: measured again next time, nothing worse
        pass
    return peak


def environment(remeasure: bool = False) -> dict[str, str]:
    """What `lmforge env` prints."""
    precision = pick()
    flash = "no CUDA device"
    if torch.cuda.is_available():
        flash = "yes" if torch.backends.cuda.flash_sdp_enabled() else "disabled"
    try:
        import importlib

        importlib.import_module("torch._dynamo")
        compile_ok = "yes (torch.compile importable)"
    except Exception as e:  # an optional feature: report, do not fail
        compile_ok = f"no ({type(e).__name__})"
    bf16_flag = cpu_bf16_native()
    info = {
        "torch": torch.__version__,
        "device": str(precision.device),
        "precision": f"{precision.dtype} ({precision.reason})",
        "threads": f"{torch.get_num_threads()} (physical cores: {physical_cores()}, "
        f"logical: {os.cpu_count()})",
        "compile": compile_ok,
        "flash attention": flash,
        "cuda": torch.version.cuda or "none",
        "mps": str(torch.backends.mps.is_available()),
        "cpu bf16": (
            f"native ({bf16_flag}): --train.dtype=bf16 is faster on CPU"
            if bf16_flag
            else "not native (fp32 is fastest on CPU)"
        ),  # fmt: skip
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        peaks = [
            f"{kind} {cpu_peak_flops(kind, remeasure) / 1e9:,.0f}" for kind in ("fp32", "bf16")
        ]
        info["cpu peak"] = (f"{', '.join(peaks)} GFLOP/s (2048^2 matmul, {torch.get_num_threads()} "
                            "threads; MFU on this CPU is measured against it)")  # fmt: skip
    return info

"""MFU on one CUDA GPU: `gpt2-124m` and `seed-59m` at context 1024 across batch sizes, each step
lmforge's own (`Trainer.train_step`: bf16 autocast, torch.compile, fused AdamW, clipping).

Random tokens (the speed does not depend on them), a fresh model and compilation per batch size.
For each: ms/step, tokens/s, MFU (lmforge's formula against the GPU's bf16 peak), peak memory; a
batch size that runs out of memory ends that preset's sweep and is reported as OOM. For each
preset's best batch size, the 10 CUDA kernels that took the most time (torch.profiler), and the
wall time of the seed's run (50,000 steps of 65,536 tokens) at the measured rate.

    python bench/gpu_mfu.py                               # batch 8, 16, 32, 64; no accumulation
    python bench/gpu_mfu.py --global-batch-tokens 65536   # accumulate to the seed's step
    python bench/gpu_mfu.py --peak-tflops 989             # a GPU lmforge does not know by name
    python bench/gpu_mfu.py --smoke                       # CPU, tiny, 3 steps: the code path
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

import numpy as np
import torch
from common import dump, report

from lmforge.config import model_config
from lmforge.data.memmap import TokenBatches
from lmforge.device import pick
from lmforge.info import flops_per_token
from lmforge.model import Transformer
from lmforge.monitor.metrics import mfu, peak_flops_for
from lmforge.train.trainer import Trainer, TrainSettings

SEED_STEPS, SEED_TOKENS_PER_STEP = 50_000, 65_536  # the seed's seed-59m run


def build_trainer(preset: str, batch: int, accum: int, args: argparse.Namespace) -> Trainer:
    cfg = model_config(preset, context=args.context)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 4_000_000, dtype=np.uint16)
    precision = pick(args.device, args.dtype)
    batches = TokenBatches(tokens, args.context, batch, seed=0, device=precision.device)
    settings = TrainSettings.for_api(
        grad_accum=accum,
        max_steps=10**9,
        lr=3e-4,
        flops_per_token=flops_per_token(cfg, args.context),
        peak_flops=args.peak_flops,
    )
    return Trainer(model, batches, device=precision, settings=settings,
                   log=lambda line: None, compile_model=args.compile)  # fmt: skip


def measure(preset: str, batch: int, accum: int, args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.steps` steps after `args.warmup_steps` (compilation); profile the kernels."""
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(preset, batch, accum, args)
    for _ in range(args.warmup_steps):
        trainer.train_step()
    synchronize(cuda)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = trainer.train_step()
    synchronize(cuda)
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_step = batch * accum * args.context
    tokens_per_s = tokens_per_step / seconds
    s = trainer.settings
    use = mfu(s.flops_per_token, tokens_per_s, device_name(args.device), args.dtype, s.peak_flops)
    kernels = top_kernels(trainer) if args.profile else []
    return {
        "preset": preset,
        "batch_size": batch,
        "grad_accum": accum,
        "tokens_per_step": tokens_per_step,
        "ms_per_step": 1000 * seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": use,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "last_loss": loss,
        "top_kernels": kernels,
    }


def top_kernels(trainer: Trainer, steps: int = 3, top: int = 10) -> list[dict[str, Any]]:
    """The CUDA kernels that took the most GPU time over `steps` steps, per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels) or 1
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [
        {
            "kernel": e.key,
            "ms_per_step": e.self_device_time_total / 1000 / steps,
            "share": e.self_device_time_total / total,
            "calls_per_step": e.count / steps,
        }
        for e in kernels[:top]
    ]


def sweep(preset: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per batch size, in order, each printed as it is measured (a run cut short still
    says what it got); the first batch size that runs out of memory is the last row."""
    rows: list[dict[str, Any]] = []
    for batch in args.batch_sizes:
        accum, rest = 1, 0
        if args.global_batch_tokens:
            accum, rest = divmod(args.global_batch_tokens, batch * args.context)
        out_of_memory = False
        if rest or not accum:
            why = f"does not divide --global-batch-tokens {args.global_batch_tokens}"
            rows.append({"preset": preset, "batch_size": batch, "skipped": why})
        else:
            try:
                rows.append(measure(preset, batch, accum, args))
            except torch.OutOfMemoryError:
                out_of_memory = True  # freed below, outside the handler that holds the frames
            release(args)
        if out_of_memory:
            rows.append({"preset": preset, "batch_size": batch, "skipped": "out of memory"})
        print_row(rows[-1])
        if out_of_memory:
            break
    return rows


def release(args: argparse.Namespace) -> None:
    """Free the last model, its optimizer and its compiled code before the next batch size."""
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    if args.compile:
        torch.compiler.reset()  # else the next batch size is compiled with dynamic shapes


def synchronize(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else device


def print_head() -> None:
    head = f"{'preset':<12}{'batch':>6}{'accum':>6}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}"
    print(head + f"{'peak mem':>12}{'loss':>8}", flush=True)


def print_row(r: dict[str, Any]) -> None:
    if "skipped" in r:
        print(f"{r['preset']:<12}{r['batch_size']:>6}  {r['skipped']}", flush=True)
        return
    use = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    memory = r["peak_memory_gib"]
    memory_text = f"{memory:.1f} GiB" if memory is not None else "n/a"
    print(
        f"{r['preset']:<12}{r['batch_size']:>6}{r['grad_accum']:>6}{r['ms_per_step']:>10.1f}"
        f"{r['tokens_per_s']:>12,.0f}{use:>8}{memory_text:>12}{r['last_loss']:>8.2f}",
        flush=True,
    )


def best_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each preset's fastest batch size (tokens/s)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if "skipped" in r:
            continue
        if r["preset"] not in best or r["tokens_per_s"] > best[r["preset"]]["tokens_per_s"]:
            best[r["preset"]] = r
    return best


def seed_run_hours(tokens_per_s: float) -> float:
    return SEED_STEPS * SEED_TOKENS_PER_STEP / tokens_per_s / 3600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="gpt2-124m,seed-59m")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="sequences per micro-batch")
    parser.add_argument(
        "--global-batch-tokens",
        type=int,
        default=0,
        help="accumulate micro-batches to this many tokens a step (0: none)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed (compilation)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=0.0,
        help="the GPU's dense bf16 peak (0: from its name; H100/H200 989)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the kernel table")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="on the CPU: tiny, batch 2, context 64, 3 steps, no compile or profiler "
        "(checks this script, measures nothing)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.presets, args.context, args.batch_sizes = "tiny", 64, "2"
        args.steps, args.warmup_steps, args.global_batch_tokens = 3, 1, 0
        args.device, args.dtype, args.compile, args.profile = "cpu", "fp32", False, False
    elif not torch.cuda.is_available():
        print("gpu_mfu: needs a CUDA GPU (--smoke runs its code path on a CPU)", file=sys.stderr)
        sys.exit(2)
    else:
        args.device, args.dtype, args.compile = "cuda", "bf16", True
        args.profile = not args.no_profile
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    name = device_name(args.device)
    args.peak_flops = args.peak_tflops * 1e12 or peak_flops_for(name, args.dtype)
    where = "--peak-tflops" if args.peak_tflops else "lmforge's table, by name"
    peak_text = f"{args.peak_flops / 1e12:.0f} TFLOP/s ({where})" if args.peak_flops else "unknown"

    print(f"{name}, peak {args.dtype} {peak_text}, context {args.context}, compile {args.compile}")
    print_head()
    rows = [row for preset in args.presets.split(",") for row in sweep(preset, args)]
    best = best_rows(rows)
    for preset, r in best.items():
        print(f"\ntop CUDA kernels of {preset}, batch {r['batch_size']} x {r['grad_accum']}:")
        if not r["top_kernels"]:
            print("  (not profiled)")
        for k in r["top_kernels"]:
            print(f"  {k['ms_per_step']:8.2f} ms {100 * k['share']:5.1f}%  "
                  f"{k['calls_per_step']:6.1f}x  {k['kernel'][:90]}")  # fmt: skip
    projected = best.get("seed-59m") or next(iter(best.values()), None)
    seed_run = None
    if projected is not None:
        seed_run = {"preset": projected["preset"], "batch_size": projected["batch_size"],
                    "grad_accum": projected["grad_accum"],
                    "hours": seed_run_hours(projected["tokens_per_s"])}  # fmt: skip
        print(
            f"\nthe seed run ({SEED_STEPS:,} steps x {SEED_TOKENS_PER_STEP:,} tokens) at "
            f"{projected['preset']}'s best rate ({projected['tokens_per_s']:,.0f} tokens/s, "
            f"batch {projected['batch_size']} x {projected['grad_accum']}): "
            f"{seed_run['hours']:.1f} h"
        )
    result_name = "gpu_mfu_smoke" if args.smoke else "gpu_mfu"
    report(result_name, {"config": vars(args), "peak_flops": args.peak_flops, "results": rows,
                         "seed_run": seed_run})  # fmt: skip
    dump(result_name)


if __name__ == "__main__":
    main()

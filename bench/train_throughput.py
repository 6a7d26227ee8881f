"""Training throughput: tokens/s and MFU of `lmforge train` for model presets, on whatever device
this machine has (on CUDA: bf16 autocast, torch.compile and fused AdamW, the defaults there).

Each preset trains for a few dozen steps on the built-in stories (GPT-2 tokenizer) with no
evaluation or samples in between; the figures are medians over the logged windows after the first
(which holds the compiler's and the allocator's first steps).

    python bench/train_throughput.py                          # gpt2-124m and seed-59m at 1024
    python bench/train_throughput.py --nproc 1                # the same under torchrun (NCCL/gloo)
    python bench/train_throughput.py --presets tiny --context 256 --tokenizer char   # on a CPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import dump, report

ROOT = Path(__file__).resolve().parents[1]


def prepare(out: Path, tokenizer: str, size_mb: float) -> Path:
    data = out / f"stories-{tokenizer}"
    if not (data / "meta.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "lmforge",
            "prepare",
            "--builtin",
            "stories",
            "--size-mb",
            str(size_mb),
            "--tokenizer",
            tokenizer,
            "--out",
            str(data),
            "--overwrite",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
    return data


def train(preset: str, data: Path, run: Path, args: argparse.Namespace) -> dict:
    launcher = [sys.executable, "-m", "lmforge"]
    if args.nproc:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={args.nproc}",
            "--standalone",
            "-m",
            "lmforge",
        ]
    shutil.rmtree(run, ignore_errors=True)
    cmd = [
        *launcher,
        "train",
        f"--data.dir={data}",
        f"--run.dir={run}",
        f"--model.preset={preset}",
        f"--model.context={args.context}",
        f"--train.batch_size={args.batch_size}",
        f"--train.grad_accum={args.grad_accum}",
        f"--train.max_steps={args.steps}",
        f"--train.dtype={args.dtype}",
        f"--train.compile={args.compile}",
        f"--log.log_every={args.log_every}",
        "--train.eval_every=0",
        "--train.eval_batches=1",
        "--train.save_every=0",
        "--train.save_every_minutes=0",
        "--train.sample_every=0",
        "--log.plot_every=0",
        "--schedule.warmup_steps=10",
        "--train.resume=none",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{preset}: lmforge train failed:\n{result.stderr[-3000:]}")
    header = result.stdout.splitlines()[:2]
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("tokens_per_s")][1:]  # the first window holds warm-up steps
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    return {
        "preset": preset,
        "header": header,
        "steps_timed": len(rows) * args.log_every,
        "ms_per_step": statistics.median(r["ms_per_step"] for r in rows),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_memory_mb": max(r["memory_mb"] for r in rows),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="gpt2-124m,seed-59m")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), fp32, bf16, fp16")
    parser.add_argument("--compile", default="auto", help="auto (on for CUDA), true, false")
    parser.add_argument("--nproc", type=int, default=0, help="processes under torchrun (0 = none)")
    parser.add_argument("--tokenizer", default="gpt2")
    parser.add_argument("--size-mb", type=float, default=8.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "runs"))
    args = parser.parse_args()
    out = Path(args.out)
    data = prepare(out, args.tokenizer, args.size_mb)
    results = [train(p, data, out / f"throughput-{p}", args) for p in args.presets.split(",")]

    launch = f"torchrun --nproc_per_node={args.nproc}" if args.nproc else "one process"
    print(
        f"{launch}, context {args.context}, batch {args.batch_size} x {args.grad_accum}, "
        f"{args.steps} steps, dtype {args.dtype}, compile {args.compile}"
    )
    print(f"{'preset':<12}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}{'peak mem':>12}{'loss':>16}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(
            f"{r['preset']:<12}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12,.0f}{mfu:>8}"
            f"{r['peak_memory_mb']:>9,.0f} MB{r['first_loss']:>8.2f}->{r['last_loss']:.2f}"
        )
    for r in results:
        print(f"{r['preset']}: {' / '.join(r['header'])}")
    name = "train_throughput" + (f"_torchrun{args.nproc}" if args.nproc else "")
    report(name, {"config": vars(args), "results": results})
    dump(name)


if __name__ == "__main__":
    main()

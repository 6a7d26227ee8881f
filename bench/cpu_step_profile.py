"""Where a CPU training step goes: torch.profiler over lmforge's step at nanoGPT's shape.

    python bench/cpu_step_profile.py [--block llama] [--threads 1] [--steps 10] [--top 15]

The step is `Trainer.train_step` (forward, chunked loss, backward, clip, AdamW), built as in
bench/cpu_vs_nanogpt_shape.py (4 x 128, 4 heads, batch 12 x 64, char vocabulary, fp32), or the
in-run nanoGPT baseline of that benchmark (`--block baseline`). Prints the top operators by self
CPU time and the share of the step spent in matrix products, and writes bench/results/NAME.json.
The profiler adds a few microseconds to every operator, so small-operator shares read high; the
un-profiled step time is measured first and printed beside them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import dump, report
from cpu_vs_nanogpt_shape import INPUT, ROOT, Baseline, lmforge_trainer, prepare
from torch.profiler import ProfilerActivity, profile

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", default="llama", help="llama, gpt2 or baseline")
    parser.add_argument("--set", action="append", default=[], help="lmforge override KEY=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--name", default=None, help="default: cpu_step_profile_BLOCK")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = prepare(INPUT, ROOT / "bench" / "runs" / "shakespeare-char")
    if args.block == "baseline":
        step = Baseline(data, 67, 2000).step
    else:
        overrides = [f"--model.block={args.block}", *(f"--{kv}" for kv in args.set)]
        step = lmforge_trainer(data, overrides, 2000).train_step
    for _ in range(5):
        step()
    times = []
    for _ in range(30):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [
        {
            "op": e.key,
            "ms_per_step": round(e.self_cpu_time_total / 1000 / args.steps, 3),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls_per_step": e.count // args.steps,
        }
        for e in events[: args.top]
    ]
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL) / total
    calls = sum(e.count for e in events) // args.steps
    step_ms = statistics.median(times)
    print(f"{args.block} {' '.join(args.set)}: {step_ms:.1f} ms/step un-profiled (median of 30), "
          f"{total / 1000 / args.steps:.1f} ms profiled, {calls} operator calls a step, "
          f"matrix products {100 * matmul:.0f} % of profiled time")  # fmt: skip
    print(f"{'operator':<56}{'ms/step':>9}{'share':>8}{'calls':>7}")
    for op in ops:
        print(f"{op['op'][:55]:<56}{op['ms_per_step']:>9.2f}{100 * op['share']:>7.1f}%"
              f"{op['calls_per_step']:>7}")  # fmt: skip
    name = args.name or f"cpu_step_profile_{args.block}"
    report(name, {"config": vars(args), "step_ms": round(step_ms, 2),
                  "profiled_ms": round(total / 1000 / args.steps, 2), "calls_per_step": calls,
                  "matmul_share": round(matmul, 3), "top": ops})  # fmt: skip
    dump(name)


if __name__ == "__main__":
    main()

"""Peak memory of one training step with and without activation checkpointing.

Each variant runs in a fresh process (peak resident memory during forward + backward minus what
the process held before the step). Prints a table and writes JSON.

    python bench/activation_memory.py [--layers 8] [--dim 256] [--batch 8] [--context 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from common import dump, report


def child(args: argparse.Namespace) -> None:
    from lmforge.config import model_config
    from lmforge.model import Transformer

    torch.manual_seed(0)
    cfg = model_config(
        "tiny",
        n_layers=args.layers,
        dim=args.dim,
        n_heads=args.dim // 64,
        context=args.context,
        max_context=max(1024, args.context),
        vocab_size=args.vocab,
    )
    model = Transformer(cfg)
    model.activation_checkpointing = args.variant == "checkpointed"
    x = torch.randint(0, args.vocab, (args.batch, args.context))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss = model(x, x)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "variant": args.variant,
                "loss": float(loss),
                "seconds": seconds,
                "step_peak_mib": (peak - before) / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--variant", choices=("plain", "checkpointed"))
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    rows = {}
    for variant in ("plain", "checkpointed"):
        cmd = [sys.executable, __file__, "--variant", variant]
        for key in ("layers", "dim", "batch", "context", "vocab"):
            cmd += [f"--{key}", str(getattr(args, key))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    ratio = rows["checkpointed"]["step_peak_mib"] / rows["plain"]["step_peak_mib"]
    result = {
        "config": {k: getattr(args, k) for k in ("layers", "dim", "batch", "context", "vocab")},
        "rows": rows,
        "ratio_checkpointed_over_plain": round(ratio, 3),
    }
    report("activation_memory", result)
    print(f"{'variant':<13} {'step peak (MiB)':>16} {'step (s)':>9} {'loss':>9}")
    for name, row in rows.items():
        print(
            f"{name:<13} {row['step_peak_mib']:>16,.1f} {row['seconds']:>9.2f} {row['loss']:>9.5f}"
        )
    print(f"checkpointed / plain peak = {ratio:.3f}")
    dump("activation_memory")


if __name__ == "__main__":
    main()

"""Peak memory of one training step: chunked LM-head loss vs the plain full-logits computation.

Each variant runs in a fresh process; its peak resident memory during forward + backward minus
the memory it held just before the step is the step's peak. Prints a table and writes JSON.

    python bench/loss_memory.py [--batch 8] [--context 512] [--vocab 50304]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from common import dump, report


def child(args: argparse.Namespace) -> None:
    from lmforge.config import model_config
    from lmforge.loss import plain_cross_entropy
    from lmforge.model import Transformer

    torch.manual_seed(0)
    cfg = model_config(
        "tiny",
        n_layers=2,
        dim=args.dim,
        n_heads=4,
        context=args.context,
        max_context=max(1024, args.context),
        vocab_size=args.vocab,
        pad_vocab_multiple=1,
    )
    model = Transformer(cfg)
    x = torch.randint(0, args.vocab, (args.batch, args.context))
    y = torch.randint(0, args.vocab, (args.batch, args.context))

    def step() -> float:
        if args.variant == "chunked":
            loss = model(x, y)
        else:  # the same model, but the head and the loss on full logits
            hidden = model.norm_f(run_blocks(model, x))
            loss = plain_cross_entropy(hidden, model.lm_head.weight, y)
        loss.backward()
        model.zero_grad(set_to_none=False)  # grads stay allocated: both variants hold them
        return float(loss)

    model.zero_grad(set_to_none=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "variant": args.variant,
                "loss": loss,
                "before_kib": before,
                "peak_kib": peak,
                "step_peak_mib": (peak - before) / 1024,
            }
        )
    )


def run_blocks(model, x):
    h = model.wte(x)
    for block in model.blocks:
        h = block(
            h,
            model.rope(None, 0, x.shape[1]),
            None,
        )
    return h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--variant", choices=("chunked", "plain"))
    args = parser.parse_args()
    if args.variant:
        child(args)
        return
    rows = []
    for variant in ("plain", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--batch",
            str(args.batch),
            "--context",
            str(args.context),
            "--vocab",
            str(args.vocab),
            "--dim",
            str(args.dim),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    plain, chunked = rows
    ratio = chunked["step_peak_mib"] / plain["step_peak_mib"]
    logits_mib = args.batch * args.context * args.vocab * 4 / 2**20
    result = {
        "config": {
            "batch": args.batch,
            "context": args.context,
            "vocab": args.vocab,
            "dim": args.dim,
            "layers": 2,
            "fp32 logits MiB": round(logits_mib, 1),
        },
        "plain_step_peak_mib": round(plain["step_peak_mib"], 1),
        "chunked_step_peak_mib": round(chunked["step_peak_mib"], 1),
        "ratio_chunked_over_plain": round(ratio, 3),
        "loss_plain": plain["loss"],
        "loss_chunked": chunked["loss"],
        "target": "ratio <= 0.5",
    }
    report("loss_memory", result)
    print(f"{'variant':<10} {'step peak (MiB)':>16} {'loss':>10}")
    print(f"{'plain':<10} {plain['step_peak_mib']:>16,.1f} {plain['loss']:>10.5f}")
    print(f"{'chunked':<10} {chunked['step_peak_mib']:>16,.1f} {chunked['loss']:>10.5f}")
    print(f"chunked / plain = {ratio:.3f}   (target <= 0.5)")
    dump("loss_memory")


if __name__ == "__main__":
    main()

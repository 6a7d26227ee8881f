"""KV-cached vs uncached decoding speed at 512 new tokens (target: cached >= 10x faster).

python bench/generate_speed.py [--new-tokens 512] [--layers 6] [--dim 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import dump, report

from lmforge.config import model_config
from lmforge.model import Transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="prompts decoded together (batch 1 on a CPU is bound by reading the "
        "weights once per token; a batch shares that read)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    context = args.prompt_tokens + args.new_tokens
    cfg = model_config(
        "tiny",
        n_layers=args.layers,
        dim=args.dim,
        n_heads=args.dim // 64,
        context=context,
        max_context=context,
        vocab_size=args.vocab,
    )
    model = Transformer(cfg).eval()
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_tokens)).tolist()
    model.generate(prompts, 8, temperature=0)  # warm-up
    rows, outputs = {}, {}
    for name, use_cache in (("cached", True), ("uncached", False)):
        start = time.perf_counter()
        outputs[name] = model.generate(prompts, args.new_tokens, temperature=0, use_cache=use_cache)
        seconds = time.perf_counter() - start
        rows[name] = {
            "seconds": round(seconds, 3),
            "tokens_per_s": round(args.batch * args.new_tokens / seconds, 1),
        }
    speedup = rows["cached"]["tokens_per_s"] / rows["uncached"]["tokens_per_s"]
    result = {
        "config": {**vars(args), "params": sum(p.numel() for p in model.parameters())},
        **rows,
        "speedup": round(speedup, 2),
        "same_tokens": outputs["cached"] == outputs["uncached"],
        "target": "speedup >= 10",
    }
    report("generate_speed", result)
    print(f"{'decoding':<10} {'seconds':>9} {'tokens/s':>10}")
    for name, row in rows.items():
        print(f"{name:<10} {row['seconds']:>9.2f} {row['tokens_per_s']:>10.1f}")
    print(
        f"speedup {speedup:.1f}x (target >= 10x); identical greedy tokens: {result['same_tokens']}"
    )
    dump("generate_speed")


if __name__ == "__main__":
    main()

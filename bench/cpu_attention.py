"""CPU attention: which kernel a model on a CPU should use, at which shape and precision.

python bench/cpu_attention.py [--repeats 15] [--parts sdpa,small]

1. sdpa: forward + backward of `F.scaled_dot_product_attention` (causal, and with an explicit
   boolean mask as instruction tuning passes) at the demo's shapes and a few larger ones, in bf16
   and fp32: why a bf16-autocast model runs SDPA in fp32 on a CPU. A ratio above 1 means fp32 is
   faster.
2. small: causal attention of few positions, SDPA's flash kernel (fp32) against lmforge's
   `_small_causal_attention` (two batched products and a softmax) in fp32 and under bf16
   autocast: why a bf16 model uses the latter up to `SMALL_CONTEXT` positions.
Variants are interleaved so the machine's drift hits them alike; medians of --rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import dump, report

from lmforge.model import SMALL_CONTEXT, _small_causal_attention

# (B, H, T, D): the demo's pretraining (4 x 6 heads of 16) and SFT batch, then larger heads.
SHAPES = [(4, 6, 256, 16), (16, 6, 256, 16), (4, 4, 256, 32), (4, 4, 256, 64), (2, 12, 512, 64)]
# nanoGPT's CPU shape (12 x 4 heads of 32, block 64), then more heads, longer, and the demo's.
SMALL_SHAPES = [
    (12, 4, 64, 32),
    (12, 8, 64, 16),
    (12, 4, 128, 32),
    (4, 6, 128, 16),
    (4, 6, 256, 16),
]


def ms_per_call(step, repeats: int) -> float:
    """Milliseconds per call of `step`, after two untimed calls."""
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1000


def time_one(shape, dtype, masked: bool, repeats: int) -> float:
    B, H, T, D = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, T, D, generator=gen).to(dtype)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril() if masked else None

    def step() -> None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y.backward(grad)

    return ms_per_call(step, repeats)


def time_small(shape, kernel: str, repeats: int) -> float:
    """flash (SDPA, fp32), small (fp32) or small-bf16 (bf16 inputs under CPU autocast)."""
    B, H, T, D = shape
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if kernel == "small-bf16" else torch.float32
    # As in the model: q, k, v are views of one (B, T, 3 x H x D) projection, (B, H, T, D) by a
    # transpose (not contiguous), and the output goes back to (B, T, H x D) for the next product.
    qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(B, T, H * D, generator=gen).to(dtype)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=kernel == "small-bf16"):
            q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
            if kernel == "flash":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = _small_causal_attention(q, k, v)
        y.transpose(1, 2).reshape(B, T, H * D).backward(grad)

    return ms_per_call(step, repeats)


def small(args: argparse.Namespace) -> list[dict]:
    rows = []
    print(f"\ncausal, forward + backward, ms (a bf16 model uses 'small' to T = {SMALL_CONTEXT})")
    print(f"{'B x H x T x D':>18} {'flash fp32':>11} {'small fp32':>11} {'small bf16':>11} "
          f"{'flash/small':>12}")  # fmt: skip
    for shape in SMALL_SHAPES:
        times: dict[str, list[float]] = {"flash": [], "small": [], "small-bf16": []}
        for _ in range(args.rounds):
            for kernel in times:
                times[kernel].append(time_small(shape, kernel, args.repeats))
        ms = {kernel: statistics.median(t) for kernel, t in times.items()}
        rows.append({"shape": list(shape), **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                     "flash_over_small": round(ms["flash"] / ms["small"], 2)})  # fmt: skip
        name = " x ".join(map(str, shape))
        print(f"{name:>18} {ms['flash']:11.2f} {ms['small']:11.2f} {ms['small-bf16']:11.2f} "
              f"{ms['flash'] / ms['small']:12.2f}")  # fmt: skip
    return rows


def sdpa(args: argparse.Namespace) -> list[dict]:
    rows = []
    print(f"{'B x H x T x D':>18} {'mask':>6} {'bf16 ms':>9} {'fp32 ms':>9} {'bf16/fp32':>10}")
    for shape in SHAPES:
        for masked in (False, True):
            times: dict[str, list[float]] = {"bf16": [], "fp32": []}
            for _ in range(args.rounds):
                times["bf16"].append(time_one(shape, torch.bfloat16, masked, args.repeats))
                times["fp32"].append(time_one(shape, torch.float32, masked, args.repeats))
            bf16, fp32 = statistics.median(times["bf16"]), statistics.median(times["fp32"])
            rows.append(
                {
                    "shape": list(shape),
                    "mask": masked,
                    "bf16_ms": round(bf16, 2),
                    "fp32_ms": round(fp32, 2),
                    "ratio": round(bf16 / fp32, 2),
                }
            )
            name = " x ".join(map(str, shape))
            kind = "bool" if masked else "causal"
            print(f"{name:>18} {kind:>6} {bf16:9.2f} {fp32:9.2f} {bf16 / fp32:10.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--parts", default="sdpa,small", help="of sdpa, small")
    args = parser.parse_args()
    result: dict = {"config": vars(args)}
    if "sdpa" in args.parts.split(","):
        result["rows"] = sdpa(args)
    if "small" in args.parts.split(","):
        result["small"] = small(args)
    report("cpu_attention", result)
    dump("cpu_attention")


if __name__ == "__main__":
    main()

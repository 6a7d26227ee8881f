"""CPU attention, bf16 against fp32: why a bf16-autocast model runs SDPA in fp32 on a CPU.

python bench/cpu_attention.py [--repeats 15]

Times forward + backward of `F.scaled_dot_product_attention` (causal, and with an explicit boolean
mask as instruction tuning passes) at the demo's shapes and a few larger ones, in bf16 and fp32,
interleaved so the machine's drift hits both alike. A ratio above 1 means fp32 is faster.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import dump, report

# (B, H, T, D): the demo's pretraining (4 x 6 heads of 16) and SFT batch, then larger heads.
SHAPES = [(4, 6, 256, 16), (16, 6, 256, 16), (4, 4, 256, 32), (4, 4, 256, 64), (2, 12, 512, 64)]


def time_one(shape, dtype, masked: bool, repeats: int) -> float:
    B, H, T, D = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    grad = torch.randn(B, H, T, D, generator=gen).to(dtype)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril() if masked else None

    def step() -> None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y.backward(grad)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    args = parser.parse_args()
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
    report("cpu_attention", {"config": vars(args), "rows": rows})
    dump("cpu_attention")


if __name__ == "__main__":
    main()

"""CPU, nanoGPT's shape: lmforge against a plain PyTorch loop, in tokens/s and in time to val loss.

nanoGPT's CPU recipe ("baby GPT", its README): tinyshakespeare at character level, the first 90 %
to train and the last 10 % to validate; 4 layers x 128, 4 heads, block 64, batch 12, 2,000
iterations, lr 1e-3 with 100 warmup steps and cosine to 1e-4, AdamW betas (0.9, 0.99), weight
decay 0.1, clip 1.0, no dropout, fp32, eager. Its model and loop are written out below (`NanoGPT`,
`baseline_step`): the in-run baseline, so that every figure is a ratio within one run.

    python bench/cpu_vs_nanogpt_shape.py [--threads 1] [--max-load 1.2] [--parts throughput,curves]

Everything reads the same split: `lmforge prepare TRAIN.txt VAL.txt --doc-per-file --tokenizer
char` of the two halves of `--input` (default ../shared/data/tinyshakespeare/input.txt).

1. throughput: (a) the baseline, (b) lmforge's own training step (`Trainer.train_step`, what
   `lmforge train` runs) at the same shape with the gpt2 block as nanoGPT's model (no biases,
   exact GELU: the same parameters), the gpt2 block as GPT-2 (biases, tanh GELU), the llama
   block, the llama block with SwiGLU hidden 8/3 x dim (344: the parameters and FLOPs of the
   GPT-2 MLP, as Llama sizes it), gpt2 and llama compiled (--train.compile=true: inductor's C++
   kernels, fp32), and gpt2 and llama under bf16 autocast (nanoGPT runs fp32 on a CPU), llama
   also compiled; interleaved in rounds of a few steps each, medians, tokens/s as a ratio to (a).
   "first steps" is the time of the untimed warm-up steps: a compiled variant's compilation
   (cached by inductor for the next run: TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) shows a cold one).
2. curves: (a) for 2,000 iterations; (b) `lmforge train` at the same shape and settings; (c) the
   recipe of configs/shakespeare-char.yaml. Each is evaluated every --eval-every steps on about
   the same number of validation tokens (lmforge's fixed val windows; (a) reads the very windows
   (b) does; (c) at its own config's train.eval_every, since an evaluation costs wall time); the
   table gives the time to val 2.0 and 1.88: training time (evaluation excluded) and wall time
   from the start of the run (process start, evaluations and all).
The load average before each part is recorded (and with --max-load the part waits for a quieter
machine first): an absolute time on shared cores is only as good as the load it was taken under.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import dump, load_average, report, wait_for_quiet

from lmforge.config import load_config
from lmforge.data.memmap import TokenBatches
from lmforge.device import pick
from lmforge.model import Transformer
from lmforge.train.optim import build_optimizer
from lmforge.train.pipeline import compiles
from lmforge.train.trainer import TokenFileBatches, Trainer, TrainSettings

ROOT = Path(__file__).resolve().parents[1]
INPUT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RECIPE = ROOT / "configs" / "shakespeare-char.yaml"
TARGETS = (2.0, 1.88)
SEED = 1337  # nanoGPT's and lmforge's default seed

# nanoGPT's CPU recipe, as lmforge options (the same shape and optimizer settings).
SHAPE = dict(n_layers=4, dim=128, n_heads=4, context=64, batch_size=12)
NANOGPT = [
    "--model.n_layers=4",
    "--model.dim=128",
    "--model.n_heads=4",
    "--model.context=64",
    "--model.max_context=64",
    "--model.dropout=0.0",
    "--train.batch_size=12",
    "--train.dtype=fp32",
    "--data.mode=random",
    "--optim.name=adamw",
    "--optim.lr=1e-3",
    "--optim.min_lr=1e-4",
    "--optim.beta2=0.99",
    "--optim.weight_decay=0.1",
    "--schedule.kind=cosine",
    "--schedule.warmup_steps=100",
]
# nanoGPT's model as lmforge's gpt2 block: no biases (nanoGPT's bias=False), exact GELU (nn.GELU).
NANOGPT_GPT2 = ["--model.block=gpt2", "--model.bias=false", "--model.gelu=exact"]


# ------------------------------------------------------------------------------------------------
# (a) nanoGPT's model.py (bias=False, dropout 0, its flash-attention path) and train.py's loop
# ------------------------------------------------------------------------------------------------
class NanoAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = NanoAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, n_layer: int, n_head: int, n_embd: int, block_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(NanoBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def nanogpt_lr(it: int, steps: int, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100):
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > steps:
        return min_lr
    ratio = (it - warmup) / (steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class Baseline:
    """nanoGPT's train.py at its CPU recipe: the model, AdamW groups by rank, one iteration."""

    def __init__(self, data: Path, vocab: int, steps: int):
        torch.manual_seed(SEED)
        self.model = NanoGPT(vocab, 4, 4, 128, 64)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))  # fused: CUDA only
        self.train_bin, self.steps, self.it = data / "train.bin", steps, 0

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.train_bin, dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - 64, (12,))
        x = torch.stack([torch.from_numpy(data[i : i + 64].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + 64].astype(np.int64)) for i in ix])
        return x, y

    def step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = nanogpt_lr(self.it, self.steps)
        x, y = self.get_batch()
        loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.it += 1
        return loss.item()

    @torch.no_grad()
    def validate(self, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        self.model.eval()
        loss = sum(self.model(x, y).item() for x, y in windows) / len(windows)
        self.model.train()
        return loss


# ------------------------------------------------------------------------------------------------
# (b) lmforge's training step, built as `lmforge train` builds it
# ------------------------------------------------------------------------------------------------
def lmforge_trainer(data: Path, overrides: list[str], steps: int) -> Trainer:
    cfg = load_config(None, [*NANOGPT, f"--train.max_steps={steps}", *overrides])
    cfg.model.vocab_size = json.loads((data / "meta.json").read_text())["vocab_size"]
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    precision = pick("cpu", cfg.train.dtype)
    t = cfg.train
    train = TokenBatches(data / "train.bin", cfg.model.context, t.batch_size, t.seed,
                         mode=cfg.data.mode)  # fmt: skip
    return Trainer(
        model,
        TokenFileBatches(train),
        None,
        build_optimizer(model, cfg.optim, precision.device),
        device=precision,
        settings=TrainSettings.from_config(cfg),
        log=lambda line: None,
        compile_model=compiles(cfg, precision),  # --train.compile=true, as `lmforge train` does
    )


def prepare(text_path: Path, out: Path) -> Path:
    """nanoGPT's split, through `lmforge prepare`: train.txt (first 90 %), val.txt (last 10 %)."""
    data = out / "data"
    text = text_path.read_text(encoding="utf-8")
    n = int(len(text) * 0.9)
    if not (data / "meta.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.txt").write_text(text[:n], encoding="utf-8")
        (out / "val.txt").write_text(text[n:], encoding="utf-8")
        cmd = [sys.executable, "-m", "lmforge", "prepare", str(out / "train.txt"),
               str(out / "val.txt"), "--doc-per-file", "--tokenizer", "char", "--context", "64",
               "--val-fraction", "0.1", "--out", str(data), "--overwrite"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    meta = json.loads((data / "meta.json").read_text())
    # Each document ends with an end-of-text token: the halves, each + 1, or the split is wrong.
    assert meta["train_tokens"] == n + 1 and meta["val_tokens"] == len(text) - n + 1, meta
    return data


# ------------------------------------------------------------------------------------------------
# 1. throughput, interleaved
# ------------------------------------------------------------------------------------------------
def throughput(data: Path, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    variants: dict[str, Any] = {"(a) baseline": Baseline(data, vocab, 2000).step}
    bf16, llama = ["--train.dtype=bf16"], ["--model.block=llama"]
    compiled = ["--train.compile=true"]
    for name, extra in (
        ("(b) lmforge gpt2", NANOGPT_GPT2),
        ("(b) gpt2, GPT-2's biases+tanh", ["--model.block=gpt2"]),
        ("(b) lmforge llama", llama),
        ("(b) lmforge llama ffn 344", [*llama, "--model.ffn_hidden=344"]),
        ("(b) lmforge gpt2 compiled", [*NANOGPT_GPT2, *compiled]),
        ("(b) lmforge llama compiled", [*llama, *compiled]),
        ("(b) lmforge gpt2 bf16", [*NANOGPT_GPT2, *bf16]),
        ("(b) lmforge llama bf16", [*llama, *bf16]),
        ("(b) llama bf16 compiled", [*llama, *bf16, *compiled]),
    ):
        variants[name] = lmforge_trainer(data, extra, 2000).train_step
    tokens_per_step = SHAPE["batch_size"] * SHAPE["context"]
    warmup_s = {}  # the first steps: a compiled variant's compilation happens in its first step
    for name, step in variants.items():
        start = time.perf_counter()
        for _ in range(args.warmup_steps):
            step()
        warmup_s[name] = time.perf_counter() - start
    ms: dict[str, list[float]] = {name: [] for name in variants}
    cpu_share: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.round_steps):
                step()
            wall = time.perf_counter() - start
            ms[name].append(1000 * wall / args.round_steps)
            cpu_share[name].append((time.process_time() - cpu) / wall / torch.get_num_threads())
    base = statistics.median(ms["(a) baseline"])
    rows = {
        name: {
            "ms_per_step": round(statistics.median(v), 2),
            "tokens_per_s": round(1000 * tokens_per_step / statistics.median(v)),
            "ratio_to_baseline": round(base / statistics.median(v), 3),
            "ms_per_step_p10_p90": [round(q, 2) for q in statistics.quantiles(v, n=10)[::8]],
            "cpu_share": round(statistics.median(cpu_share[name]), 2),
            "warmup_s": round(warmup_s[name], 2),
        }
        for name, v in ms.items()
    }
    print(f"\nthroughput: {args.rounds} interleaved rounds of {args.round_steps} steps, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'variant':<32}{'ms/step':>9}{'tokens/s':>10}{'x (a)':>8}{'p10..p90 ms':>16}"
          f"{'first steps':>12}")  # fmt: skip
    for name, r in rows.items():
        lo, hi = r["ms_per_step_p10_p90"]
        print(f"{name:<32}{r['ms_per_step']:>9.1f}{r['tokens_per_s']:>10,}"
              f"{r['ratio_to_baseline']:>8.2f}{lo:>8.1f}..{hi:<7.1f}"
              f"{r['warmup_s']:>10.1f} s")  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------------
# 2. curves: time to val 2.0 and 1.88
# ------------------------------------------------------------------------------------------------
def crossings(curve: list[dict[str, float]]) -> dict[str, Any]:
    out = {}
    for target in TARGETS:
        hit = next((p for p in curve if p["val_loss"] <= target), None)
        out[str(target)] = hit and {k: hit[k] for k in ("step", "train_s", "wall_s")}
    return out


def baseline_curve(data: Path, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    start_wall = time.perf_counter()
    run = Baseline(data, vocab, args.steps)
    val = TokenBatches(data / "val.bin", 64, 12, SEED + 1)  # lmforge's val windows at batch 12
    windows = [val.get_batch(i) for i in range(args.eval_batches)]
    curve, train_s = [], 0.0
    for it in range(1, args.steps + 1):
        start = time.perf_counter()
        run.step()
        train_s += time.perf_counter() - start
        if it % args.eval_every == 0 or it == args.steps:
            wall = time.perf_counter() - start_wall
            curve.append({"step": it, "val_loss": round(run.validate(windows), 4),
                          "train_s": round(train_s, 2), "wall_s": round(wall, 2)})  # fmt: skip
    wall = time.perf_counter() - start_wall
    tokens = args.steps * 12 * 64
    return {"curve": curve, "train_s": round(train_s, 2), "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / train_s)}  # fmt: skip


def lmforge_curve(
    data: Path,
    run_dir: Path,
    cli: list[str],
    batch_size: int,
    args: argparse.Namespace,
    eval_every: int | None = None,
) -> dict[str, Any]:
    """`lmforge train` in a child process; eval lines are time-stamped as they are printed."""
    eval_every = eval_every or args.eval_every
    eval_batches = max(1, round(args.eval_batches * 12 / batch_size))  # about the same tokens
    shutil.rmtree(run_dir, ignore_errors=True)  # the bench's own scratch run: every run is new
    cmd = [sys.executable, "-m", "lmforge", "train", *cli, f"--data.dir={data}",
           f"--run.dir={run_dir}", f"--train.threads={args.threads}",
           f"--train.eval_every={eval_every}", f"--train.eval_batches={eval_batches}",
           f"--log.log_every={eval_every}", "--train.sample_every=0",
           "--train.save_every=0", "--train.save_every_minutes=0", "--log.plot_every=0",
           "--log.progress=false", "--train.resume=none"]  # fmt: skip
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    walls, header, lines = {}, [], []
    for line in child.stdout:
        lines.append(line.rstrip())
        if line.startswith("eval step "):
            walls[int(line.split()[2])] = time.perf_counter() - start
        elif len(header) < 3 and not line.startswith("step "):
            header.append(line.rstrip())
    if child.wait() != 0:
        sys.exit("lmforge train failed:\n" + "\n".join(lines[-30:]))
    wall = time.perf_counter() - start
    rows = [json.loads(r) for r in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "val_loss": round(r["val_loss"], 4), "train_s": r["elapsed_s"],
              "wall_s": round(walls.get(r["step"], math.nan), 2)}
             for r in rows if r.get("val_loss") is not None]  # fmt: skip
    last = rows[-1]
    return {"curve": curve, "train_s": last["elapsed_s"], "wall_s": round(wall, 2),
            "tokens_per_s": round(last["tokens_seen"] / last["elapsed_s"]), "header": header,
            "command": "lmforge train " + " ".join(cmd[4:])}  # fmt: skip


def curves(data: Path, vocab: int, args: argparse.Namespace) -> dict[str, Any]:
    out = ROOT / "bench" / "runs" / "shakespeare-char"
    overrides = [f"--{kv}" for kv in args.set]
    recipe = load_config(str(args.recipe), overrides)
    steps = f"--train.max_steps={args.steps}"
    runs = {  # key: (name, lmforge train arguments, or None for the baseline)
        "a": ("(a) baseline", None),
        "b-gpt2": ("(b) lmforge gpt2", [*NANOGPT, *NANOGPT_GPT2, steps]),
        "b-llama": ("(b) lmforge llama", [*NANOGPT, "--model.block=llama", steps]),
        "c": ("(c) recipe", [str(args.recipe), *overrides]),
    }
    chosen = dict(runs[key] for key in args.curves)
    results: dict[str, Any] = {}
    for name, cli in chosen.items():
        quiet = wait_for_quiet(args.max_load, args.max_wait)
        print(f"\n{name}: load average {quiet['load_average']}", flush=True)
        if cli is None:
            result = baseline_curve(data, vocab, args)
        else:
            recipe_run = name.startswith("(c)")
            batch = recipe.train.batch_size if recipe_run else 12
            # (c) evaluates at its own config's train.eval_every: an evaluation is wall time
            every = recipe.train.eval_every if recipe_run and recipe.train.eval_every else None
            slug = name.split(") ")[1].replace(" ", "-")
            result = lmforge_curve(data, out / slug, cli, batch, args, every)
        result["load_before"] = quiet
        result["load_after"] = load_average()
        result["reached"] = crossings(result["curve"])
        results[name] = result
        for point in result["curve"]:
            print(f"  step {point['step']:>5}  val {point['val_loss']:.4f}  "
                  f"train {point['train_s']:7.1f} s  wall {point['wall_s']:7.1f} s")  # fmt: skip
    print(
        f"\ncurves: eval every {args.eval_every} steps ((c): its config's train.eval_every), "
        f"~{args.eval_batches * 12 * 64:,} val tokens each, threads {args.threads}; "
        "time = training (wall incl. start and evals)"
    )
    print(f"{'run':<20}{'tok/s':>9}{'to val 2.0':>22}{'to val 1.88':>22}{'final val':>11}"
          f"{'load':>6}")  # fmt: skip
    for name, r in results.items():
        cells = ""
        for target in TARGETS:
            hit = r["reached"][str(target)]
            text = f"{hit['train_s']:.1f} s ({hit['wall_s']:.1f}) @{hit['step']}" if hit else "-"
            cells += f"{text:>22}"
        load = r["load_before"]["load_average"]
        print(f"{name:<20}{r['tokens_per_s']:>9,}{cells}{r['curve'][-1]['val_loss']:>11.4f}"
              f"{load[0] if load else float('nan'):>6.2f}")  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=INPUT, help="tinyshakespeare input.txt")
    parser.add_argument("--parts", default="throughput,curves")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every variant")
    parser.add_argument("--rounds", type=int, default=20, help="throughput: interleaved rounds")
    parser.add_argument("--round-steps", type=int, default=5, help="throughput: steps a round")
    parser.add_argument("--warmup-steps", type=int, default=5, help="throughput: untimed steps")
    parser.add_argument("--curves", default="a,b-gpt2,c", help="of a, b-gpt2, b-llama, c")
    parser.add_argument("--steps", type=int, default=2000, help="steps of (a) and (b)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-batches", type=int, default=40, help="val batches of 12 x 64")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the config of (c)")
    parser.add_argument("--set", action="append", default=[], help="(c): override KEY=VALUE")
    parser.add_argument("--max-load", type=float, default=0.0, help="wait for a lower 1-min load")
    parser.add_argument("--max-wait", type=float, default=1800, help="seconds to wait at most")
    parser.add_argument("--name", default="cpu_vs_nanogpt_shape", help="bench/results/NAME.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = ROOT / "bench" / "runs" / "shakespeare-char"
    data = prepare(args.input, out)
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    parts = args.parts.split(",")
    result: dict[str, Any] = {"config": {**vars(args), "input": str(args.input),
                                         "recipe": str(args.recipe), "shape": SHAPE}}  # fmt: skip
    if "throughput" in parts:
        quiet = wait_for_quiet(args.max_load, args.max_wait)
        print(f"throughput: load average {quiet['load_average']}")
        result["throughput"] = throughput(data, vocab, args)
        result["throughput_load"] = {"before": quiet, "after": load_average()}
    if "curves" in parts:
        args.curves = [c.strip() for c in args.curves.split(",")]
        result["curves"] = curves(data, vocab, args)
    report(args.name, result)
    dump(args.name)


if __name__ == "__main__":
    main()

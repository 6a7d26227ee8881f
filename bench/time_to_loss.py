"""Time to quality: training wall time for the demo model to reach the entropy floor + 0.5, + 0.3,
+ 0.15, + 0.1 and + 0.05 nats, AdamW vs Muon, on the demo's corpus (built-in stories with their
quiz, byte tokenizer) on this machine's CPU.

Every speed change is judged by this, not only by tokens/s. Each optimizer trains the demo config
(configs/tiny-cpu.yaml) with frequent evaluations; the time is the trainer's own training time
(evaluation excluded) at the first evaluation at or under each threshold.

    python bench/time_to_loss.py [--steps N] [--eval-every 100] [--out bench/runs]

``--steps`` defaults to the config's own ``train.max_steps`` and the precision is the demo's (bf16
on a CPU with native bf16 matmuls), so the bench trains what ``make demo`` does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import dump, report

from lmforge.cli import main as lmforge
from lmforge.device import cpu_bf16_native

ROOT = Path(__file__).resolve().parents[1]
MARGINS = (0.5, 0.3, 0.15, 0.1, 0.05)


def cpu_precision() -> list[str]:
    """bf16 autocast where the CPU has native bf16 matmuls, as `make demo` trains."""
    return ["--train.dtype=bf16"] if cpu_bf16_native() else []


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: the config's max_steps")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--size-mb", type=float, default=4.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "runs"))
    parser.add_argument("--optimizers", default="adamw,muon")
    parser.add_argument("--quiz", type=int, default=3, help="quiz lines per story, as make demo")
    parser.add_argument("--tokenizer", default="byte", help="as make demo")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / f"stories-{args.tokenizer.replace(':', '_')}-q{args.quiz}-{args.size_mb}mb"
    if not (data / "meta.json").is_file():
        assert (
            lmforge(
                [
                    "prepare",
                    "--builtin",
                    "stories",
                    "--size-mb",
                    str(args.size_mb),
                    "--quiz",
                    str(args.quiz),
                    "--tokenizer",
                    args.tokenizer,
                    "--out",
                    str(data),
                ]
            )
            == 0
        )
    floor = json.loads((data / "meta.json").read_text())["entropy_floor_nats_per_token"]
    precision = cpu_precision()  # [] or ["--train.dtype=bf16"], as make demo
    results = {}
    for name in args.optimizers.split(","):
        run = out / f"tiny-{name}"
        shutil.rmtree(run, ignore_errors=True)  # the bench's own scratch run: every run is new
        start = time.time()
        status = lmforge(
            [
                "train",
                str(ROOT / "configs" / "tiny-cpu.yaml"),
                f"--data.dir={data}",
                f"--run.dir={run}",
                f"--optim.name={name}",
                "--train.resume=none",
                *([f"--train.max_steps={args.steps}"] if args.steps else []),
                *precision,
                f"--train.eval_every={args.eval_every}",
                "--train.eval_batches=10",
                "--train.sample_every=0",
                "--log.plot_every=0",
                "--train.save_every=0",
                "--train.save_every_minutes=0",
            ]
        )
        assert status == 0, f"training with {name} failed"
        rows = read_rows(run)
        evals = [(r["elapsed_s"], r["step"], r["val_loss"]) for r in rows if r.get("val_loss")]
        reached = {}
        for margin in MARGINS:
            hit = next(((t, s) for t, s, v in evals if v <= floor + margin), None)
            reached[f"floor+{margin}"] = {"seconds": hit[0], "step": hit[1]} if hit else None
        train_rows = [r for r in rows if r.get("tokens_per_s")]
        results[name] = {
            "reached": reached,
            "best_val_loss": min(v for _, _, v in evals),
            "steps": rows[-1]["step"],
            "training_seconds": rows[-1]["elapsed_s"],
            "wall_seconds": round(time.time() - start, 1),
            "tokens_per_s": round(rows[-1]["tokens_seen"] / rows[-1]["elapsed_s"]),
            "mean_logged_tokens_per_s": round(
                sum(r["tokens_per_s"] for r in train_rows) / max(1, len(train_rows))
            ),
        }
    result = {
        "config": {
            "model": "configs/tiny-cpu.yaml",
            "eval_every": args.eval_every,
            "corpus_mb": args.size_mb,
            "quiz": args.quiz,
            "tokenizer": args.tokenizer,
            "entropy_floor": floor,
            "precision": "bf16" if precision else "default",
        },
        "results": results,
    }
    report("time_to_loss", result)
    header = "".join(f"{'to floor+' + str(m):>16}" for m in MARGINS)
    print(f"{'optimizer':<10}{header}{'best val':>10}{'tok/s':>9}")
    for name, r in results.items():
        cells = "".join(
            f"{(str(round(h['seconds'])) + ' s @' + str(h['step'])) if h else 'not reached':>16}"
            for h in r["reached"].values()
        )
        print(f"{name:<10}{cells}{r['best_val_loss']:>10.4f}{r['tokens_per_s']:>9,}")
    dump("time_to_loss")


if __name__ == "__main__":
    main()

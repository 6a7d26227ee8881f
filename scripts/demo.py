"""`make demo`: the whole pipeline on the built-in story corpus, offline, on a laptop CPU.

prepare the stories -> pretrain `tiny` -> story Q&A accuracy before SFT -> SFT on the story Q&A ->
accuracy after -> a short scripted chat -> report. Each stage is the same `lmforge` command a user
would type (printed before it runs), so the demo doubles as a tour of the CLI. It lives beside the
package, not in it: it reads the checkout's configs/.

    python scripts/demo.py --out demo_out
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

from lmforge.cli import main as lmforge

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    print(f"\n$ lmforge {' '.join(args)}", flush=True)
    status = lmforge(list(args))
    if status != 0:
        raise SystemExit(f"demo: `lmforge {args[0]}` failed with status {status}")


def run_quiet(*args: str) -> str:
    """Run a command, keep its output (for a figure the demo prints itself)."""
    print(f"\n$ lmforge {' '.join(args)}", flush=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = lmforge(list(args))
    print(buffer.getvalue(), end="", flush=True)
    if status != 0:
        raise SystemExit(f"demo: `lmforge {args[0]}` failed with status {status}")
    return buffer.getvalue()


def config_path(name: str) -> str:
    for base in (ROOT / "configs", Path.cwd() / "configs"):
        if (base / name).is_file():
            return str(base / name)
    raise SystemExit(f"demo: configs/{name} not found (run the demo from the lmforge checkout)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/demo.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo_out", help="folder for data, runs and report")
    parser.add_argument("--size-mb", type=float, default=4.0, help="built-in corpus size")
    parser.add_argument(
        "--quiz", type=int, default=2, help="quiz lines after each story (prepare --quiz)"
    )
    parser.add_argument("--fast", action="store_true", help="a 1-minute smoke version")
    args = parser.parse_args(argv)
    start = time.time()
    out = Path(args.out)
    data, pre, sft = out / "stories", out / "pretrain", out / "sft"
    quick = ["--train.max_steps=40", "--train.eval_every=20"] if args.fast else []

    print("lmforge demo: built-in stories -> pretrain tiny -> SFT -> eval -> chat -> report")
    for previous in (pre, sft):  # the demo's own runs of an earlier `make demo`: start afresh
        if previous.is_dir():
            print(f"(removing the previous demo run {previous})")
            shutil.rmtree(previous)
    precision = cpu_precision()
    run("env")
    for preset in ("tiny", "seed-59m", "trm-23m", "trm-51m", "gpt2-124m"):
        run("model-info", preset, "--batch", "8")
    if not (data / "meta.json").is_file():
        run(
            "prepare",
            "--builtin",
            "stories",
            "--size-mb",
            str(args.size_mb),
            "--seed",
            "0",
            "--quiz",
            str(args.quiz),
            "--out",
            str(data),
        )
    else:
        print(f"\n(reusing the prepared corpus in {data})")
    run(
        "train",
        config_path("tiny-cpu.yaml"),
        f"--data.dir={data}",
        f"--run.dir={pre}",
        *precision,
        *quick,
    )
    before = evaluate(pre, data, "before SFT")
    run(
        "sft",
        config_path("tiny-sft.yaml"),
        "--init-from",
        str(pre),
        f"--sft.data=stories-qa:{data / 'qa_train.jsonl'}",
        f"--run.dir={sft}",
        *precision,
        *(["--train.max_steps=20"] if args.fast else []),
    )
    after = evaluate(sft, data, "after SFT")
    chat(sft, data)
    wall = time.time() - start
    meta = json.loads((data / "meta.json").read_text())
    floor = meta.get("entropy_floor_nats_per_token")
    info = json.loads((pre / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    best = best_val_loss(pre)
    print("\n=== demo summary ===")
    if floor is not None and best is not None:
        print(
            f"pretrained tiny: best val loss {best:.4f} nats/token, entropy floor {floor:.4f}: "
            f"{best - floor:+.4f} nats/token above the best loss any model could reach"
        )
    print(f"story Q&A accuracy on held-out stories: before SFT {before:.1%}, after SFT {after:.1%}")
    print(f"tokens seen in pretraining: {int(info.get('tokens_seen') or 0):,}")
    print(f"reports: {pre / 'training_plots'}  and  {sft / 'training_plots'}")
    print(f"wall time: {wall / 60:.1f} min")
    return 0


def cpu_precision() -> list[str]:
    """bf16 autocast where the demo runs on a CPU with native bf16 matmuls (~1.3x faster)."""
    import torch

    from lmforge.device import cpu_bf16_native

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return []  # the GPU default (bf16 autocast) already applies
    flag = cpu_bf16_native()
    if flag is None:
        return []
    print(f"(this CPU has {flag}: training with --train.dtype=bf16, about 1.3x faster than fp32)")
    return ["--train.dtype=bf16"]


def best_val_loss(run_dir: Path) -> float | None:
    values = []
    for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("val_loss") is not None:
            values.append(float(row["val_loss"]))
    return min(values) if values else None


def evaluate(run_dir: Path, data: Path, label: str) -> float:
    result = run_dir / f"eval_{label.replace(' ', '_')}.json"
    run_quiet(
        "eval",
        str(run_dir),
        "--data",
        f"stories-qa:{data / 'qa_val.jsonl'}",
        "--limit",
        "300",
        "--json",
        str(result),
    )
    metrics = json.loads(result.read_text())["metrics"]  # percentages
    return float(metrics.get("accuracy", metrics.get("exact_match", 0.0))) / 100


def chat(run_dir: Path, data: Path) -> None:
    """Two turns through `lmforge chat` with stdin scripted, as a user would pipe it."""
    record = json.loads((data / "qa_val.jsonl").read_text().splitlines()[0])
    lines = [f"{record['story']}\n{record['question']}", "/exit"]
    print(f"\n$ lmforge chat {run_dir}   (scripted: a held-out story and its question)")
    print(f">>> {lines[0]}")
    stdin = sys.stdin
    sys.stdin = io.StringIO("\n".join(line.replace("\n", "\\n") for line in lines) + "\n")
    try:
        status = lmforge(["chat", str(run_dir), "--temperature", "0"])
    finally:
        sys.stdin = stdin
    print(f"(expected answer: {record['answer']})")
    if status != 0:
        raise SystemExit(f"demo: `lmforge chat` failed with status {status}")


if __name__ == "__main__":
    raise SystemExit(main())

"""`make demo`: the whole pipeline on the built-in story corpus, offline, on a laptop CPU.

prepare the stories -> pretrain `tiny` -> story Q&A accuracy before SFT -> SFT on the story Q&A ->
accuracy after -> a short scripted chat -> export to Hugging Face and GGUF -> transformers' answers
against lmforge's -> reports. Each stage is the same `lmforge` command a user would type (printed
before it runs), so the demo doubles as a tour of the CLI. It lives beside the package, not in it:
it reads the checkout's configs/.

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
QUIZ = 3  # quiz lines after each story (README, "The demo's recipe": 2 to 4 were tried)
# The kinds of question whose answer is a phrase sharing its first word with others ("played tag"
# and "played catch", "near the lake" and "near the gate"): the pretrained model copies the first
# word and guesses the rest. SFT asks them twice as often: a second source of the same training
# stories' questions of these kinds at the same weight (README, "The demo's recipe").
PHRASE_QUESTIONS = ("What did they do at the end?", "Where did they look first?")


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


# The smoke version (tests/test_demo.py): the same pipeline at a size that runs in seconds.
SMOKE_TRAIN = [
    "--model.n_layers=2",
    "--model.dim=32",
    "--model.n_heads=2",
    "--model.context=256",
    "--train.max_steps=80",  # at 1e-2: enough for answers that vary (a fair comparison)
    "--optim.lr=1e-2",
    "--schedule.warmup_steps=10",
    "--train.eval_every=40",
    "--train.save_every=40",
    "--train.sample_every=0",
    "--log.plot_every=0",
    "--train.warmup_passes=0",
]
SMOKE_SFT = ["--train.max_steps=20", "--train.eval_every=5", "--train.save_every=10",
             "--optim.lr=3e-3", "--schedule.warmup_steps=5", "--sft.weights=0.02,0.02"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/demo.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo_out", help="folder for data, runs and exports")
    parser.add_argument("--size-mb", type=float, default=4.0, help="built-in corpus size")
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="prepare's tokenizer (default: byte, which Hugging Face and GGUF both carry)",
    )
    parser.add_argument(
        "--quiz", type=int, default=QUIZ, help="quiz lines after each story (prepare --quiz)"
    )
    parser.add_argument("--questions", type=int, default=300, help="held-out questions to ask")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the same pipeline at a tiny size, in seconds (the test of the demo)",
    )
    args = parser.parse_args(argv)
    tokenizer, quiz = args.tokenizer, args.quiz
    start = time.time()
    out = Path(args.out)
    data, pre, sft, export = out / "stories", out / "pretrain", out / "sft", out / "export"
    size = 0.3 if args.smoke else args.size_mb
    questions = 20 if args.smoke else args.questions

    print("lmforge demo: built-in stories -> pretrain -> SFT -> eval -> chat -> export -> report")
    for previous in (pre, sft, export):  # the demo's own outputs of an earlier run: start afresh
        if previous.is_dir():
            print(f"(removing the previous demo output {previous})")
            shutil.rmtree(previous)
    precision = cpu_precision()
    run("env")
    if not (data / "meta.json").is_file() or _prepared_with(data) != (tokenizer, size, quiz):
        run("prepare", "--builtin", "stories", "--size-mb", str(size), "--seed", "0",
            "--quiz", str(quiz), "--tokenizer", tokenizer, "--out", str(data),
            "--overwrite")  # fmt: skip
    else:
        print(f"\n(reusing the prepared corpus in {data})")
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    run("model-info", config_path("tiny-cpu.yaml"), "--batch", "4", "--vocab-size", str(vocab))
    run("train", config_path("tiny-cpu.yaml"), f"--data.dir={data}", f"--run.dir={pre}",
        *precision, *(SMOKE_TRAIN if args.smoke else []))  # fmt: skip
    before = evaluate(pre, data, "before SFT", questions)
    phrases = phrase_questions(data)
    run("sft", config_path("tiny-sft.yaml"), "--init-from", str(pre),
        f"--sft.data=stories-qa:{data / 'qa_train.jsonl'},stories-qa:{phrases}",
        "--sft.weights=0.1,0.1", f"--run.dir={sft}",
        *precision, *(SMOKE_SFT if args.smoke else []))  # fmt: skip
    after = evaluate(sft, data, "after SFT", questions)
    chat(sft, data)
    checked = export_and_check(sft, data, export, questions)
    summary(out, data, pre, sft, export, before, after, checked, time.time() - start)
    return 0


def phrase_questions(data: Path) -> Path:
    """qa_train_phrases.jsonl: the training stories' questions of PHRASE_QUESTIONS' kinds."""
    path = data / "qa_train_phrases.jsonl"
    print(f"\n(writing {path}: the training questions {' and '.join(PHRASE_QUESTIONS)})")
    with (
        open(data / "qa_train.jsonl", encoding="utf-8") as src,
        open(path, "w", encoding="utf-8") as out,
    ):
        out.writelines(line for line in src if json.loads(line)["question"] in PHRASE_QUESTIONS)
    return path


def _prepared_with(data: Path) -> tuple[str, float, int] | None:
    meta = json.loads((data / "meta.json").read_text())
    builtin = meta.get("builtin", {})
    return meta.get("tokenizer", {}).get("name"), builtin.get("size_mb"), builtin.get("quiz")


def summary(out: Path, data: Path, pre: Path, sft: Path, export: Path, before: dict,
            after: dict, checked: tuple[int, int], wall: float) -> None:  # fmt: skip
    meta = json.loads((data / "meta.json").read_text())
    floor = meta.get("entropy_floor_nats_per_token")
    best = best_val_loss(pre)
    chars_per_token = meta.get("bytes_per_token")  # the stories are ASCII: a byte is a char
    print("\n=== demo summary ===")
    if floor is not None and best is not None:
        gap = best - floor
        char = f" ({gap / chars_per_token:+.4f} nats/char)" if chars_per_token else ""
        print(
            f"pretrained model: best val loss {best:.4f} nats/token; the entropy floor (the best "
            f"any model could reach) is {floor:.4f}: {gap:+.4f} nats/token above it{char}"
        )
    print(f"story Q&A accuracy on {after['examples']} held-out questions: before SFT "
          f"{before['accuracy']:.1f} %, after SFT {after['accuracy']:.1f} %")  # fmt: skip
    kinds = after.get("per_question", {})
    if kinds:
        print("  by kind of question: " + ", ".join(
            f"{k} {v['accuracy']:.0f} %" for k, v in kinds.items()))  # fmt: skip
    same, total = checked
    print(f"exported model: {export / 'hf'} (Hugging Face) and {export / 'model.gguf'} (GGUF)")
    print(f"  transformers' greedy answers equal lmforge's on {same} of {total} held-out questions")
    print(f"  chat with it in llama.cpp:  llama-cli -m {export / 'model.gguf'} -cnv --jinja")
    print(f"  or in Ollama:  ollama create lmforge-demo -f {export / 'Modelfile'} && "
          "ollama run lmforge-demo")  # fmt: skip
    print(f"reports: {pre / 'training_plots'}  and  {sft / 'training_plots'}")
    print(f"wall time: {wall / 60:.1f} min")


def export_and_check(sft: Path, data: Path, export: Path, questions: int) -> tuple[int, int]:
    """Export the SFT model to Hugging Face and GGUF; load the HF folder with transformers and
    compare its greedy answers with lmforge's on the held-out questions (the same prompts, built
    by the exported chat template and by lmforge's render)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from lmforge.chat_format import OLLAMA_MODELFILE, render_prompt, stop_ids
    from lmforge.data.instruct import load_sources
    from lmforge.export import hf_greedy_matches
    from lmforge.generate import load_for_generation

    run("export", str(sft), "--format", "hf", "--out", str(export / "hf"))
    run("export", str(sft), "--format", "gguf", "--out", str(export / "model.gguf"))
    (export / "Modelfile").write_text("FROM ./model.gguf\n" + OLLAMA_MODELFILE)
    print(f"\n(transformers loads {export / 'hf'}; its greedy answers against lmforge's)")
    transformers_logging.disable_progress_bar()  # a bar for loading 38 tensors says nothing
    loaded = load_for_generation(str(sft), "cpu")
    hf_tokenizer = AutoTokenizer.from_pretrained(str(export / "hf"))
    conversations = load_sources(f"stories-qa:{data / 'qa_val.jsonl'}")[:questions]
    prompts = []
    for conversation in conversations:
        asked = conversation[: max(i for i, t in enumerate(conversation) if t.role == "assistant")]
        ours = render_prompt(asked, loaded.tokenizer)
        messages = [{"role": t.role, "content": t.content} for t in asked]
        theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs  # a BatchEncoding
        if list(theirs) != ours:
            raise SystemExit("demo: the exported chat template renders a prompt differently")
        prompts.append(ours[-(loaded.context - 32) :])
    same, differ = hf_greedy_matches(export / "hf", loaded.model, prompts, 32,
                                     stop_ids(loaded.tokenizer), loaded.vocab_limit)  # fmt: skip
    first = conversations[0]
    answer = loaded.tokenizer.decode(
        loaded.model.generate([prompts[0]], 32, temperature=0.0,
                              stop_tokens=stop_ids(loaded.tokenizer),
                              vocab_limit=loaded.vocab_limit)[0])  # fmt: skip
    print(
        f"question: {first[-2].content.splitlines()[-1]}  transformers and lmforge: "
        f"{answer.strip()!r}" + ("" if 0 not in {i for i, *_ in differ} else " (they differ)")
    )
    for i, mine, theirs in differ[:3]:
        print(
            f"  differ on question {i}: lmforge {loaded.tokenizer.decode(mine)!r}, "
            f"transformers {loaded.tokenizer.decode(theirs)!r}"
        )
    return same, len(prompts)


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


def evaluate(run_dir: Path, data: Path, label: str, questions: int) -> dict:
    """`lmforge eval` on the held-out questions; its JSON (scores in percent)."""
    result = run_dir / f"eval_{label.replace(' ', '_')}.json"
    run_quiet("eval", str(run_dir), "--data", f"stories-qa:{data / 'qa_val.jsonl'}",
              "--limit", str(questions), "--json", str(result))  # fmt: skip
    found = json.loads(result.read_text())
    metrics = found["metrics"]
    found["accuracy"] = float(metrics.get("accuracy", metrics.get("exact_match", 0.0)))
    return found


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

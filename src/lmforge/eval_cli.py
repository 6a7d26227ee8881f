"""`lmforge eval`: how good is a checkpoint, on prepared tokens or on question/answer data.

* A prepared folder (meta.json + val.bin): loss and perplexity over its non-overlapping windows.
* Instruction data (SQuAD, Alpaca, story Q&A, chat, DailyDialog files): the model answers each
  conversation's last user turn greedily (prompt from `render_prompt`, as in chat); exact match
  and F1 with SQuAD's normalisation, accuracy for the built-in story Q&A, and ROUGE-L/BLEU when
  asked for (`--metrics rouge,bleu`, optional libraries).

Results are printed as a table and, with `--json`, written as JSON (scores in percent).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge import evaluate
from lmforge.errors import UserError
from lmforge.generate import LoadedModel, load_for_generation

BASE_METRICS = ("em", "f1", "accuracy")
OPTIONAL_METRICS = ("rouge", "bleu")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN",
                   help="checkpoint file, or run folder (its best.pt, else final, else newest)")
    p.add_argument("--data", required=True, metavar="DIR_OR_FILE",
                   help="prepared folder (loss/perplexity) or Q&A files, comma-separated, "
                        "FORMAT:PATH to force a format (alpaca, squad, dailydialog, chat, "
                        "stories-qa)")
    p.add_argument("--limit", type=int, default=0,
                   help="evaluate only the first N examples (Q&A) or windows (tokens); 0 = all")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results here")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per generated answer")
    p.add_argument("--metrics", default="em,f1,accuracy",
                   help="Q&A metrics, comma-separated: em, f1, accuracy (story Q&A), and with "
                        "pip install 'lmforge[eval]': rouge, bleu")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts (or windows) evaluated together")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="which token file of a prepared folder")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed Q&A records instead of stopping")
    p.add_argument("--show", type=int, default=3, help="example answers to print")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def run_eval(args: argparse.Namespace) -> int:
    for name in ("limit", "show"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive "
                            f"(got {getattr(args, name)})")
    metrics = parse_metrics(args.metrics)
    loaded = load_for_generation(args.checkpoint, args.device)
    start = time.time()
    data = Path(args.data)
    if data.is_dir() and (data / "meta.json").is_file():
        result = token_eval(loaded, data, args.split, args.limit, args.batch_size)
    else:
        result = qa_eval(loaded, args, metrics)
    result["seconds"] = round(time.time() - start, 2)
    print_table(result)
    if args.json:
        write_json(Path(args.json), result)
        print(f"results: {args.json}")
    return 0


def parse_metrics(spec: str) -> list[str]:
    """The asked-for metrics; optional libraries are checked now, before any work."""
    names = [m.strip().lower() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in BASE_METRICS + OPTIONAL_METRICS]
    if unknown or not names:
        raise UserError(f"--metrics: unknown metric {unknown[0] if unknown else '(none)'}; "
                        f"choose from {', '.join(BASE_METRICS + OPTIONAL_METRICS)}")
    if "rouge" in names:
        evaluate._optional("rouge_score.rouge_scorer", "rouge-score", "ROUGE-L")
    if "bleu" in names:
        evaluate._optional("sacrebleu", "sacrebleu", "BLEU")
    return names


# ------------------------------------------------------------------------------------ tokens
@torch.no_grad()
def token_eval(loaded: LoadedModel, folder: Path, split: str, limit: int,
               batch_size: int) -> dict[str, Any]:
    """Mean next-token loss over the non-overlapping windows of a prepared token file."""
    from lmforge.data.memmap import read_meta
    from lmforge.tokenizers import check_same_tokenizer

    meta = read_meta(folder)
    check_same_tokenizer(loaded.tokenizer_identity, meta.get("tokenizer", {}),
                         f"the checkpoint and {folder / 'meta.json'}")
    tokens = np.memmap(folder / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    if len(tokens) < 2:
        raise UserError(f"{folder / f'{split}.bin'} holds fewer than 2 tokens: nothing to score")
    width = min(loaded.context, len(tokens) - 1)
    starts = np.arange(0, len(tokens) - width, width)
    if limit:
        starts = starts[:limit]
    device = next(loaded.model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        index = starts[i:i + batch_size, None] + np.arange(width + 1)  # (B, T+1)
        windows = torch.from_numpy(tokens[index].astype(np.int64)).to(device)
        total += loaded.model(windows[:, :-1], windows[:, 1:], reduction="sum").item()
        count += windows[:, 1:].numel()
    loss = total / count
    return {"kind": "tokens", "checkpoint": loaded.path, "phase": loaded.phase,
            "data": str(folder), "split": split, "windows": len(starts), "tokens": count,
            "metrics": {"loss": loss, "perplexity": math.exp(min(loss, 50.0))},
            "entropy_floor": meta.get("entropy_floor_nats_per_token")}


# -------------------------------------------------------------------------------------- Q&A
@dataclass
class Question:
    """One conversation to answer: the prompt ids and the accepted answers."""

    prompt: list[int]
    references: tuple[str, ...]
    format: str
    question: str


def load_questions(loaded: LoadedModel, spec: str, limit: int, budget: int,
                   skip_bad: bool) -> list[Question]:
    """Prompt = the conversation up to its last assistant turn; that turn is the gold answer."""
    from lmforge.data.instruct import load_sources, render_prompt
    from lmforge.train.sft import check_data_tokenizer

    check_data_tokenizer(spec, loaded.tokenizer_identity)
    conversations = load_sources(spec, skip_bad=skip_bad)
    formats = [src.format for src in conversations.sources for _ in range(src.used)]
    questions = []
    for conversation, fmt in zip(conversations, formats):
        last = max(i for i, turn in enumerate(conversation) if turn.role == "assistant")
        gold = conversation[last]
        asked = conversation[:last]
        prompt = render_prompt(asked, loaded.tokenizer)[-budget:]  # keep the question's end
        question = asked[-1].content.rsplit("\n", 1)[-1] if asked else ""
        questions.append(Question(prompt, gold.references or (gold.content,), fmt, question))
        if limit and len(questions) >= limit:
            break
    return questions


@torch.no_grad()
def answer_all(loaded: LoadedModel, questions: list[Question], max_new_tokens: int,
               batch_size: int) -> list[str]:
    """Greedy answers, several prompts at a time (left-padded by `generate`)."""
    from lmforge.data.instruct import chat_ids

    tok = loaded.tokenizer
    pad = chat_ids(tok).pad
    answers: list[str] = []
    for i in range(0, len(questions), batch_size):
        prompts = [q.prompt for q in questions[i:i + batch_size]]
        outputs = loaded.model.generate(prompts, max_new_tokens, temperature=0.0,
                                        stop_tokens=loaded.stop_tokens(chat=True),
                                        vocab_limit=loaded.vocab_limit, pad_id=pad)
        for ids in outputs:
            text = tok.decode(ids).strip()
            if not loaded.instruction_tuned:
                # A phase-1 model never learnt <|end|>: score its first line as the answer.
                text = text.split("\n", 1)[0].strip()
            answers.append(text)
    return answers


def score(questions: list[Question], answers: list[str], metrics: list[str]) -> dict[str, float]:
    """Mean scores in percent over the examples each metric applies to."""
    out: dict[str, float] = {}
    if "em" in metrics:
        out["exact_match"] = _mean([evaluate.exact_match(a, q.references)
                                    for q, a in zip(questions, answers)])
    if "f1" in metrics:
        out["f1"] = _mean([evaluate.f1(a, q.references) for q, a in zip(questions, answers)])
    stories = [(q, a) for q, a in zip(questions, answers) if q.format == "stories-qa"]
    if "accuracy" in metrics and stories:
        out["accuracy"] = _mean([evaluate.story_accuracy(a, q.references[0]) for q, a in stories])
    if "rouge" in metrics:
        out["rouge_l"] = _mean([evaluate.rouge_l(a, q.references[0])
                                for q, a in zip(questions, answers)])
    if "bleu" in metrics:
        out["bleu"] = evaluate.corpus_bleu(answers, [q.references[0] for q in questions])
    return out


def story_accuracy_by_kind(questions: list[Question], answers: list[str]) -> dict[str, Any]:
    """Built-in story Q&A: accuracy per kind of question, which says what the model cannot do
    yet (a lookup it has not learnt shows as one kind near chance while the others are high)."""
    from lmforge.data.stories import question_kind

    kinds: dict[str, list[float]] = {}
    for q, a in zip(questions, answers):
        if q.format == "stories-qa":
            right = evaluate.story_accuracy(a, q.references[0])
            kinds.setdefault(question_kind(q.question), []).append(right)
    return {kind: {"examples": len(v), "accuracy": _mean(v)} for kind, v in sorted(kinds.items())}


def _mean(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def qa_eval(loaded: LoadedModel, args: argparse.Namespace, metrics: list[str]) -> dict[str, Any]:
    budget = loaded.context - args.max_new_tokens
    if budget < 8:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt "
                        f"in the model's context of {loaded.context} tokens; lower it")
    questions = load_questions(loaded, args.data, args.limit, budget, args.skip_bad)
    answers = answer_all(loaded, questions, args.max_new_tokens, args.batch_size)
    formats = sorted({q.format for q in questions})
    per_format = {}
    if len(formats) > 1:
        for fmt in formats:
            pairs = [(q, a) for q, a in zip(questions, answers) if q.format == fmt]
            per_format[fmt] = {"examples": len(pairs),
                               **score([q for q, _ in pairs], [a for _, a in pairs], metrics)}
    return {
        "kind": "qa", "checkpoint": loaded.path, "phase": loaded.phase, "data": args.data,
        "examples": len(questions), "max_new_tokens": args.max_new_tokens,
        "metrics": score(questions, answers, metrics), "per_format": per_format,
        "per_question": story_accuracy_by_kind(questions, answers),
        "shown": args.show,
        "predictions": [{"question": q.question, "references": list(q.references),
                         "prediction": a, "format": q.format}
                        for q, a in zip(questions, answers)],
    }


# ----------------------------------------------------------------------------------- output
def print_table(result: dict[str, Any]) -> None:
    what = (f"{result['examples']:,} examples" if result["kind"] == "qa"
            else f"{result['windows']:,} windows, {result['tokens']:,} tokens ({result['split']})")
    print(f"eval {result['checkpoint']} (phase {result['phase']}) on {result['data']}: {what}, "
          f"{result['seconds']:.1f} s")
    rows = [(name, value) for name, value in result["metrics"].items()]
    for fmt, scores in result.get("per_format", {}).items():
        rows += [(f"{name} [{fmt}]", value) for name, value in scores.items()
                 if name != "examples"]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric'.ljust(width)}  value")
    for name, value in rows:
        shown = f"{value:.4f}" if result["kind"] == "tokens" else f"{value:6.2f} %"
        print(f"{name.ljust(width)}  {shown}")
    by_kind = result.get("per_question") or {}
    if by_kind:
        print("story Q&A accuracy by question: " + ", ".join(
            f"{kind} {v['accuracy']:.0f}% ({v['examples']})" for kind, v in by_kind.items()))
    for p in result.get("predictions", [])[: result.get("shown", 0)]:
        print(f"  Q: {p['question'][:80]!r} gold {p['references'][0][:40]!r} -> "
              f"{p['prediction'][:60]!r}")


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a file, and a failed write leaves the old one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise UserError(f"could not write {path}: {e.strerror or e}") from None


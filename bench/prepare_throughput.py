"""Throughput and memory of `lmforge prepare` (gpt2) against tiktoken's own batch encoder.

    python bench/prepare_throughput.py [--mb 50] [--big-gb 2] [--workers N]

1. ~50 MB of text (the shared TinyStories sample repeated, else synthetic): MB/s of `prepare`
   (all cores, reading + encoding + writing) vs `encode_ordinary_batch(docs, num_threads=cores)`
   on the same documents already in memory; the ratio is the figure of merit (target >= 0.8).
2. Peak RSS of a `prepare` child process on a generated corpus of --big-gb GB (target: flat,
   < 1 GB), via resource.getrusage(RUSAGE_CHILDREN).
Results: a table on stdout and bench/results/prepare_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tiktoken
import torch

from lmforge import __version__
from lmforge.data.prepare import prepare, split_documents
from lmforge.tokenizers import get_tokenizer

SEPARATOR = "<|endoftext|>"
ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "tinystories_excerpt" / "tinystories_sample.txt"


def source_documents() -> tuple[list[str], str]:
    """Documents to repeat: the shared TinyStories sample, else synthetic sentences."""
    path = Path(os.environ.get("LMFORGE_SHARED_DATA", "")) / "tinystories_excerpt"
    for candidate in (STORIES, path / "tinystories_sample.txt"):
        if candidate.is_file():
            docs = split_documents(candidate.read_text(encoding="utf-8"), SEPARATOR)
            return docs[:-1], f"{candidate.name} (repeated)"  # the last story is cut mid-way
    rng = random.Random(0)
    words = "the a cat dog ran saw big small happy sad tree park ball home mom friend".split()
    docs = [
        " ".join(rng.choice(words) for _ in range(rng.randint(80, 300))).capitalize() + "."
        for _ in range(2000)
    ]
    return docs, "synthetic"


def write_corpus(path: Path, docs: list[str], target_bytes: int, seed: int) -> int:
    """Write shuffled copies of ``docs`` separated by SEPARATOR lines until ``target_bytes``."""
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            order = list(range(len(docs)))
            rng.shuffle(order)
            block = "".join(f"{docs[i]}\n{SEPARATOR}\n" for i in order)
            f.write(block)
            written += len(block.encode("utf-8"))
    return path.stat().st_size


def bench_throughput(work: Path, docs: list[str], mb: float, workers: int) -> dict:
    corpus = work / "corpus.txt"
    size = write_corpus(corpus, docs, int(mb * 1e6), seed=0)
    documents = split_documents(corpus.read_text(encoding="utf-8"), SEPARATOR)
    text_bytes = sum(len(d.encode("utf-8")) for d in documents)
    enc = get_tokenizer("gpt2")._enc  # built once; prepare below reuses the same cached instance

    enc.encode_ordinary_batch(documents[:1000], num_threads=workers)  # warm-up
    start = time.perf_counter()
    encoded = enc.encode_ordinary_batch(documents, num_threads=workers)
    tiktoken_s = time.perf_counter() - start
    tokens = sum(map(len, encoded))
    del encoded

    out = work / "out"
    start = time.perf_counter()
    meta = prepare(
        [str(corpus)],
        out,
        tokenizer="gpt2",
        workers=workers,
        doc_separator=SEPARATOR,
        progress=False,
    )
    prepare_s = time.perf_counter() - start
    assert meta["tokens"] == tokens + len(documents), "prepare and tiktoken disagree"
    shutil.rmtree(out)
    return {
        "corpus_bytes": size,
        "text_bytes": text_bytes,
        "documents": len(documents),
        "tokens": tokens,
        "tiktoken_seconds": round(tiktoken_s, 3),
        "prepare_seconds": round(prepare_s, 3),
        "tiktoken_mb_per_s": round(text_bytes / 1e6 / tiktoken_s, 2),
        "prepare_mb_per_s": round(text_bytes / 1e6 / prepare_s, 2),
        "ratio": round(tiktoken_s / prepare_s, 3),
    }


def bench_memory(work: Path, docs: list[str], gb: float, workers: int) -> dict:
    corpus = work / "big.txt"
    size = write_corpus(corpus, docs, int(gb * 1e9), seed=1)
    out = work / "big_out"
    code = (
        "from lmforge.data.prepare import prepare; import json; "
        f"m = prepare([{str(corpus)!r}], {str(out)!r}, tokenizer='gpt2', workers={workers}, "
        f"doc_separator={SEPARATOR!r}, progress=False); "
        "print(json.dumps({'tokens': m['tokens'], 'documents': m['documents']}))"
    )
    # A small launcher runs the prepare child and reports RUSAGE_CHILDREN: measured from this
    # process instead, the child's exec would inherit this process's own (large) peak RSS.
    launcher = (
        "import resource, subprocess, sys, json; "
        "done = subprocess.run([sys.executable, '-c', sys.argv[1]], capture_output=True, "
        "text=True); sys.stderr.write(done.stderr); "
        "print(done.stdout.strip().splitlines()[-1] if done.returncode == 0 else ''); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(done.returncode)"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", launcher, code], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"big prepare failed:\n{done.stderr}")
    summary_line, maxrss_line = done.stdout.strip().splitlines()[-2:]
    # ru_maxrss is the largest single process (prepare's main one or a worker): KiB on Linux,
    # bytes on macOS.
    maxrss = int(maxrss_line)
    maxrss_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024
    result = json.loads(summary_line)
    shutil.rmtree(out)
    corpus.unlink()
    return {
        "corpus_bytes": size,
        "tokens": result["tokens"],
        "seconds": round(seconds, 1),
        "mb_per_s": round(size / 1e6 / seconds, 2),
        "peak_rss_mb": round(maxrss_bytes / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50, help="throughput corpus size (default 50)")
    parser.add_argument("--big-gb", type=float, default=2, help="memory corpus size; 0 skips")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="default: all cores")
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    args = parser.parse_args()

    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tiktoken": tiktoken.__version__,
        "lmforge": __version__,
    }
    docs, source = source_documents()
    config = {
        "tokenizer": "gpt2",
        "workers": args.workers,
        "mb": args.mb,
        "big_gb": args.big_gb,
        "text": source,
    }
    print("machine :", machine)
    print("versions:", versions)
    print("config  :", config)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        work = Path(tmp)
        throughput = bench_throughput(work, docs, args.mb, args.workers)
        memory = bench_memory(work, docs, args.big_gb, args.workers) if args.big_gb else None

    print()
    print("| what | MB/s | seconds | note |")
    print("|---|---|---|---|")
    print(
        f"| tiktoken encode_ordinary_batch ({args.workers} threads) | "
        f"{throughput['tiktoken_mb_per_s']} | {throughput['tiktoken_seconds']} | "
        f"{throughput['text_bytes'] / 1e6:.1f} MB of text in memory |"
    )
    print(
        f"| lmforge prepare ({args.workers} workers) | {throughput['prepare_mb_per_s']} | "
        f"{throughput['prepare_seconds']} | file -> train.bin/val.bin/meta.json |"
    )
    print(f"| ratio prepare / tiktoken | {throughput['ratio']} | | target >= 0.8 |")
    if memory:
        print(
            f"| prepare on {memory['corpus_bytes'] / 1e9:.2f} GB | {memory['mb_per_s']} | "
            f"{memory['seconds']} | peak RSS {memory['peak_rss_mb']} MB (target < 1024) |"
        )

    results = {
        "machine": machine,
        "versions": versions,
        "config": config,
        "throughput": throughput,
        "memory": memory,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = ROOT / "bench" / "results" / "prepare_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()

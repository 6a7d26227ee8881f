"""Bad input on purpose: for every command, each way a user's hands or machine get its input wrong
is refused with one line on stderr that names the problem, exit status 2, and every file it was
given left as it was.

`CASES` is the table: case id -> the argv it runs (built in a folder of its own, from copies of
the shared `stories` data and a tiny run) -> words its one stderr line must hold. Each case runs
`python -m lmforge ...` as a child process, so the exit status and stderr are what a user sees,
library warnings included. The checksums of the case's folder, of the data and of the run are the
same before and after. The children run a few at a time (most of their time is interpreter and
torch start-up). `pytest -s tests/reliability/test_bad_input.py -k table` prints case -> line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import TINY, checksums, lmforge_subprocess, make_tiny_run

from lmforge.commands import COMMANDS
from lmforge.tokenizers import load_tokenizer

# Its module fixtures are built once: all its tests go to one pytest-xdist worker (make test).
pytestmark = pytest.mark.xdist_group("bad_input")

PARALLEL = min(4, os.cpu_count() or 1)


@dataclass
class Ctx:
    """What a case builds its argv from: its own folder, and read-only shared inputs."""

    dir: Path  # the case's inputs: checked unchanged afterwards
    out: Path  # where a command may be pointed to write (not checked: it must not matter)
    stories: Path  # prepared built-in stories (read-only)
    run: Path  # a tiny run folder on the stories tokenizer (read-only)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def data(self, **meta: object) -> Path:
        """A copy of the stories folder; keyword arguments change meta.json (None: remove)."""
        copy = self.dir / "data"
        shutil.copytree(self.stories, copy)
        values = json.loads((copy / "meta.json").read_text())
        for key, value in meta.items():
            if value is None:
                del values[key]
            else:
                values[key] = value
        (copy / "meta.json").write_text(json.dumps(values))
        return copy

    def checkpoint(self, kind: str) -> Path:
        """A checkpoint file that is not what lmforge can load, of the given kind."""
        good = self.run / "checkpoints" / "final_model.pt"
        path = self.dir / "ckpt" / ("ckpt.pt" if kind == "nanogpt" else f"{kind}.pt")
        path.parent.mkdir()
        state = torch.load(good, weights_only=True)
        if kind == "truncated":  # its record says what it should hold
            shutil.copy(good.with_suffix(".json"), path.with_suffix(".json"))
            path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        elif kind == "no-record":
            shutil.copy(good, path)
        elif kind == "nanogpt":  # what nanoGPT's train.py saves
            args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=64)
            torch.save({"model": state["model"], "optimizer": {}, "model_args": args,
                        "iter_num": 100, "best_val_loss": 1.5, "config": {}}, path)  # fmt: skip
        elif kind == "state-dict":
            torch.save(state["model"], path)
        elif kind == "pickled-class":  # fairseq-style: an argparse.Namespace inside
            torch.save({**state, "args": argparse.Namespace(lr=1e-3)}, path)
        elif kind == "garbage":
            path.write_bytes(os.urandom(4096))
        return path


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list]
    expect: str  # words the one stderr line holds
    xfail: str | None = None  # a known defect outside this suite's modules: what and where


def train(ctx: Ctx, *args: object) -> list:
    return ["train", *TINY, "--train.max_steps=2", f"--run.dir={ctx.out / 'run'}", *args]


def sft(ctx: Ctx, data: object, *args: object, init: object = None) -> list:
    return ["sft", "--init-from", init or ctx.run, f"--sft.data={data}", "--train.max_steps=2",
            f"--run.dir={ctx.out / 'run'}", *args]  # fmt: skip


def generate(target: object, *args: object) -> list:
    return ["generate", target, "--prompt", "Once", "--max-new-tokens", "4", *args]


def metrics_csv(ctx: Ctx, text: str | bytes) -> Path:
    return ctx.file("logs/training_metrics.csv", text)


BYTE = ("--tokenizer", "byte")  # no vocabulary to build before the input is read
ALPACA_BAD = '[{"instruction": "Say hi", "output": 42}]'
SQUAD_BAD = '{"version": "v2.0", "data": {"title": "not a list"}}'
DAILYDIALOG_BAD = '{"dialog": "Hi there. __eou__ Hello. __eou__"}\n'
CHAT_BAD = '{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}\n'

# fmt: off
CASES = [
    # -- prepare: raw text in, a folder out
    Case("prepare-missing-input",
         lambda c: ["prepare", c.dir / "nope.txt", "--out", c.out / "d"],
         "nope.txt does not exist"),
    Case("prepare-empty-file",
         lambda c: ["prepare", c.file("empty.txt", "\n \n"), "--out", c.out / "d", *BYTE],
         "the input has no text"),
    Case("prepare-non-utf8",
         lambda c: ["prepare", c.file("latin1.txt", "caf\xe9\n".encode("latin-1")),
                    "--out", c.out / "d", *BYTE],
         "latin1.txt: not UTF-8 at byte offset 3"),
    Case("prepare-folder-without-text",
         lambda c: ["prepare", c.file("notes/a.md", "# hi").parent, "--out", c.out / "d"],
         "folder has no .txt"),
    Case("prepare-unsupported-file",
         lambda c: ["prepare", c.file("table.csv", "a,b\n"), "--out", c.out / "d"],
         "unsupported input type '.csv'"),
    Case("prepare-jsonl-not-objects",
         lambda c: ["prepare", c.file("x.jsonl", "[1, 2]\n"), "--out", c.out / "d", *BYTE],
         'x.jsonl:1: no "text" field'),
    Case("prepare-jsonl-text-not-string",
         lambda c: ["prepare", c.file("x.jsonl", '{"text": 5}\n'), "--out", c.out / "d", *BYTE],
         'x.jsonl:1: "text" is int'),
    Case("prepare-parquet-damaged",
         lambda c: ["prepare", c.file("x.parquet", b"PAR1 nope"), "--out", c.out / "d", *BYTE],
         "x.parquet: not a readable parquet file"),
    Case("prepare-out-is-a-file",
         lambda c: ["prepare", "--builtin", "stories", "--out", c.file("out.txt", "mine")],
         "is a file, not a folder"),
    Case("prepare-out-not-empty",
         lambda c: ["prepare", "--builtin", "stories", "--out", c.file("mine/k.txt", "x").parent],
         "pass --overwrite"),
    Case("prepare-overwrite-its-own-input",
         lambda c: ["prepare", c.file("raw/a.txt", "text\n").parent, "--out", c.dir / "raw",
                    "--overwrite"],
         "holds the input"),
    Case("prepare-overwrite-a-home-folder",
         lambda c: ["prepare", "--builtin", "stories", "--out", c.file("home/.bashrc", "x").parent,
                    "--overwrite"],
         "no meta.json of prepare's"),
    Case("prepare-val-fraction",
         lambda c: ["prepare", "--builtin", "stories", "--out", c.out / "d",
                    "--val-fraction", "1.5"],
         "--val-fraction must be in [0, 1)"),
    Case("prepare-size-mb-inf",
         lambda c: ["prepare", "--builtin", "stories", "--out", c.out / "d", "--size-mb", "inf"],
         "--size-mb must be a positive number"),
    Case("prepare-negative-workers",
         lambda c: ["prepare", "--builtin", "stories", "--out", c.out / "d", "--workers", "-2"],
         "--workers must be >= 1"),
    # -- train: the config (refused before torch is imported)
    Case("train-config-is-a-list",
         lambda c: train(c, c.file("c.yaml", "- model\n- train\n")),
         "must hold a mapping of sections"),
    Case("train-section-not-a-mapping",
         lambda c: train(c, c.file("c.yaml", "train: 5\n")),
         "config section 'train' must be a mapping"),
    Case("train-key-wrong-type",
         lambda c: train(c, c.file("c.yaml", "train:\n  seed: [1, 2]\n")),
         "train.seed: expected int"),
    Case("train-config-not-utf8",
         lambda c: train(c, c.file("c.yaml", b"train:\n  seed: \xff\n")),
         "is not UTF-8 text"),
    Case("train-config-is-a-folder",
         lambda c: train(c, c.file("c.yaml/x", "").parent),
         "is a folder: name a YAML file"),
    Case("train-lr-inf", lambda c: train(c, "--optim.lr=inf"), "optim.lr must be a finite"),
    Case("train-lr-nan", lambda c: train(c, "--optim.lr=nan"), "optim.lr must be a finite"),
    Case("train-save-every-minutes",
         lambda c: train(c, "--train.save_every_minutes=-1"),
         "train.save_every_minutes must be >= 0"),
    Case("train-decay-steps",
         lambda c: train(c, "--schedule.decay_steps=-5"),
         "schedule.decay_steps must be >= 0"),
    Case("train-stride", lambda c: train(c, "--data.stride=-1"), "data.stride must be >= 0"),
    Case("train-ffn-hidden",
         lambda c: train(c, "--model.ffn_hidden=-64"),
         "model.ffn_hidden must be >= 0"),
    Case("train-init-std",
         lambda c: train(c, "--model.init_std=0"),
         "model.init_std must be positive"),
    Case("train-rope-theta",
         lambda c: train(c, "--model.rope_theta=-1"),
         "model.rope_theta must be positive"),
    Case("train-norm-eps",
         lambda c: train(c, "--model.norm_eps=0"),
         "model.norm_eps must be positive"),
    Case("train-empty-run-dir", lambda c: ["train", "--run.dir="], "run.dir is empty"),
    Case("train-max-skipped-steps",
         lambda c: train(c, "--train.max_skipped_steps=0"),
         "train.max_skipped_steps must be at least 1"),
    Case("train-peak-tflops",
         lambda c: train(c, "--log.peak_tflops=-3"),
         "log.peak_tflops must be >= 0"),
    Case("train-negative-seed", lambda c: train(c, "--train.seed=-1"), "train.seed must be"),
    Case("train-unknown-device",
         lambda c: train(c, "--train.device=gpu"),
         "train.device must be auto, cpu"),
    # -- train: the prepared data folder
    Case("train-meta-without-vocab-size",
         lambda c: train(c, f"--data.dir={c.data(vocab_size=None)}"),
         "meta.json is damaged: it has no 'vocab_size'"),
    Case("train-truncated-train-bin",
         lambda c: train(c, f"--data.dir={truncated(c.data())}"),
         "the folder is incomplete or changed"),
    # -- sft: instruction data of each format, wrong shapes
    Case("sft-weights-unparsable",
         lambda c: sft(c, "a.json", "--sft.weights=1,x"),
         "sft.weights must be comma-separated numbers"),
    Case("sft-alpaca-wrong-shape",
         lambda c: sft(c, f"alpaca:{c.file('a.json', ALPACA_BAD)}"),
         "record 1: missing or non-text 'output'"),
    Case("sft-squad-wrong-shape",
         lambda c: sft(c, f"squad:{c.file('s.json', SQUAD_BAD)}"),
         "no 'data' list of articles"),
    Case("sft-dailydialog-wrong-shape",
         lambda c: sft(c, c.file("d.jsonl", DAILYDIALOG_BAD)),
         "record 1: missing 'dialog' list of strings"),
    Case("sft-chat-wrong-roles",
         lambda c: sft(c, c.file("c.jsonl", CHAT_BAD)),
         "message 1 has role 'human'"),
    # -- generate / chat: checkpoints and sampling
    Case("generate-truncated-checkpoint",
         lambda c: generate(c.checkpoint("truncated")),
         "is corrupt (checksum mismatch"),
    Case("generate-checkpoint-without-record",
         lambda c: generate(c.checkpoint("no-record")),
         "has no checksum record"),
    Case("generate-nanogpt-checkpoint",
         lambda c: generate(c.checkpoint("nanogpt")),
         "is a nanoGPT checkpoint"),
    Case("generate-plain-state-dict",
         lambda c: generate(c.checkpoint("state-dict")),
         "is a plain state dict"),
    Case("generate-pickle-with-a-class",
         lambda c: generate(c.checkpoint("pickled-class")),
         "a pickle that would run code to load"),
    Case("generate-garbage-file",
         lambda c: generate(c.checkpoint("garbage")),
         "truncated or corrupt"),
    Case("generate-temperature",
         lambda c: generate(c.run, "--temperature", "-1"),
         "--temperature must be >= 0"),
    Case("generate-top-p", lambda c: generate(c.run, "--top-p", "2"), "--top-p must be in (0, 1]"),
    Case("generate-max-new-tokens",
         lambda c: generate(c.run, "--max-new-tokens", "0"),
         "--max-new-tokens must be positive"),
    Case("generate-seed-too-big",
         lambda c: generate(c.run, "--seed", str(2**64)),
         "--seed must be a whole number from 0"),
    Case("chat-top-k", lambda c: ["chat", c.run, "--top-k", "-1"], "--top-k must be >= 0"),
    Case("chat-repetition-penalty",
         lambda c: ["chat", c.run, "--repetition-penalty", "0"],
         "--repetition-penalty must be positive"),
    # -- eval
    Case("eval-nanogpt-checkpoint",
         lambda c: ["eval", c.checkpoint("nanogpt"), "--data", c.stories],
         "is a nanoGPT checkpoint"),
    Case("eval-negative-limit",
         lambda c: ["eval", c.run, "--data", c.stories, "--limit", "-1"],
         "--limit must be >= 0"),
    Case("eval-zero-batch-size",
         lambda c: ["eval", c.run, "--data", c.stories, "--batch-size", "0"],
         "--batch-size must be positive"),
    # -- export
    Case("export-into-non-empty-folder",
         lambda c: ["export", c.run, "--out", c.file("hf/mine.txt", "x").parent],
         "already exists and is not empty"),
    Case("export-nanogpt-checkpoint",
         lambda c: ["export", c.checkpoint("nanogpt"), "--out", c.out / "hf"],
         "is a nanoGPT checkpoint"),
    Case("export-gguf-bf16",
         lambda c: ["export", c.run, "--format", "gguf", "--dtype", "bf16", "--out", c.out / "m"],
         "--dtype bf16 is for --format hf"),
    # -- report / compare
    Case("report-missing", lambda c: ["report", c.dir / "nope"], "no such file or folder"),
    Case("report-unreadable-log",
         lambda c: ["report", metrics_csv(c, b"\x89PNG\r\n\x1a\n\0\0")],
         "looks binary, not a text log"),
    Case("report-empty-log", lambda c: ["report", metrics_csv(c, "")], "is empty"),
    Case("report-log-without-steps",
         lambda c: ["report", c.file("m.csv", "loss,lr\n1,2\n")],
         "CSV without a step column"),
    Case("report-folder-not-a-run",
         lambda c: ["report", c.file("x/y.txt", "").parent],
         "is a folder without logs/"),
    Case("compare-missing-run",
         lambda c: ["compare", c.file("a.csv", "step,loss\n1,2.5\n2,2\n"), c.dir / "gone",
                    "--out", c.out],
         "gone: no such file or folder"),
    # -- model-info / env
    Case("model-info-unknown-preset", lambda c: ["model-info", "gpt5"], "unknown preset"),
    Case("model-info-config-is-a-list",
         lambda c: ["model-info", c.file("m.yaml", "- 1\n")],
         "must hold a mapping of sections"),
    Case("model-info-model-section-a-list",
         lambda c: ["model-info", c.file("m.yaml", "model: [1]\n")],
         "config section 'model' in"),
    Case("model-info-bad-config-value",
         lambda c: ["model-info", c.file("m.yaml", "model:\n  norm_eps: -1\n")],
         "model.norm_eps must be positive"),
    Case("model-info-bad-batch",
         lambda c: ["model-info", "tiny", "--batch", "0"],
         "--batch must be positive"),
    Case("model-info-bad-context",
         lambda c: ["model-info", "tiny", "--context", "0"],
         "--context 0 is outside"),
    Case("env-unknown-option", lambda c: ["env", "--gpu"], "unrecognized arguments: --gpu"),
]
# fmt: on


def truncated(data: Path) -> Path:
    path = data / "train.bin"
    path.write_bytes(path.read_bytes()[:-101])
    return data


@dataclass
class Outcome:
    argv: list[str]
    returncode: int
    stderr: str
    changed: list[str]  # files created, changed or removed among the watched ones
    seconds: float
    folder: Path  # the case's folder (left out of the table's lines)


@pytest.fixture(scope="module")
def tiny_run(stories: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a random 2x32 model on the stories tokenizer (read-only)."""
    root = tmp_path_factory.mktemp("tiny") / "run"
    return make_tiny_run(root, tokenizer=load_tokenizer(stories), context=64,
                         data_dir=str(stories))  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(request, stories, tiny_run, tmp_path_factory) -> dict[str, Outcome]:
    """Run the selected cases (all of them for the table), a few child processes at a time."""
    items = [i for i in request.session.items if i.module is request.module]
    wanted = {i.callspec.params["case"].id for i in items if hasattr(i, "callspec")}
    if any(not hasattr(i, "callspec") for i in items):  # the table and the advice: all of them
        wanted = {case.id for case in CASES}
    jobs = []
    for case in (c for c in CASES if c.id in wanted):
        root = tmp_path_factory.mktemp(case.id)
        ctx = Ctx(root / "in", root / "out", stories, tiny_run)
        ctx.dir.mkdir()
        ctx.out.mkdir()
        argv = [str(a) for a in case.argv(ctx)]
        watched = (ctx.dir, stories, tiny_run)
        jobs.append((case, argv, watched, checksums(*watched)))

    def run(job) -> tuple[str, Outcome]:
        case, argv, watched, before = job
        start = time.perf_counter()
        done = lmforge_subprocess(*argv, input="", timeout=240, cwd=watched[0])
        seconds = time.perf_counter() - start
        after = checksums(*watched)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        outcome = Outcome(argv, done.returncode, done.stderr, changed, seconds, watched[0].parent)
        return case.id, outcome

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(pool.map(run, jobs))


PARAMS = [
    pytest.param(
        c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
    )
    for c in CASES
]


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input(case: Case, outcomes: dict[str, Outcome]) -> None:
    """Exit status 2, exactly one stderr line naming the problem, every input unchanged."""
    result = outcomes[case.id]
    shown = f"lmforge {' '.join(result.argv)}\n{result.stderr}"
    assert result.returncode == 2, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), shown
    assert case.expect in lines[0], shown
    assert result.changed == [], shown


def test_advice_names_real_commands(outcomes: dict[str, Outcome]) -> None:
    """What a message tells the user to run (`lmforge X ...`, "run lmforge X") exists."""
    named = {
        (case_id, command)
        for case_id, result in outcomes.items()
        for command in re.findall(r"(?:`|run )lmforge ([a-z][\w-]*)", result.stderr)
    }
    assert {(case_id, c) for case_id, c in named if c not in COMMANDS} == set()


def test_table(outcomes: dict[str, Outcome]) -> None:
    """The table case -> the one stderr line (shown with `pytest -s`)."""
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    width = max(len(c.id) for c in CASES)
    print()
    for case in CASES:
        result = outcomes[case.id]
        line = result.stderr.strip().replace("\n", " | ").replace(f"{result.folder}/", "")
        print(f"{case.id:<{width}} {result.seconds:5.1f}s [{result.returncode}] {line}")

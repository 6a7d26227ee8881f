"""load_metrics: lmforge runs, nanoGPT stdout, generic CSV/JSONL, and one-line errors."""

import json
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.monitor.logparse import load_metrics
from lmforge.monitor.metrics import MetricsWriter

FIXTURES = Path(__file__).parent / "fixtures" / "logs"


def test_nanogpt_stdout_written_in_its_documented_formats(tmp_path):
    # The f-strings nanoGPT's train.py prints with.
    losses = {i: 4.5 - 0.01 * i for i in range(0, 200, 10)}
    lines = ["tokens per iteration will be: 16,384", "number of parameters: 10.65M"]
    for i, loss in losses.items():
        if i % 50 == 0:
            lines.append(f"step {i}: train loss {loss:.4f}, val loss {loss + 0.05:.4f}")
        mfu = -1.0 if i < 50 else 0.2
        lines.append(
            f"iter {i}: loss {loss:.4f}, time {20.0 + i / 100:.2f}ms, mfu {mfu * 100:.2f}%"
        )
    log = tmp_path / "train.out"
    log.write_text("\n".join(lines) + "\n")
    table = load_metrics(log)
    assert table.format == "nanogpt-stdout"
    assert table.step == list(losses)
    assert table.loss == pytest.approx([round(v, 4) for v in losses.values()])
    assert table.val_step == [0, 50, 100, 150]
    assert table.val_loss == pytest.approx([losses[s] + 0.05 for s in (0, 50, 100, 150)], abs=1e-4)
    assert table.ms_per_step[1] == pytest.approx(20.1)
    # -100.00% is nanoGPT's "not measured yet", the rest are percent.
    assert not table.has("mfu") or all(v != v for v in table.mfu[:5])
    assert table.mfu[5] == pytest.approx(0.2)
    assert table.tokens_seen[1] == 11 * 16384  # `iter 10` is printed after the 11th step
    assert table.info["params"] == 10_650_000
    assert table.has("elapsed_s") and "elapsed_s" in table.info["estimated"][0]


def test_nanogpt_fixture_reads_config_and_model_settings():
    table = load_metrics(FIXTURES / "nanogpt_shakespeare_char.log")
    assert table.format == "nanogpt-stdout"
    assert table.step == [0, 10, 20, 30, 40]
    assert table.val_loss == [4.2823, 2.6206, 2.5105]
    assert table.info["model"] == {
        "n_layers": 6,
        "n_heads": 6,
        "dim": 384,
        "vocab_size": 65,
        "context": 256,
    }
    assert table.info["train"]["lr"] == 1e-3 and table.info["train"]["max_steps"] == 40


def test_generic_csv_with_other_column_names():
    table = load_metrics(FIXTURES / "generic.csv")
    assert table.format == "csv"
    assert table.step == [0, 10, 20, 30]
    assert table.loss == [4.2, 3.1, 2.6, 2.4]
    assert (table.val_step, table.val_loss) == ([0, 20], [4.25, 2.7])
    assert table.lr[2] == 3e-4
    assert table.elapsed_s == [0.5, 1.1, 1.8, 2.4]  # a rising "time" is a clock


def test_generic_jsonl_detected_from_content_not_extension(tmp_path):
    log = tmp_path / "metrics.log"
    log.write_text((FIXTURES / "generic.jsonl").read_text())
    table = load_metrics(log)
    assert table.format == "jsonl"
    assert table.step == [0, 5, 10] and table.loss == [4.1, 3.5, 3.0]
    assert (table.val_step, table.val_loss) == ([5], [3.6])


def test_lmforge_run_folder_brings_run_info_and_config(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps({"params": 1234, "entropy_floor": 1.1}))
    (run / "config.yaml").write_text("optim:\n  lr: 3.0e-4\n")
    with MetricsWriter(run / "logs") as writer:
        writer.write({"step": 10, "loss": 3.0, "val_loss": 3.1, "mfu": None})
        writer.write({"step": 20, "loss": float("nan")})
    table = load_metrics(run)
    assert table.format == "lmforge-run" and table.source == str(run)
    assert table.info["params"] == 1234 and table.info["config"]["optim"]["lr"] == 3e-4
    assert table.step == [10, 20] and table.val_step == [10]
    assert table.info["non_finite"] == "loss became nan at step 20"
    assert load_metrics(run / "logs" / "training_metrics.csv").format == "lmforge-csv"
    assert load_metrics(run / "logs" / "metrics.jsonl").format == "lmforge-jsonl"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "no such file"),
        ("empty.log", b"", "is empty"),
        ("blank.log", b"\n\n  \n", "is empty"),
        ("model.bin", bytes(range(256)) * 8, "looks binary"),
        ("no_step.csv", (FIXTURES / "no_step.csv").read_bytes(), "without a step column"),
        ("prose.txt", (FIXTURES / "prose.txt").read_bytes(), "no recognizable metrics"),
    ],
)
def test_unreadable_inputs_give_one_line_user_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        load_metrics(path)
    assert "\n" not in str(info.value)


def test_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="is it an lmforge run folder"):
        load_metrics(tmp_path)

"""`lmforge sft`: token-normalised accumulation, a run whose loss falls, refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    ALPHABET,
    checksums,
    lmforge,
    make_tiny_run,
    one_error_line,
    story_records,
    write_jsonl,
)

from lmforge.chat_format import Turn, chat_ids, render
from lmforge.config import ModelConfig
from lmforge.data.instruct import SFTBatches, pad_batch
from lmforge.errors import UserError
from lmforge.model import Transformer
from lmforge.tokenizers import ByteTokenizer, CharTokenizer
from lmforge.train.checkpoint import load_checkpoint
from lmforge.train.sft import InstructionBatches, chat_ready_model, split_conversations
from lmforge.train.trainer import Batches, Trainer, TrainSettings


# ------------------------------------------------------------------------- gradient accumulation
class FixedBatches(Batches):
    """Step 0's micro-batches, given."""

    def __init__(self, micro_batches: list[dict[str, torch.Tensor]]):
        self.micro_batches = micro_batches

    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        return self.micro_batches[micro_step]


def _one_sgd_step(
    micro_batches: list[dict[str, torch.Tensor]], normalisation: str = "tokens"
) -> list[torch.Tensor]:
    """Parameters after one SGD step with lr 1: the initial weights minus the gradient."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, dim=32, n_heads=2, context=64, vocab_size=257))
    model = model.double()
    settings = TrainSettings(
        max_steps=1,
        grad_accum=len(micro_batches),
        max_grad_norm=0.0,
        lr=1.0,
        schedule="constant",
        warmup_passes=0,
        loss_normalisation=normalisation,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(
        model,
        FixedBatches(micro_batches),
        optimizer=optimizer,
        device="cpu",
        settings=settings,
        log=lambda line: None,
    )
    trainer.train_step()
    return [p.detach().clone() for p in model.parameters()]


def test_accumulated_gradient_equals_the_whole_batch():
    tok = ByteTokenizer()
    # Replies of very different lengths: a per-micro-batch mean would weigh them wrongly.
    examples = [
        render([Turn("user", f"question {i}"), Turn("assistant", "a" * (1 + 7 * i))], tok)
        for i in range(8)
    ]
    pad = chat_ids(tok).pad
    whole = pad_batch(examples, pad)
    micro = [pad_batch(examples[k : k + 2], pad) for k in range(0, 8, 2)]
    for batch in [whole, *micro]:
        batch.pop("attention_mask")
    one = _one_sgd_step([whole])
    four = _one_sgd_step(micro)
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # The check has teeth: averaging each micro-batch separately moves the weights elsewhere.
    mean_four = _one_sgd_step(micro, normalisation="mean")
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(one, mean_four))


def test_instruction_batches_run_on_across_micro_steps_and_epochs():
    tok = ByteTokenizer()
    examples = [render([Turn("user", "q"), Turn("assistant", str(i))], tok) for i in range(6)]
    inner = SFTBatches(examples, batch_size=2, pad_id=chat_ids(tok).pad)
    batches = InstructionBatches(inner, grad_accum=2)
    assert batches.batches_per_epoch == 3
    assert torch.equal(batches.get(1, 1)["input_ids"], inner.batch(1, 0)["input_ids"])
    assert batches.epoch_of(0) == 0 and batches.epoch_of(2) == 1
    assert "attention_mask" not in batches.get(0, 0)


# ---------------------------------------------------------------------------- model and split
def test_unpadded_vocabulary_is_extended_with_mean_rows():
    cfg = ModelConfig(
        n_layers=2,
        dim=32,
        n_heads=2,
        context=32,
        vocab_size=50,
        pad_vocab_multiple=1,
        tie_embeddings=False,
    )
    model = Transformer(cfg)
    bigger, extended = chat_ready_model(model, tokenizer_vocab=50)
    assert extended and bigger.cfg.padded_vocab >= 54
    for name in ("wte.weight", "lm_head.weight"):
        old, new = model.state_dict()[name], bigger.state_dict()[name]
        torch.testing.assert_close(new[:50], old)
        torch.testing.assert_close(new[50:], old.mean(0, keepdim=True).expand(len(new) - 50, -1))
    padded = Transformer(ModelConfig(n_layers=2, dim=32, n_heads=2, context=32, vocab_size=50))
    assert chat_ready_model(padded, 50) == (padded, False)


def test_split_is_by_conversation_and_seeded():
    conversations = [[Turn("user", str(i)), Turn("assistant", str(i))] for i in range(40)]
    train, val = split_conversations(conversations, 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert not {c[0].content for c in train} & {c[0].content for c in val}
    assert split_conversations(conversations, 0.1, seed=3) == (train, val)
    with pytest.raises(UserError):
        split_conversations(conversations[:1], 0.1, seed=0)


# ------------------------------------------------------------------------------------- the CLI
SFT_ARGS = (
    "--train.batch_size=8",
    "--schedule.warmup_steps=2",
    "--train.warmup_passes=0",
    "--log.log_every=5",
    "--log.plot_every=0",
    "--train.sample_every=0",
    "--train.save_every=0",
    "--log.progress=false",
)


def _rows(run: Path) -> list[dict]:
    lines = (run / "logs" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_sft_runs_and_its_loss_falls(tmp_path):
    init = make_tiny_run(tmp_path / "pre")
    data = write_jsonl(tmp_path / "qa.jsonl", story_records(120))
    run = tmp_path / "sft"
    rc = lmforge(
        "sft",
        "--init-from",
        init,
        f"--run.dir={run}",
        f"--sft.data=stories-qa:{data}",
        "--train.max_steps=40",
        "--optim.lr=1e-2",
        "--train.eval_every=20",
        *SFT_ARGS,
    )
    assert rc == 0
    losses = [r["loss"] for r in _rows(run) if r.get("loss") is not None]
    assert losses[-1] < 0.75 * losses[0], losses
    info = json.loads((run / "run_info.json").read_text())
    assert info["phase"] == "sft" and info["examples"]["val"] == 6  # 5% of 120
    state = load_checkpoint(run / "checkpoints" / "final_model.pt")
    assert state["phase"] == "sft" and state["config"]["model"]["dim"] == 32
    assert (run / "tokenizer" / "vocab.json").is_file()
    assert (run / "logs" / "training_metrics.csv").is_file()


def test_sft_extends_an_unpadded_checkpoint(tmp_path):
    init = make_tiny_run(tmp_path / "pre", pad_vocab_multiple=1)
    data = write_jsonl(tmp_path / "qa.jsonl", story_records(30))
    run = tmp_path / "sft"
    assert (
        lmforge(
            "sft",
            "--init-from",
            init,
            f"--run.dir={run}",
            f"--sft.data={data}",
            "--train.max_steps=2",
            *SFT_ARGS,
        )
        == 0
    )
    state = load_checkpoint(run / "checkpoints" / "final_model.pt")
    vocab = state["config"]["model"]["vocab_size"]
    assert state["model"]["wte.weight"].shape[0] >= vocab + 4


@pytest.fixture
def sft_inputs(tmp_path):
    init = make_tiny_run(tmp_path / "pre")
    good = write_jsonl(tmp_path / "good.jsonl", story_records(20))
    return tmp_path, init, good


def _refused(tmp_path: Path, init: Path, capsys, *argv: str) -> str:
    before = checksums(tmp_path)
    run = tmp_path / "out"
    rc = lmforge("sft", f"--run.dir={run}", *SFT_ARGS, "--train.max_steps=2", *argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not run.exists()
    assert checksums(tmp_path) == before
    return one_error_line(err)


def test_sft_refuses_a_missing_init_from(sft_inputs, capsys):
    tmp_path, init, good = sft_inputs
    line = _refused(tmp_path, init, capsys, f"--sft.data={good}")
    assert "--init-from" in line


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"story": "Ben had a cup.", "question": "Who?", "answer": "Ben"\n', "not valid JSON"),
        ('{"story": "Ben had a cup.", "question": "Who had it?"}\n', "'answer'"),
        ("", "empty"),
    ],
)
def test_sft_refuses_bad_data(sft_inputs, capsys, content, says):
    tmp_path, init, _ = sft_inputs
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    line = _refused(
        tmp_path, init, capsys, "--init-from", str(init), f"--sft.data=stories-qa:{bad}"
    )
    assert says in line


def test_sft_refuses_plain_text_and_prepared_folders(sft_inputs, capsys):
    tmp_path, init, _ = sft_inputs
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a cat.\n\nIt slept.\n", encoding="utf-8")
    line = _refused(tmp_path, init, capsys, "--init-from", str(init), f"--sft.data={text}")
    assert "--sft.allow_plain_text=true" in line
    folder = tmp_path / "prepared"
    folder.mkdir()
    (folder / "meta.json").write_text("{}", encoding="utf-8")
    line = _refused(tmp_path, init, capsys, "--init-from", str(init), f"--sft.data={folder}")
    assert "prepared token folder" in line


def test_sft_refuses_data_prepared_for_another_tokenizer(tmp_path, capsys):
    init = make_tiny_run(tmp_path / "pre", tokenizer=ByteTokenizer())
    folder = tmp_path / "charprep"
    folder.mkdir()
    identity = CharTokenizer.build([ALPHABET]).identity()
    (folder / "meta.json").write_text(json.dumps({"tokenizer": identity}), encoding="utf-8")
    data = write_jsonl(folder / "qa_train.jsonl", story_records(10))
    line = _refused(tmp_path, init, capsys, "--init-from", str(init), f"--sft.data={data}")
    assert "tokenizer mismatch" in line


def test_sft_never_continues_a_pretraining_run(sft_inputs, capsys):
    tmp_path, init, good = sft_inputs
    (init / "run_info.json").write_text(json.dumps({"phase": "pretrain"}), encoding="utf-8")
    before = checksums(tmp_path)
    rc = lmforge(
        "sft",
        "--init-from",
        init,
        f"--run.dir={init}",
        f"--sft.data={good}",
        *SFT_ARGS,
        "--train.max_steps=2",
    )
    assert rc == 2
    assert "choose a new --run.dir" in one_error_line(capsys.readouterr().err)
    assert checksums(tmp_path) == before


def test_sft_resumes_and_refuses_changed_data(tmp_path, capsys):
    init = make_tiny_run(tmp_path / "pre")
    data = write_jsonl(tmp_path / "qa.jsonl", story_records(60))
    run = tmp_path / "sft"
    common = ("--init-from", init, f"--run.dir={run}", *SFT_ARGS, "--train.save_every=2")
    assert lmforge("sft", *common, f"--sft.data={data}", "--train.max_steps=4") == 0
    assert lmforge("sft", *common, f"--sft.data={data}", "--train.max_steps=6") == 0
    assert "resumed from" in capsys.readouterr().out
    assert load_checkpoint(run / "checkpoints" / "step_6.pt")["step"] == 6
    other = write_jsonl(tmp_path / "other.jsonl", story_records(30, seed=1))
    assert lmforge("sft", *common, f"--sft.data={other}", "--train.max_steps=8") == 2
    assert "sft.data" in one_error_line(capsys.readouterr().err)

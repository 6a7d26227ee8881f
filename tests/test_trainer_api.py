"""The Trainer's Python API, following the seed pipeline's usage examples (seeds/004), with
lmforge's own Transformer (tests/test_seed_api.py runs the document's examples as written).

A tiny model (2 layers, width 32) on a few KB of text: every test runs in about a second on CPU.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from lmforge.config import model_config
from lmforge.data.text import create_dataloaders
from lmforge.model import Transformer
from lmforge.train import Trainer

FIXTURES = Path(__file__).parent / "fixtures" / "text"
TRAIN, VAL = FIXTURES / "train.txt", FIXTURES / "val.txt"
MAX_LENGTH = 32


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """The API's default checkpoint_dir is ./checkpoints: keep it out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A width-32 model gains nothing from threads, and on a busy machine they spin: use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(tokenizer, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = model_config(
        "tiny",
        n_layers=2,
        dim=32,
        n_heads=2,
        context=64,
        vocab_size=tokenizer.vocab_size,
        pad_vocab_multiple=64,
    )
    return Transformer(cfg)


def loaders(batch_size: int = 8, shuffle: bool = True, val: bool = False, seed: int = 0):
    return create_dataloaders(
        TRAIN,
        VAL if val else None,
        batch_size=batch_size,
        max_length=MAX_LENGTH,
        shuffle=shuffle,
        seed=seed,
    )


def quiet_trainer(model, train_loader, val_loader=None, **kwargs) -> tuple[Trainer, list[str]]:
    lines: list[str] = []
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("log_interval", 1)
    return Trainer(model, train_loader, val_loader, log=lines.append, **kwargs), lines


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------ example 1: basics
def test_basic_training_loss_falls(tmp_path: Path) -> None:
    train_loader, _, tokenizer = loaders()
    model = tiny_model(tokenizer)
    trainer, lines = quiet_trainer(
        model,
        train_loader,
        checkpoint_dir=tmp_path,
        log_interval=2,
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
    )
    history = trainer.train(num_epochs=4)
    per_epoch = len(train_loader)
    steps = 4 * per_epoch
    assert trainer.global_step == steps and trainer.current_epoch == 4
    assert trainer.stop_reason == "finished"
    # One value per epoch, as the document's history has it...
    assert history["epoch"] == [1, 2, 3, 4]
    assert history["step"] == [per_epoch, 2 * per_epoch, 3 * per_epoch, steps]
    assert len(history["train_loss"]) == len(history["lr"]) == 4
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.5
    assert history["train_loss"][0] < math.log(tokenizer.vocab_size) + 1.0
    assert history == trainer.history.as_dict() == dict(trainer.history)
    assert trainer.history["train_loss"] == trainer.history.train_loss == history["train_loss"]
    # ...and one train_loss per log line (every 2 steps, and the last step) in its rows.
    logged = trainer.history.steps()
    assert logged["step"] == sorted(set(range(2, steps + 1, 2)) | {steps})
    assert sum(line.startswith("step ") for line in lines) == len(logged["step"])
    assert sum(line.startswith("epoch ") for line in lines) == 4


def test_epoch_train_loss_is_the_mean_of_its_steps() -> None:
    train_loader, _, tokenizer = loaders()
    model = tiny_model(tokenizer)
    trainer, _ = quiet_trainer(
        model, train_loader, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3)
    )
    history = trainer.train(num_epochs=2)
    per_step = trainer.history.steps()["train_loss"]  # log_interval=1: every step's loss
    per_epoch = len(train_loader)
    assert len(per_step) == 2 * per_epoch
    expected = [sum(per_step[:per_epoch]) / per_epoch, sum(per_step[per_epoch:]) / per_epoch]
    assert history["train_loss"] == pytest.approx(expected)


def test_default_optimizer_learns() -> None:
    # Seed example 1 verbatim (default AdamW, no checkpoint options): the loss goes down.
    train_loader, _, tokenizer = loaders()
    trainer, _ = quiet_trainer(tiny_model(tokenizer), train_loader)
    history = trainer.train(num_epochs=3)
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_seed_keyword_names(tmp_path: Path) -> None:
    # The seed documents Trainer(model=..., train_dataloader=..., val_dataloader=...).
    train_loader, val_loader, tokenizer = loaders(val=True)
    trainer = Trainer(
        model=tiny_model(tokenizer),
        train_dataloader=train_loader,
        val_dataloader=val_loader,
        device="cpu",
        checkpoint_dir=tmp_path,
        log=lambda line: None,
    )
    assert trainer.validate()["loss"] > 0


# ------------------------------------------------------------------------ example 2: validation
def test_validate_loss_and_perplexity(tmp_path: Path) -> None:
    train_loader, val_loader, tokenizer = loaders(val=True)
    trainer, _ = quiet_trainer(
        tiny_model(tokenizer), train_loader, val_loader, checkpoint_dir=tmp_path
    )
    metrics = trainer.validate()
    assert set(metrics) == {"loss", "perplexity"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    # An untrained model is about uniform over the (padded) vocabulary.
    assert abs(metrics["loss"] - math.log(tokenizer.vocab_size)) < 1.5
    assert trainer.validate() == metrics  # no state changes, no randomness


def test_training_with_validation_fills_val_history(tmp_path: Path) -> None:
    train_loader, val_loader, tokenizer = loaders(val=True)
    model = tiny_model(tokenizer)
    trainer, lines = quiet_trainer(
        model,
        train_loader,
        val_loader,
        checkpoint_dir=tmp_path,
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
    )
    history = trainer.train(num_epochs=3)
    # As the seed's example zips them: one validation per epoch.
    assert len(history["val_loss"]) == len(history["train_loss"]) == 3
    per_epoch = len(train_loader)
    assert history["step"] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert trainer.history.steps()["val_step"] == history["step"]
    assert history["val_perplexity"] == pytest.approx([math.exp(v) for v in history["val_loss"]])
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert trainer.best_val_loss == min(history["val_loss"])
    assert (tmp_path / "best.pt").is_file()
    assert any(line.startswith("eval step") for line in lines)


def test_step_time_and_tokens_per_s_leave_evaluations_out(tmp_path: Path, monkeypatch) -> None:
    """ms/step, tokens/s and MFU measure the training steps: a (1 s) evaluation between two log
    lines is not spread over the next interval's steps."""
    train_loader, val_loader, tokenizer = loaders(val=True)
    trainer, _ = quiet_trainer(
        tiny_model(tokenizer), train_loader, val_loader, checkpoint_dir=tmp_path, log_interval=2
    )
    validate = trainer.validate

    def slow_validate(*args, **kwargs):
        time.sleep(1.0)
        return validate(*args, **kwargs)

    monkeypatch.setattr(trainer, "validate", slow_validate)
    trainer.train(num_epochs=2)
    per_epoch = len(train_loader)
    rows = [r for r in trainer.history.rows if r.ms_per_step]
    assert [r.step for r in rows if r.step > per_epoch], "no log line after the first evaluation"
    assert max(r.ms_per_step for r in rows) < 500, [r.ms_per_step for r in rows]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="inductor on a CPU needs a C++ compiler")
def test_compiled_training_on_cpu_follows_the_eager_curve(tmp_path: Path) -> None:
    """--train.compile=true on a CPU (inductor's C++ kernels): the same losses step by step, the
    same validation (a second graph, compiled without gradients) and the same weights."""
    runs = []
    for compiled in (False, True):
        train_loader, val_loader, tokenizer = loaders(val=True, shuffle=False)
        model = tiny_model(tokenizer)
        trainer, _ = quiet_trainer(
            model, train_loader, val_loader, checkpoint_dir=tmp_path / str(compiled),
            compile_model=compiled,
        )  # fmt: skip
        trainer.train(max_steps=6)
        steps = trainer.history.steps()
        runs.append((steps["train_loss"], steps["val_loss"], params(model)))
    (eager_losses, eager_val, eager_weights), (losses, val, weights) = runs
    assert len(losses) == 6 and losses[-1] < losses[0] and val
    assert losses == pytest.approx(eager_losses, abs=1e-4)
    assert val == pytest.approx(eager_val, abs=1e-4)
    for name, w in weights.items():
        assert torch.allclose(w, eager_weights[name], atol=1e-4), name


# ------------------------------------------------------------------------ example 3: early stop
def test_early_stopping(tmp_path: Path) -> None:
    train_loader, val_loader, tokenizer = loaders(val=True)
    model = tiny_model(tokenizer)
    # A learning rate so small that val loss moves far less than min_delta: it cannot improve.
    trainer, lines = quiet_trainer(
        model,
        train_loader,
        val_loader,
        checkpoint_dir=tmp_path,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-9),
    )
    history = trainer.train(num_epochs=50, early_stopping_patience=2)
    # Epoch 1 sets the best, epochs 2 and 3 do not improve on it: stop after epoch 3.
    assert trainer.current_epoch == 3
    assert trainer.global_step == 3 * len(train_loader)
    assert len(history["val_loss"]) == 3
    assert trainer.stop_reason.startswith("early stopping")
    assert "2 evaluations" in trainer.stop_reason
    assert trainer.best_val_loss == pytest.approx(history["val_loss"][0], abs=1e-3)
    assert any(line.startswith("early stopping") for line in lines)
    assert (tmp_path / "best.pt").is_file()


def test_early_stopping_needs_validation_data() -> None:
    from lmforge.errors import UserError

    train_loader, _, tokenizer = loaders()
    trainer, _ = quiet_trainer(tiny_model(tokenizer), train_loader)
    with pytest.raises(UserError, match="validation data"):
        trainer.train(num_epochs=2, early_stopping_patience=2)
    with pytest.raises(UserError, match="validation data"):
        trainer.validate()


# ------------------------------------------------------------------------ example 4: custom
def test_custom_optimizer_and_criterion(tmp_path: Path) -> None:
    train_loader, val_loader, tokenizer = loaders(val=True)
    model = tiny_model(tokenizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    criterion = nn.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)
    trainer, _ = quiet_trainer(
        model,
        train_loader,
        val_loader,
        optimizer=optimizer,
        criterion=criterion,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        checkpoint_dir=tmp_path,
    )
    assert trainer.optimizers == [optimizer]
    history = trainer.train(num_epochs=4)
    assert optimizer.param_groups[0]["lr"] == 1.0  # the user's learning rate is kept
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.3
    assert max(trainer.history.steps()["grad_norm"]) > 0
    # validate() uses the criterion too: its per-batch means, weighted by target tokens.
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in val_loader:
            logits = model(batch["input_ids"])
            loss = criterion(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
            tokens = int((batch["labels"] != -100).sum())
            total, count = total + float(loss) * tokens, count + tokens
    assert trainer.validate()["loss"] == pytest.approx(total / count, rel=1e-5)


# ------------------------------------------------------------------------ example 5: resume
@pytest.mark.parametrize("shuffle", [False, True], ids=["ordered", "seeded-shuffle"])
def test_resume_matches_uninterrupted_run(tmp_path: Path, shuffle: bool) -> None:
    def run(epochs_first: int | None):
        train_loader, _, tokenizer = loaders(batch_size=4, shuffle=shuffle)
        model = tiny_model(tokenizer)
        directory = tmp_path / f"run_{epochs_first}"
        trainer, _ = quiet_trainer(
            model,
            train_loader,
            checkpoint_dir=directory,
            optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        )
        if epochs_first is None:
            return trainer.train(num_epochs=4), model
        trainer.train(num_epochs=epochs_first)
        assert len(trainer.history["train_loss"]) == epochs_first
        path = directory / "my_checkpoint.pt"
        trainer.save_checkpoint(path)
        # A new process: new loaders, a new (differently initialised) model, a new Trainer.
        train_loader, _, tokenizer = loaders(batch_size=4, shuffle=shuffle)
        new_model = tiny_model(tokenizer, seed=123)
        resumed, _ = quiet_trainer(
            new_model,
            train_loader,
            checkpoint_dir=directory,
            optimizer=torch.optim.AdamW(new_model.parameters(), lr=3e-3),
        )
        resumed.load_checkpoint(path)
        assert resumed.current_epoch == epochs_first
        assert resumed.global_step == epochs_first * len(train_loader)
        assert resumed.history["epoch"] == list(range(1, epochs_first + 1))
        # The document's "continue from epoch 11": num_epochs counts from the checkpoint on.
        return resumed.train(num_epochs=4 - epochs_first), new_model

    history_full, model_full = run(None)
    history_resumed, model_resumed = run(2)
    assert history_resumed == history_full
    for name, value in model_full.state_dict().items():
        assert torch.equal(value, model_resumed.state_dict()[name]), name


def test_resume_mid_epoch(tmp_path: Path) -> None:
    # A crash between epochs' ends: the loader is fast-forwarded inside the epoch.
    def make():
        train_loader, _, tokenizer = loaders(batch_size=4, shuffle=False)
        model = tiny_model(tokenizer)
        trainer, _ = quiet_trainer(
            model,
            train_loader,
            checkpoint_dir=tmp_path / "mid",
            optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        )
        return trainer, model, len(train_loader)

    full, model_full, per_epoch = make()
    full.train(num_epochs=2)
    first, _, _ = make()
    first.train(max_steps=per_epoch + 3)
    path = first.save_checkpoint()
    resumed, model_resumed, _ = make()
    resumed.load_checkpoint(path)
    resumed.train(num_epochs=1)  # the rest of the epoch that was under way
    assert resumed.global_step == full.global_step == 2 * per_epoch
    assert resumed.history.as_dict() == full.history.as_dict()
    assert resumed.history.steps() == full.history.steps()
    for name, value in model_full.state_dict().items():
        assert torch.equal(value, model_resumed.state_dict()[name]), name


# ------------------------------------------------------------------------ accumulation
def test_gradient_accumulation_equals_bigger_batch(tmp_path: Path) -> None:
    big_loader, _, tokenizer = loaders(batch_size=8, shuffle=False)
    small_loader, _, _ = loaders(batch_size=4, shuffle=False)
    first = next(iter(big_loader))
    # The "mean" loss of each micro-batch is divided by the accumulation steps: equal to the big
    # batch's mean only when the micro-batches have equal numbers of target tokens (no padding).
    assert bool((first["labels"] != -100).all())
    models = []
    for loader, accumulation in ((big_loader, 1), (small_loader, 2)):
        model = tiny_model(tokenizer)
        trainer, _ = quiet_trainer(
            model,
            loader,
            gradient_accumulation_steps=accumulation,
            checkpoint_dir=tmp_path / str(accumulation),
            optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        )
        trainer.train(max_steps=1)
        assert trainer.global_step == 1
        models.append(model)
    start = tiny_model(tokenizer).state_dict()
    # Summed in another order, the gradients differ in their last bits; AdamW's first step moves
    # each weight by about lr * sign(grad), so a gradient near its eps can move a weight a little
    # differently: 1e-5 is 0.1 % of that step (a wrong accumulation is off by the whole step).
    for name, value in models[0].state_dict().items():
        assert not torch.equal(value, start[name]) or "rope" in name, name  # it did train
        torch.testing.assert_close(models[1].state_dict()[name], value, atol=1e-5, rtol=0)


def test_accumulation_epoch_reads_every_batch_once() -> None:
    # 7 batches, 2 per step: an epoch is 4 steps, the last with the 1 batch left; the next
    # epoch starts on a step of its own (with the loader's order of that epoch).
    train_loader, _, tokenizer = loaders(batch_size=12, shuffle=True)
    assert len(train_loader) == 7
    trainer, _ = quiet_trainer(tiny_model(tokenizer), train_loader, gradient_accumulation_steps=2)
    read: list[torch.Tensor] = []
    get = trainer.train_data.get

    def recording_get(step: int, micro_step: int) -> dict[str, torch.Tensor]:
        batch = get(step, micro_step)
        read.append(batch["input_ids"])
        return batch

    trainer.train_data.get = recording_get
    history = trainer.train(num_epochs=2, save_every=0)
    assert trainer.global_step == 8 and history["step"] == [4, 8] and len(read) == 14
    for epoch in range(2):
        train_loader.sampler.set_epoch(epoch)
        expected = [batch["input_ids"] for batch in train_loader]
        assert all(torch.equal(a, b) for a, b in zip(read[7 * epoch : 7 * epoch + 7], expected))


# ------------------------------------------------------------------------ history, checkpoints
def test_save_history_writes_json(tmp_path: Path) -> None:
    train_loader, val_loader, tokenizer = loaders(val=True)
    trainer, _ = quiet_trainer(
        tiny_model(tokenizer), train_loader, val_loader, checkpoint_dir=tmp_path
    )
    history = trainer.train(num_epochs=1, early_stopping_patience=5)
    path = tmp_path / "history.json"
    trainer.save_history(path)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved == history
    assert {"train_loss", "val_loss", "lr", "step", "epoch"} <= set(saved)
    assert len(saved["train_loss"]) == len(saved["val_loss"]) == 1


def test_save_every_epoch_writes_checkpoints(tmp_path: Path) -> None:
    train_loader, _, tokenizer = loaders()
    trainer, _ = quiet_trainer(tiny_model(tokenizer), train_loader, checkpoint_dir=tmp_path)
    trainer.train(num_epochs=2, save_every=1)
    per_epoch = len(train_loader)
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == sorted(
        [f"step_{per_epoch}.pt", f"step_{2 * per_epoch}.pt"]
    )


@pytest.mark.parametrize("schedule, stops_at", [("cosine", 15), ("wsd", 40)])
def test_early_stopping_waits_for_a_wsd_decay(schedule, stops_at, monkeypatch):
    """The val loss never improves after the first evaluation (every 5 steps, patience 2). With a
    cosine schedule training stops at step 15; with wsd, whose rate is held at its peak until step
    30 of 60, evaluations up to then do not count, and it stops at step 40, inside the decay."""
    from lmforge.train.trainer import TrainSettings

    train, val, tok = loaders(val=True)
    settings = TrainSettings.for_api(schedule=schedule, max_steps=60, wsd_decay_fraction=0.5,
                                     eval_every=5, patience=2, lr=1e-3)  # fmt: skip
    trainer = Trainer(tiny_model(tok), train, val, device="cpu", settings=settings)
    losses = iter(3.0 + 0.01 * i for i in range(100))  # worse at every evaluation
    monkeypatch.setattr(trainer, "validate", lambda: {"loss": next(losses), "perplexity": 1.0})
    trainer.train()
    assert trainer.global_step == stops_at
    assert trainer.stop_reason.startswith("early stopping")

"""The seed Trainer document (seeds/004, "Training Pipeline Documentation"), run as a user would
paste it: every example and signature, against lmforge, asserting what its text promises.

The only edits to the pasted code: imports name lmforge's modules (`training.dataset` ->
`lmforge.data.text`, `training.trainer` -> `lmforge.train`); `ExpertModel` (the document imports
it from its own `models.expert`, not shown) is the small GPT below, an `nn.Module` whose
`forward(x)` returns logits, built smaller than the document's 512 x 8 layers so that each test
takes seconds on a CPU; data files are small fixtures written into `data/`; a seed is set before
each model. Where a test departs further, its docstring says so.

| document | test |
|---|---|
| 1. SimpleTokenizer usage (build_vocab, encode, decode, len) | test_simple_tokenizer_usage |
| 2. TextDataset usage (file + SimpleTokenizer, sample dict) | test_text_dataset_usage |
| 2. Sliding window (10 tokens, max_length=5, stride=3) | test_sliding_window_example |
| 3. create_dataloaders (train/val, batch 8, 512, num_workers=4) | test_create_dataloaders_usage |
| 3. Collate function (padding, attention_mask, labels -100) | test_collate_example |
| 4. Trainer parameters table and methods block | test_trainer_parameters_and_methods |
| Example 1: basic training | test_example_1_basic_training |
| Example 2: training with validation | test_example_2_validation |
| Example 3: early stopping | test_example_3_early_stopping |
| Example 4: customisation | test_example_4_customisation |
| Example 5: resume training | test_example_5_resume_continues_at_the_next_epoch |
| API reference: signatures, attributes | test_api_reference_signatures |
| validate() over the whole val loader | test_validate_averages_the_whole_loader |
| save_checkpoint(path, is_best=True) | test_save_checkpoint_is_best |
| Best practices 1: effective batch | test_gradient_accumulation_effective_batch |
| Best practices 3: checkpoint strategy | test_checkpoint_strategy |
| Best practices 5: debugging (batch, logits, overfit one batch) | test_debugging_snippets |
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lmforge.data.text import SimpleTokenizer, TextDataset, create_dataloaders
from lmforge.train import Trainer

FIXTURES = Path(__file__).parent / "fixtures" / "text"
# ExpertModel's size in these tests (the document's: d_model=512, n_layers=8, n_heads=8,
# d_ff=2048, max_seq_len=512).
SIZE = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=512)
TINY = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64)  # where only the mechanics matter


# ------------------------------------------------------------------------------ the user's model
class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, C // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.ff(self.norm2(x))


class ExpertModel(nn.Module):
    """A user's own GPT: `forward(x)` returns logits (B, T, vocab_size); it knows no labels."""

    def __init__(self, vocab_size: int, d_model: int = 512, n_layers: int = 8, n_heads: int = 8,
                 d_ff: int = 2048, max_seq_len: int = 512) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.norm, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def expert_model(tokenizer, seed: int = 0, **size: int) -> ExpertModel:
    torch.manual_seed(seed)
    return ExpertModel(vocab_size=len(tokenizer), **{**SIZE, **size})


# ------------------------------------------------------------------------------ data and setup
@pytest.fixture(autouse=True)
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The document's relative paths: data/train.txt, data/val.txt, checkpoints/."""
    (tmp_path / "data").mkdir()
    documents = FIXTURES.joinpath("train.txt").read_text(encoding="utf-8").split("\n\n")
    # 9 of its 12 documents: three 512-token windows (stride 256), one batch per epoch.
    (tmp_path / "data" / "train.txt").write_text("\n\n".join(documents[:9]), encoding="utf-8")
    # For the tests of many epochs: 3 documents, one batch of 64-token windows per epoch.
    (tmp_path / "data" / "small.txt").write_text("\n\n".join(documents[:3]), encoding="utf-8")
    shutil.copy(FIXTURES / "val.txt", tmp_path / "data" / "val.txt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small gain nothing from threads, and on a busy machine they spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_files() -> list[str]:
    return sorted((p.name for p in Path("checkpoints").glob("step_*.pt")), key=_step_number)


def _step_number(name: str) -> int:
    return int(name.removeprefix("step_").removesuffix(".pt"))


# ------------------------------------------------------------------------------ 1. SimpleTokenizer
def test_simple_tokenizer_usage(capsys: pytest.CaptureFixture[str]) -> None:
    # Создание и построение словаря
    tokenizer = SimpleTokenizer(vocab_size=10000)
    texts = ["это первый текст", "это второй текст"]
    tokenizer.build_vocab(texts)

    # Encode/Decode
    encoded = tokenizer.encode("это тест")  # [2, 5, 7, 3]
    decoded = tokenizer.decode(encoded)  # "это тест"

    # Информация
    print(f"Vocab size: {len(tokenizer)}")  # 10000
    print(f"PAD token ID: {tokenizer.pad_token_id}")  # 0

    # <BOS> ... <EOS> around the words; "тест" is not in the two texts: <UNK>.
    assert encoded[0] == tokenizer.bos_token_id == 2 and encoded[-1] == tokenizer.eos_token_id == 3
    assert tokenizer.unk_token_id == 1 and tokenizer.unk_token_id in encoded
    assert decoded == "это <unk>"
    assert tokenizer.decode(tokenizer.encode("это текст")) == "это текст"
    # len(tokenizer) is the vocabulary's size: the specials, the 4 words and the space here;
    # the document's 10000 (its vocab_size, the most it holds) once the texts have that many.
    assert len(tokenizer) == 4 + 4 + 1
    assert capsys.readouterr().out == f"Vocab size: {len(tokenizer)}\nPAD token ID: 0\n"
    big = SimpleTokenizer(vocab_size=10000)
    big.build_vocab([" ".join(f"word{i}" for i in range(20000))])
    assert len(big) == 10000


# ------------------------------------------------------------------------------ 2. TextDataset
def test_text_dataset_usage() -> None:
    texts = Path("data/train.txt").read_text(encoding="utf-8").split("\n\n")
    tokenizer = SimpleTokenizer(vocab_size=10000)
    tokenizer.build_vocab(texts)

    dataset = TextDataset(file_path="data/train.txt", tokenizer=tokenizer, max_length=512)

    # Получение sample
    sample = dataset[0]
    # {'input_ids': Tensor[seq_len], 'labels': Tensor[seq_len]}

    assert set(sample) == {"input_ids", "labels"}
    assert sample["input_ids"].shape == sample["labels"].shape == (512,)
    # Целевые токены (смещены на 1): labels[i] is the token after input_ids[i].
    assert torch.equal(sample["labels"][:-1], sample["input_ids"][1:])
    # The document's stride 256: windows overlap by half.
    assert dataset.stride == 256 and dataset.starts[:2] == [0, 256]
    assert torch.equal(dataset[1]["input_ids"][:256], sample["input_ids"][256:])
    # A document is <bos> ... <eos> with a SimpleTokenizer (<eos> is also its end-of-text).
    assert dataset.tokens[0] == tokenizer.bos_token_id
    assert int((dataset.tokens == tokenizer.eos_token_id).sum()) == len(texts)


def test_sliding_window_example() -> None:
    """Текст: [0..9], max_length=5, stride=3 -> [0..4], [3..7], [6..9]."""
    Path("data/digits.txt").write_text("0 1 2 3 4 5 6 7 8", encoding="utf-8")

    class Digits:  # ids 0..8 for the digits, 9 for end-of-text
        eot_id = 9

        def encode(self, text: str) -> list[int]:
            return [int(word) for word in text.split()]

    dataset = TextDataset("data/digits.txt", Digits(), max_length=5, stride=3)
    assert dataset.tokens.tolist() == list(range(10))
    # Chunks 1 and 2 are the inputs of samples 0 and 1; chunk 3 is sample 2's inputs [6, 7, 8]
    # with its last target 9 (a window holds max_length inputs and the last one's target).
    assert dataset[0]["input_ids"].tolist() == [0, 1, 2, 3, 4]
    assert dataset[1]["input_ids"].tolist() == [3, 4, 5, 6, 7]
    assert dataset.window(2).tolist() == [6, 7, 8, 9] and len(dataset) == 3


# ------------------------------------------------------------------------------ 3. DataLoaders
def test_create_dataloaders_usage() -> None:
    train_loader, val_loader, tokenizer = create_dataloaders(
        train_file="data/train.txt",
        val_file="data/val.txt",  # Опционально
        batch_size=8,
        max_length=512,
        num_workers=4,
    )

    # Готовые DataLoaders и токенайзер!
    batch = next(iter(train_loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] == 512 and batch["input_ids"].max() < len(tokenizer)
    assert val_loader is not None and len(next(iter(val_loader))["input_ids"]) >= 1
    assert train_loader.num_workers == 4


def test_collate_example() -> None:
    from lmforge.data.text import collate

    batch = collate([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[2, 3, 4, -100, -100, -100, -100], [2, 3, 4, 5, 6, 7, -100]]
    # "Label -100 игнорируется в CrossEntropyLoss": the Trainer's default loss ignores it too.
    logits = torch.randn(2, 7, 10)
    labels = batch["labels"].reshape(-1)
    real = labels != -100
    by_hand = nn.CrossEntropyLoss()(logits.reshape(-1, 10)[real], labels[real])
    ignoring = nn.CrossEntropyLoss(ignore_index=-100)(logits.reshape(-1, 10), labels)
    assert float(ignoring) == pytest.approx(float(by_hand))


# ------------------------------------------------------------------------------ 4. Trainer
def test_trainer_parameters_and_methods(tmp_path: Path) -> None:
    """The parameter table, positionally in the documented order, and the methods block."""
    train_loader, val_loader, tokenizer = create_dataloaders(
        train_file="data/train.txt", val_file="data/val.txt", batch_size=8, max_length=512
    )
    model = expert_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = Trainer(model, train_loader, val_loader, optimizer, nn.CrossEntropyLoss(), "cpu",
                      1, 1.0, "checkpoints", 10)  # fmt: skip
    assert trainer.optimizers == [optimizer] and trainer.checkpoint_dir == Path("checkpoints")
    assert trainer.settings.log_every == 10 and trainer.settings.grad_accum == 1

    # Обучение
    trainer.train(num_epochs=2, save_every=1, early_stopping_patience=3)
    # Валидация
    val_metrics = trainer.validate()
    # Checkpoint management
    path = Path("checkpoints/manual.pt")
    trainer.save_checkpoint(path)
    trainer.load_checkpoint(path)
    # История
    trainer.save_history(Path("history.json"))

    assert set(val_metrics) == {"loss", "perplexity"}
    assert val_metrics["perplexity"] == pytest.approx(math.exp(val_metrics["loss"]))
    assert step_files() == ["step_1.pt", "step_2.pt"]  # save_every=1: after each epoch
    saved = json.loads(Path("history.json").read_text(encoding="utf-8"))
    assert saved == dict(trainer.history) and saved["epoch"] == [1, 2]
    assert trainer.current_epoch == 2 and trainer.global_step == 2


# ------------------------------------------------------------------------------ examples
def test_example_1_basic_training(capsys: pytest.CaptureFixture[str]) -> None:
    """The loss falls by more than 0.2 nats over the 10 epochs, with the default AdamW."""
    # 1. Создание DataLoaders
    train_loader, _, tokenizer = create_dataloaders(
        train_file="data/train.txt", batch_size=8, max_length=512
    )

    # 2. Создание модели
    torch.manual_seed(0)
    model = ExpertModel(
        vocab_size=len(tokenizer),
        d_model=64,  # the document: 512, 8 layers, 8 heads, d_ff 2048
        n_layers=2,
        n_heads=4,
        d_ff=128,
        max_seq_len=512,
    )

    # 3. Создание Trainer
    trainer = Trainer(model=model, train_dataloader=train_loader, device="cpu")

    # 4. Обучение
    history = trainer.train(num_epochs=10)

    print(f"Final loss: {history['train_loss'][-1]:.4f}")

    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"Final loss: {history['train_loss'][-1]:.4f}"
    assert len(history["train_loss"]) == 10 and history["epoch"] == list(range(1, 11))
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.2
    assert history["train_loss"][0] == pytest.approx(math.log(len(tokenizer)), abs=0.5)
    assert trainer.current_epoch == 10 and trainer.global_step == 10 * len(train_loader)
    # save_every=1 (the default): a checkpoint per epoch, the newest 5 kept.
    assert step_files() == [f"step_{e}.pt" for e in range(6, 11)]
    assert sum(line.startswith("epoch ") for line in out.splitlines()) == 10


def test_example_2_validation(capsys: pytest.CaptureFixture[str]) -> None:
    """One train and one val loss per epoch, paired by the zip; both fall."""
    # Добавляем validation set
    train_loader, val_loader, tokenizer = create_dataloaders(
        train_file="data/train.txt",
        val_file="data/val.txt",  # Validation data
        batch_size=8,
        max_length=512,
    )

    model = expert_model(tokenizer)  # ExpertModel(...)

    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        val_dataloader=val_loader,  # Добавляем validation
        device="cpu",
    )

    history = trainer.train(num_epochs=10)
    capsys.readouterr()

    # Анализ результатов
    for epoch, (train_loss, val_loss) in enumerate(
        zip(history["train_loss"], history["val_loss"]), 1
    ):
        print(f"Epoch {epoch}: Train={train_loss:.4f}, Val={val_loss:.4f}")

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 and lines[0].startswith("Epoch 1: Train=")
    assert len(history["train_loss"]) == len(history["val_loss"]) == 10
    assert history["val_loss"][-1] < history["val_loss"][0] - 0.2
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.2
    # The last epoch's val loss is validate() of the model as it is now.
    assert trainer.validate()["loss"] == pytest.approx(history["val_loss"][-1], rel=1e-6)
    assert trainer.best_val_loss == min(history["val_loss"])


def test_example_3_early_stopping(capsys: pytest.CaptureFixture[str]) -> None:
    """The val text is in words the train vocabulary does not know (every val token is <unk>,
    which training only makes less likely): no epoch after the first improves on it, and
    training stops after 3 of them, at epoch 4 of 50."""
    Path("data/val.txt").write_text("—".join(["незнакомое", "слово"] * 150), encoding="utf-8")
    train_loader, val_loader, tokenizer = create_dataloaders(
        train_file="data/train.txt", val_file="data/val.txt", batch_size=8, max_length=512
    )
    assert set(val_loader.dataset.tokens.tolist()) == {tokenizer.unk_id, tokenizer.eot_id}
    model = expert_model(tokenizer)

    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        val_dataloader=val_loader,
        device="cpu",
    )

    # Early stopping при отсутствии улучшения 3 эпохи
    history = trainer.train(num_epochs=50, early_stopping_patience=3)

    print(f"Stopped at epoch: {trainer.current_epoch}")
    print(f"Best val loss: {trainer.best_val_loss:.4f}")

    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["Stopped at epoch: 4", f"Best val loss: {history['val_loss'][0]:.4f}"]
    assert trainer.current_epoch == 4 and len(history["val_loss"]) == 4
    assert trainer.stop_reason.startswith("early stopping")
    min_delta = trainer.settings.min_delta
    assert all(v >= history["val_loss"][0] - min_delta for v in history["val_loss"][1:])
    # The best model is kept: checkpoints/best.pt holds epoch 1's weights.
    best = Trainer(expert_model(tokenizer, seed=1), train_loader, val_loader, device="cpu")
    best.load_checkpoint("checkpoints/best.pt")
    assert best.validate()["loss"] == pytest.approx(trainer.best_val_loss, rel=1e-6)


def test_example_3_min_delta(capsys: pytest.CaptureFixture[str]) -> None:
    """Early stopping counts an epoch whose val loss fell by less than min_delta (0.001) as no
    improvement: with a learning rate of 1e-6 every epoch improves, by far less."""
    train_loader, val_loader, tokenizer = create_dataloaders(
        train_file="data/train.txt", val_file="data/val.txt", batch_size=8, max_length=512
    )
    model = expert_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    trainer = Trainer(model, train_loader, val_loader, optimizer=optimizer, device="cpu")
    history = trainer.train(num_epochs=50, early_stopping_patience=2)
    assert trainer.current_epoch == 3
    assert history["val_loss"][2] < history["val_loss"][1] < history["val_loss"][0]
    assert history["val_loss"][0] - history["val_loss"][2] < trainer.settings.min_delta


def test_example_4_customisation() -> None:
    """device='cuda' where CUDA is available, else 'cpu' (this machine's case). Batch 4 and
    max_length 64 give 7 batches per epoch: with 4-batch accumulation an epoch is 2 steps, the
    second with the 3 batches left, so every batch is read once per epoch."""
    train_loader, _, tokenizer = create_dataloaders(
        train_file="data/train.txt", batch_size=4, max_length=64
    )
    assert len(train_loader) == 7
    model = expert_model(tokenizer)

    # Кастомный оптимизатор
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)

    # Кастомный loss
    criterion = nn.CrossEntropyLoss(
        ignore_index=-100,
        label_smoothing=0.1,  # Label smoothing
    )

    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        optimizer=optimizer,
        criterion=criterion,
        gradient_accumulation_steps=4,  # Gradient accumulation
        max_grad_norm=0.5,  # Gradient clipping
        device="cuda" if torch.cuda.is_available() else "cpu",  # GPU
    )

    history = trainer.train(num_epochs=20)

    assert len(history["train_loss"]) == 20 and trainer.global_step == 40
    assert history["train_loss"][-1] < history["train_loss"][0] - 1.0
    assert optimizer.param_groups[0]["lr"] == 1e-3  # the user's learning rate is kept
    assert trainer.settings.max_grad_norm == 0.5
    per_epoch = sum(batch["input_ids"].numel() for batch in train_loader)
    assert trainer.tokens_seen == 20 * per_epoch
    # Label smoothing: the loss cannot go below the smoothed targets' entropy.
    n = len(tokenizer)
    floor = -(0.9 + 0.1 / n) * math.log(0.9 + 0.1 / n) - (n - 1) * (0.1 / n) * math.log(0.1 / n)
    assert min(history["train_loss"]) > floor


def test_example_5_resume_continues_at_the_next_epoch() -> None:
    """train(num_epochs=10) after loading the epoch-10 checkpoint trains epochs 11..20, and the
    result is the 20-epoch run's, bit for bit (same history, same weights)."""
    train_loader, _, tokenizer = create_dataloaders(
        train_file="data/small.txt", batch_size=32, max_length=64
    )
    assert len(train_loader) == 1
    model = expert_model(tokenizer)

    # Первое обучение
    trainer1 = Trainer(model, train_loader, checkpoint_dir="checkpoints")
    trainer1.train(num_epochs=10)

    # Сохранение checkpoint
    checkpoint_path = Path("checkpoints/my_checkpoint.pt")
    trainer1.save_checkpoint(checkpoint_path)

    # Создание новой модели и продолжение обучения
    new_model = expert_model(tokenizer, seed=1)  # ExpertModel(...)
    trainer2 = Trainer(new_model, train_loader)
    trainer2.load_checkpoint(checkpoint_path)

    # Продолжаем с эпохи 11
    assert trainer2.current_epoch == 10
    history = trainer2.train(num_epochs=10)

    assert history["epoch"] == list(range(1, 21)) and trainer2.current_epoch == 20
    reference_model = expert_model(tokenizer)
    reference = Trainer(reference_model, train_loader, checkpoint_dir="reference")
    assert reference.train(num_epochs=20, save_every=0) == history
    for name, value in reference_model.state_dict().items():
        assert torch.equal(value, new_model.state_dict()[name]), name


# ------------------------------------------------------------------------------ API reference
def test_api_reference_signatures() -> None:
    def parameters(function) -> dict[str, object]:
        return {
            name: p.default
            for name, p in inspect.signature(function).parameters.items()
            if name != "self"
        }

    assert parameters(SimpleTokenizer.__init__) == {"vocab_size": 10000}
    assert list(parameters(SimpleTokenizer.build_vocab)) == ["texts"]
    assert parameters(SimpleTokenizer.encode) == {"text": inspect.Parameter.empty,
                                                  "add_special_tokens": True}  # fmt: skip
    assert parameters(SimpleTokenizer.decode) == {"token_ids": inspect.Parameter.empty,
                                                  "skip_special_tokens": True}  # fmt: skip
    tokenizer = SimpleTokenizer()
    tokenizer.build_vocab(["a b"])
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 3)
    assert tokenizer.word2idx["a"] == 5 and tokenizer.idx2word[5] == "a" and len(tokenizer) == 7

    dataset = parameters(TextDataset.__init__)
    # stride: None = the document's 256 at max_length 512 (never more than half of max_length).
    assert list(dataset)[:4] == ["file_path", "tokenizer", "max_length", "stride"]
    assert dataset["max_length"] == 512
    assert TextDataset("data/train.txt", tokenizer).stride == 256

    trainer = parameters(Trainer.__init__)
    documented = {
        "model": inspect.Parameter.empty,
        "optimizer": None,
        "criterion": None,
        "gradient_accumulation_steps": 1,
        "max_grad_norm": 1.0,
        "checkpoint_dir": "checkpoints",
        "log_interval": 10,
        "train_dataloader": None,  # given positionally as train_data, or by this name
        "val_dataloader": None,
    }
    assert {k: trainer[k] for k in documented} == documented
    assert trainer["device"] == "auto"  # the document: "cpu" (SPEC §3: auto; see Trainer doc)
    train = parameters(Trainer.train)
    assert list(train)[:3] == ["num_epochs", "save_every", "early_stopping_patience"]
    assert parameters(Trainer.save_checkpoint)["is_best"] is False
    assert list(parameters(Trainer.load_checkpoint)) == ["path"]
    assert list(parameters(Trainer.save_history)) == ["path"]

    train_loader, _, tok = create_dataloaders("data/train.txt", batch_size=8, max_length=512)
    instance = Trainer(expert_model(tok), train_loader, device="cpu")
    returned = instance.train(1, 0)  # positionally: num_epochs, save_every
    assert isinstance(returned, dict) and all(isinstance(v, list) for v in returned.values())
    assert isinstance(instance.current_epoch, int) and isinstance(instance.global_step, int)
    assert instance.best_val_loss == math.inf  # no validation data
    assert instance.history["train_loss"] == returned["train_loss"]


def test_validate_averages_the_whole_loader() -> None:
    """validate() is the mean loss per target token over every batch of the val loader (here 38
    batches: more than the CLI's 20 eval batches), padding ignored."""
    train_loader, _, tokenizer = create_dataloaders("data/train.txt", batch_size=8, max_length=512)
    _, val_loader, _ = create_dataloaders(
        "data/train.txt", "data/val.txt", batch_size=1, max_length=16, tokenizer=tokenizer
    )
    assert len(val_loader) > 20
    model = expert_model(tokenizer)
    trainer = Trainer(model, train_loader, val_loader, device="cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in val_loader:
            logits = model(batch["input_ids"])
            total += float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                           ignore_index=-100, reduction="sum"))  # fmt: skip
            count += int((batch["labels"] != -100).sum())
    assert trainer.validate()["loss"] == pytest.approx(total / count, rel=1e-6)


def test_save_checkpoint_is_best() -> None:
    train_loader, val_loader, tokenizer = create_dataloaders(
        "data/train.txt", "data/val.txt", batch_size=8, max_length=512
    )
    trainer = Trainer(expert_model(tokenizer), train_loader, val_loader, device="cpu")
    trainer.train(num_epochs=2, save_every=0)
    path = Path("checkpoints/epoch_2.pt")
    trainer.save_checkpoint(path, is_best=True)
    assert path.is_file() and Path("checkpoints/best.pt").is_file()
    for saved in (path, Path("checkpoints/best.pt")):
        other = Trainer(expert_model(tokenizer, seed=5), train_loader, val_loader, device="cpu")
        other.load_checkpoint(saved)
        assert other.global_step == 2 and other.current_epoch == 2
        assert other.validate() == trainer.validate()
    trainer.save_checkpoint(Path("checkpoints/plain.pt"))  # is_best=False: best.pt unchanged
    assert torch.load("checkpoints/best.pt", weights_only=True)["step"] == 2


# ------------------------------------------------------------------------------ best practices
def test_gradient_accumulation_effective_batch() -> None:
    """effective_batch_size = batch_size * gradient_accumulation_steps: batch 4 x 4 makes the
    same first step as batch 16 (equal-length windows, so the means agree)."""
    models = []
    for batch_size, accumulation in ((16, 1), (4, 4)):
        train_loader, _, tokenizer = create_dataloaders(
            "data/train.txt", batch_size=batch_size, max_length=32, shuffle=False
        )
        model = expert_model(tokenizer)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = Trainer(model, train_loader, optimizer=optimizer, device="cpu",
                          gradient_accumulation_steps=accumulation)  # fmt: skip
        trainer.train(max_steps=1, save_every=0)
        models.append(model)
    for name, value in models[0].state_dict().items():
        torch.testing.assert_close(models[1].state_dict()[name], value, atol=1e-6, rtol=0)


def test_checkpoint_strategy() -> None:
    """The three calls as written, on one batch of 64-token windows per epoch."""
    train_loader, _, tokenizer = create_dataloaders("data/small.txt", batch_size=32, max_length=64)
    Path("data/val.txt").write_text("—".join(["незнакомое", "слово"] * 150), encoding="utf-8")
    _, unknown_val, _ = create_dataloaders(
        "data/small.txt", "data/val.txt", batch_size=32, max_length=64, tokenizer=tokenizer
    )
    # 1. Периодические checkpoints (каждые N эпох)
    trainer = Trainer(expert_model(tokenizer, **TINY), train_loader, device="cpu")
    trainer.train(num_epochs=100, save_every=5)
    assert step_files() == [f"step_{e}.pt" for e in (80, 85, 90, 95, 100)]  # the newest 5

    # 2. Best model (автоматически при early stopping)
    trainer = Trainer(expert_model(tokenizer, **TINY), train_loader, unknown_val, device="cpu",
                      checkpoint_dir="run2")  # fmt: skip
    trainer.train(num_epochs=100, early_stopping_patience=5)
    assert trainer.current_epoch == 6 and Path("run2/best.pt").is_file()

    # 3. Final model (вручную после обучения)
    trainer.save_checkpoint(Path("checkpoints/final_model.pt"))
    assert Path("checkpoints/final_model.pt").is_file()


def test_debugging_snippets(capsys: pytest.CaptureFixture[str]) -> None:
    """The overfitting test as written, but with save_every=0: the default would write a
    checkpoint after each of the 100 one-step epochs."""
    train_loader, _, tokenizer = create_dataloaders("data/train.txt", batch_size=8, max_length=512)
    model = expert_model(tokenizer)

    # Проверяем первый batch
    batch = next(iter(train_loader))
    print(f"Input shape: {batch['input_ids'].shape}")
    print(f"Labels shape: {batch['labels'].shape}")
    print(f"Input IDs: {batch['input_ids'][0][:10]}")  # Первые 10 токенов

    # Один forward pass
    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"])
        print(f"Logits shape: {logits.shape}")  # [batch, seq_len, vocab_size]

    assert tuple(logits.shape) == (*batch["input_ids"].shape, len(tokenizer))
    assert "Input shape: torch.Size([3, 512])" in capsys.readouterr().out

    # Модель должна переобучиться на 1 batch
    Path("data/one.txt").write_text(
        "Once upon a time there was a little girl named Lily . She liked to play with her red "
        "ball in the park .",
        encoding="utf-8",
    )
    tokenizer = SimpleTokenizer(vocab_size=10000)
    tokenizer.build_vocab([Path("data/one.txt").read_text(encoding="utf-8")])
    dataset = TextDataset("data/one.txt", tokenizer, max_length=512)
    torch.manual_seed(0)
    model = ExpertModel(vocab_size=len(tokenizer), d_model=128, n_layers=2, n_heads=4, d_ff=256)

    small_loader = DataLoader(dataset, batch_size=1)
    trainer = Trainer(model, small_loader)
    history = trainer.train(num_epochs=100, save_every=0)

    # Loss должен стремиться к ~0
    assert history["train_loss"][-1] < 0.1, "Модель не может переобучиться!"


def test_any_model_output_the_default_loss_reads() -> None:
    """Models that return a Hugging Face style output (.logits) or a tuple train too."""

    class WithLogits(ExpertModel):
        def forward(self, x):  # type: ignore[override]
            return type("Output", (), {"logits": super().forward(x)})()

    class AsTuple(ExpertModel):
        def forward(self, x):  # type: ignore[override]
            return (super().forward(x), None)

    train_loader, _, tokenizer = create_dataloaders("data/train.txt", batch_size=8, max_length=64)
    losses = []
    for cls in (ExpertModel, WithLogits, AsTuple):
        torch.manual_seed(0)
        trainer = Trainer(cls(len(tokenizer), **SIZE), train_loader, device="cpu")
        losses.append(trainer.train(num_epochs=1, save_every=0)["train_loss"])
    assert losses[0] == losses[1] == losses[2]

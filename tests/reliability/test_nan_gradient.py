"""A finite loss with a non-finite gradient: the update is skipped and counted, never applied or
saved; after `max_skipped_steps` in a row the run stops with one line."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.train.trainer import Batches, Diverged, Trainer, TrainSettings


class Windows(Batches):
    def get(self, step: int, micro_step: int = 0):
        g = torch.Generator().manual_seed(step)
        seq = torch.randint(0, 61, (2, 17), generator=g)
        return {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}


def trainer_with_bad_steps(bad: set[int], max_skipped: int, tmp_path) -> Trainer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, dim=16, n_heads=2, context=16, vocab_size=61))
    settings = TrainSettings.for_api(max_steps=8, lr=1e-2, log_every=1,
                                     max_skipped_steps=max_skipped)  # fmt: skip
    lines: list[str] = []
    trainer = Trainer(model, Windows(), device="cpu", settings=settings, log=lines.append,
                      checkpoint_dir=tmp_path)  # fmt: skip
    trainer.lines = lines

    def poison(grad: torch.Tensor) -> torch.Tensor:  # the step's gradient turns infinite
        return grad * float("inf") if trainer.global_step in bad else grad

    model.wte.weight.register_hook(poison)
    return trainer


def test_a_non_finite_gradient_skips_the_update(tmp_path):
    trainer = trainer_with_bad_steps({2, 3}, max_skipped=5, tmp_path=tmp_path)
    snapshots = {}

    original = trainer.train_step

    def step_and_snapshot():
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        loss, norm = original()
        snapshots[trainer.global_step] = (before, norm)
        return loss, norm

    trainer.train_step = step_and_snapshot
    trainer.train()
    assert trainer.global_step == 8 and trainer.skipped_steps == 2
    for step in (3, 4):  # optimizer steps 3 and 4 ran at global_step 2 and 3
        before, norm = snapshots[step]
        assert not torch.isfinite(torch.tensor(norm))
        after = snapshots[step + 1][0]
        assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step moved"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert sum("update skipped" in line for line in trainer.lines) == 2
    path = trainer.save_checkpoint(tmp_path / "step_8.pt")
    state = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_too_many_in_a_row_stop_the_run(tmp_path):
    trainer = trainer_with_bad_steps({1, 2, 3, 4, 5}, max_skipped=3, tmp_path=tmp_path)
    with pytest.raises(Diverged, match="not finite for 3 steps in a row"):
        trainer.train()
    assert trainer.skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

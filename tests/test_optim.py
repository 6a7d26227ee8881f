"""The optimizer of a run: AdamW decays matrices only; Muon takes the 2-D hidden weights and
AdamW the rest; lmforge's batched Muon steps exactly as torch's; a Muon run saves and resumes to the
same weights as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig, OptimConfig
from lmforge.model import Transformer
from lmforge.train.muon import BatchedMuon
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import Batches, Trainer, TrainSettings


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(n_layers=2, dim=32, n_heads=2, context=32, vocab_size=61, **kw))


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_adamw_decays_matrices_only():
    model = tiny()
    (opt,) = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["params"]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_steps_exactly_as_torch_muon(nesterov):
    """Square, tall, wide and odd shapes, decay and the AdamW-matched rate: after 8 steps on the
    same gradients, the weights and momentum buffers equal torch.optim.Muon's bit for bit, and
    its state loads into torch's optimizer (checkpoints move between the two)."""
    torch.manual_seed(0)
    shapes = [(24, 24)] * 3 + [(64, 24), (64, 24), (24, 64), (10, 30), (30, 10), (7, 7)]
    ours = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1,
              adjust_lr_fn="match_rms_adamw")  # fmt: skip
    a, b = BatchedMuon(ours, **kw), torch.optim.Muon(theirs, **kw)
    start = [p.detach().clone() for p in ours]
    for _ in range(8):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    assert all((p - p0).abs().max() > 1e-3 for p, p0 in zip(ours, start, strict=True))
    moved = torch.optim.Muon([torch.nn.Parameter(q.detach().clone()) for q in theirs], **kw)
    moved.load_state_dict(a.state_dict())
    buffers = [moved.state[p]["momentum_buffer"] for p in moved.param_groups[0]["params"]]
    assert all(torch.equal(x, b.state[q]["momentum_buffer"]) for x, q in zip(buffers, theirs))


def test_muon_takes_hidden_matrices_adamw_the_rest():
    model = tiny(canon=3)
    adamw, muon = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_lr=0.02))
    assert isinstance(muon, torch.optim.Muon)
    on_muon = names(model, muon.param_groups[0]["params"])
    on_adamw = names(model, [p for g in adamw.param_groups for p in g["params"]])
    assert on_muon and not on_muon & on_adamw
    assert all(".attn." in n or ".ffn." in n for n in on_muon)
    assert "wte.weight" in on_adamw and any(".canon." in n for n in on_adamw)
    assert on_muon | on_adamw == {n for n, _ in model.named_parameters()}
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)  # follows the schedule


class Windows(Batches):
    """Deterministic batches of random sequences, a pure function of the step."""

    def get(self, step: int, micro_step: int = 0):
        g = torch.Generator().manual_seed(1000 * step + micro_step)
        seq = torch.randint(0, 61, (4, 33), generator=g)
        return {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}


def run(steps: int, resume_from=None, start=0) -> Trainer:
    model = tiny()
    settings = TrainSettings.for_api(max_steps=steps, lr=1e-3, log_every=1000)
    trainer = Trainer(model, Windows(), optimizer=build_optimizer(model, OptimConfig(
        name="muon", lr=1e-3)), device="cpu", settings=settings, log=lambda _: None)  # fmt: skip
    if resume_from is not None:
        trainer.load_checkpoint(resume_from)
    trainer.train()
    return trainer


def test_muon_state_saves_and_resumes_to_the_same_weights(tmp_path):
    whole = run(8)
    first = run(4)
    path = first.save_checkpoint(tmp_path / "step_4.pt")
    state = torch.load(path, weights_only=True)
    assert len(state["optimizers"]) == 2  # AdamW and Muon, each with its momentum
    resumed = run(8, resume_from=path)
    assert resumed.global_step == 8
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_muon_on_a_torch_without_it_is_one_line(monkeypatch):
    """torch.optim.Muon came with torch 2.9; pyproject allows 2.6: say so instead of failing."""
    from lmforge.errors import UserError

    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"needs torch.optim.Muon \(torch 2.9 or newer"):
        build_optimizer(tiny(), OptimConfig(name="muon"))
    assert len(build_optimizer(tiny(), OptimConfig(name="adamw"))) == 1  # AdamW still works

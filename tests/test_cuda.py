"""The CUDA paths: bf16 autocast, torch.compile, fused AdamW, MFU, CUDA checkpoints on CPU, and
torchrun with NCCL. Marked `gpu`: every test skips cleanly on a machine without CUDA (as CI has)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import OptimConfig, model_config
from lmforge.loss import chunked_cross_entropy
from lmforge.model import Transformer
from lmforge.train.optim import build_optimizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY = [
    "--model.n_layers=2",
    "--model.dim=64",
    "--model.n_heads=4",
    "--model.context=128",
    "--train.batch_size=8",
    "--schedule.warmup_steps=5",
    "--optim.lr=3e-3",
    "--train.sample_every=0",
    "--log.plot_every=0",
    "--log.log_every=5",
    "--train.eval_every=20",
    "--train.eval_batches=2",
    "--train.save_every_minutes=0",
]


def lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stories"
    result = lmforge("prepare", "--builtin", "stories", "--size-mb", "0.3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def metrics(run: Path) -> list[dict]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def tiny_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = model_config(
        "tiny",
        n_layers=2,
        dim=64,
        n_heads=4,
        context=64,
        vocab_size=97,
        pad_vocab_multiple=64,
        **kw,
    )
    return Transformer(cfg)


def test_bf16_compiled_training_on_cuda_learns_reports_mfu_and_loads_on_cpu(data_dir, tmp_path):
    run = tmp_path / "run"
    result = lmforge(
        "train",
        f"--data.dir={data_dir}",
        f"--run.dir={run}",
        *TINY,
        "--train.max_steps=60",
        "--train.device=cuda",
        "--train.dtype=bf16",
        "--train.compile=true",
    )
    assert result.returncode == 0, result.stderr
    rows = [r for r in metrics(run) if r.get("loss") is not None]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # a char model leaves ~4.6 nats fast
    assert all(r["mfu"] is not None and 0 < r["mfu"] < 1 for r in rows)  # a known GPU's peak
    assert "precision bf16" in result.stdout and "| compiled" in result.stdout
    # The CUDA checkpoint is usable where there is no GPU.
    out = lmforge(
        "generate",
        str(run),
        "--prompt",
        "One sunny day,",
        "--max-new-tokens",
        "20",
        "--temperature",
        "0",
        "--device",
        "cpu",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("One sunny day,") and len(out.stdout.strip()) > 20


def test_adamw_is_fused_on_cuda_and_not_on_cpu():
    for device, fused in (("cuda", True), ("cpu", None)):
        model = tiny_model().to(device)
        (opt,) = build_optimizer(
            model, OptimConfig(lr=1e-3, weight_decay=0.1), torch.device(device)
        )
        assert opt.defaults["fused"] is fused


def test_cuda_logits_equal_cpu_and_compiled_equals_eager():
    model = tiny_model().eval()
    idx = torch.randint(0, 97, (2, 64))
    reference = model(idx)
    on_gpu = model.to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the comparison
    try:
        eager = on_gpu(idx.cuda())
        compiled = torch.compile(on_gpu)(idx.cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True
    assert torch.allclose(eager.cpu(), reference, atol=1e-4)
    assert torch.allclose(compiled, eager, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = on_gpu(idx.cuda()).float()
    assert (half - eager).abs().max() < 0.1  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_gradients_on_cuda_equal_eager(autocast):
    """The chunked loss computes its gradients in forward: compiled, they must still arrive."""
    model = tiny_model().to("cuda")
    idx, targets = torch.randint(0, 97, (2, 2, 64), device="cuda")
    grads = []
    for run in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            run(idx, targets).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, eager in grads[0].items():
        scale = eager.abs().max().clamp(min=1e-8)
        assert ((grads[1][name] - eager).abs().max() / scale) < 0.05, name


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_chunked_loss_on_cuda_gives_eager_gradients_in_one_chunk_of_memory(autocast):
    """Compiled whole (fullgraph), the loss gives eager's loss and gradients, not zeros; and its
    peak memory stays far below one full fp32 logits tensor (inductor keeps one chunk alive)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tokens, dim, vocab = 16 * 1024, 768, 50304  # gpt2-124m's head at batch 16 x 1024
    hidden = torch.randn(16, 1024, dim, device="cuda", generator=g, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, dim, device="cuda", generator=g)).requires_grad_()
    targets = torch.randint(0, 50257, (16, 1024), device="cuda", generator=g)
    targets[2, :100] = -100

    def head(hidden, weight, targets):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            return chunked_cross_entropy(
                torch.tanh(hidden), weight, targets, chunk_size=512, vocab_limit=50257
            )

    compiled_head = torch.compile(head, fullgraph=True)
    compiled_head(hidden, weight, targets)  # compile first: its own memory is not the loss's
    results = []
    for run in (head, compiled_head):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = run(hidden, weight, targets)
        grads = torch.autograd.grad(loss, (hidden, weight))
        torch.cuda.synchronize()
        results.append((loss, grads, torch.cuda.max_memory_allocated() - before))
    (eager_loss, eager_grads, _), (loss, grads, peak) = results
    assert torch.allclose(loss, eager_loss, rtol=1e-3)
    for got, expected in zip(grads, eager_grads, strict=True):
        scale = expected.abs().max()
        assert scale > 0 and ((got - expected).abs().max() / scale) < 0.05
    full_logits = tokens * vocab * 4
    assert peak < full_logits / 3, f"peak {peak / 2**20:.0f} MiB"


def test_cached_generation_on_cuda_equals_uncached():
    model = tiny_model().to("cuda")
    prompts = [[5, 6, 7], [1, 2, 3, 4, 9, 10]]
    cached = model.generate(prompts, 40, temperature=0, use_cache=True)
    uncached = model.generate(prompts, 40, temperature=0, use_cache=False)
    assert cached == uncached


def test_torchrun_one_process_uses_nccl_and_learns(data_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=1",
        "--standalone",
        "-m",
        "lmforge",
        "train",
        f"--data.dir={data_dir}",
        f"--run.dir={run}",
        *TINY,
        "--train.max_steps=40",
        "--train.dtype=bf16",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "ddp on 1 process (nccl)" in result.stdout
    rows = [r for r in metrics(run) if r.get("loss") is not None]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5

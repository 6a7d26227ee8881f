"""The model: exact parameter counts, equal logits to Hugging Face, chunked loss, generation."""

import shutil

import pytest
import torch

from lmforge.config import ModelConfig, model_config
from lmforge.info import count_parameters, flops_per_token
from lmforge.loss import (
    chunked_cross_entropy,
    plain_cross_entropy,
    traceable_chunked_cross_entropy,
)
from lmforge.model import Transformer


@pytest.mark.parametrize(
    "preset, expected, padded",
    [
        ("seed-59m", 59_294_720, 59_318_784),
        ("trm-23m", 23_562_560, 23_577_600),
        ("trm-51m", 51_082_752, 51_106_816),
        ("gpt2-124m", 124_439_808, 124_475_904),
    ],
)
def test_preset_parameter_counts_are_exact(preset, expected, padded):
    cfg = model_config(preset)
    assert count_parameters(cfg) == expected
    assert count_parameters(cfg, padded=True) == padded
    assert cfg.padded_vocab == 50_304


def test_flops_per_token_follows_palm_formula():
    cfg = model_config("gpt2-124m")
    n = count_parameters(cfg, padded=True) - 1024 * 768
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024


def test_gpt2_block_without_biases_is_nanogpts_model():
    """model.bias=false: nanoGPT's default GPT (no biases in linears or LayerNorms, tied head):
    its "baby GPT" of 4 x 128 on 65 characters has 12 * 128^2 + 2 * 128 per block."""
    shape = dict(n_layers=4, dim=128, n_heads=4, context=64, max_context=64, vocab_size=65)
    cfg = model_config("tiny", block="gpt2", pad_vocab_multiple=1, bias=False, **shape)
    per_block = 12 * 128 * 128 + 2 * 128
    assert count_parameters(cfg) == 65 * 128 + 64 * 128 + 4 * per_block + 128
    with_biases = model_config("tiny", block="gpt2", pad_vocab_multiple=1, **shape)
    extra = 4 * (3 * 128 + 128 + 512 + 128 + 2 * 128) + 128  # linear + LayerNorm biases
    assert count_parameters(with_biases) == count_parameters(cfg) + extra


@pytest.mark.parametrize("T", [1, 7, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_causal_attention_equals_sdpa(T, dtype):
    """The CPU path for T <= 128 (two batched products; the model takes it in bf16) against
    SDPA in fp32: output and all three gradients, from the model's layout (transposed views of
    one projection)."""
    import torch.nn.functional as F

    from lmforge.model import SMALL_CONTEXT, _small_causal_attention

    assert T <= SMALL_CONTEXT
    gen = torch.Generator().manual_seed(T)
    B, H, D = 3, 4, 16
    qkv = torch.randn(B, T, 3 * H * D, generator=gen)
    grad = torch.randn(B, H, T, D, generator=gen)
    results = []
    for kernel in ("sdpa", "small"):
        x = qkv.clone().to(dtype).requires_grad_()
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=2))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            if kernel == "sdpa":
                q, k, v = (t.float() for t in (q, k, v))
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                y = _small_causal_attention(q, k, v)
        y.float().backward(grad)
        results.append((y.float().detach(), x.grad.float()))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for ref, got in zip(*results):
        assert torch.allclose(got, ref, atol=tol, rtol=tol), (got - ref).abs().max()


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        preset="tiny",
        block="llama",
        n_layers=2,
        dim=32,
        n_heads=4,
        context=32,
        max_context=64,
        vocab_size=97,
        pad_vocab_multiple=1,
    )
    base.update(kw)
    return model_config("tiny", **base)


def llama_pair(n_kv_heads: int, tie: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny_cfg(n_kv_heads=n_kv_heads, tie_embeddings=tie)
    ours = Transformer(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.padded_vocab,
        hidden_size=cfg.dim,
        intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_context,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=tie,
        attention_bias=False,
        mlp_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {
        "model.embed_tokens.weight": ours.wte.weight,
        "model.norm.weight": ours.norm_f.weight,
        "lm_head.weight": ours.lm_head.weight,
    }
    for i, b in enumerate(ours.blocks):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "self_attn.q_proj.weight": b.attn.wq.weight,
                p + "self_attn.k_proj.weight": b.attn.wk.weight,
                p + "self_attn.v_proj.weight": b.attn.wv.weight,
                p + "self_attn.o_proj.weight": b.attn.wo.weight,
                p + "mlp.gate_proj.weight": b.ffn.w1.weight,
                p + "mlp.up_proj.weight": b.ffn.w3.weight,
                p + "mlp.down_proj.weight": b.ffn.w2.weight,
                p + "input_layernorm.weight": b.norm1.weight,
                p + "post_attention_layernorm.weight": b.norm2.weight,
            }
        )
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=not tie)
    return ours, hf


@pytest.mark.parametrize("n_kv_heads, tie", [(0, True), (2, True), (2, False), (1, False)])
def test_llama_logits_equal_hugging_face(n_kv_heads, tie):
    ours, hf = llama_pair(n_kv_heads, tie)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        got = ours(idx)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()


def test_gpt2_logits_equal_hugging_face():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny_cfg(block="gpt2", max_context=64)
    ours = Transformer(cfg).eval()
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=cfg.padded_vocab,
            n_positions=cfg.max_context,
            n_embd=cfg.dim,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.hidden,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new",
        )
    ).eval()
    sd = {
        "transformer.wte.weight": ours.wte.weight,
        "transformer.wpe.weight": ours.wpe.weight,
        "transformer.ln_f.weight": ours.norm_f.weight,
        "transformer.ln_f.bias": ours.norm_f.bias,
        "lm_head.weight": ours.lm_head.weight,
    }
    for i, b in enumerate(ours.blocks):
        p = f"transformer.h.{i}."
        # HF GPT-2 stores Conv1D weights as (in, out): the transpose of nn.Linear's.
        sd.update(
            {
                p + "ln_1.weight": b.norm1.weight,
                p + "ln_1.bias": b.norm1.bias,
                p + "ln_2.weight": b.norm2.weight,
                p + "ln_2.bias": b.norm2.bias,
                p + "attn.c_attn.weight": b.attn.c_attn.weight.t(),
                p + "attn.c_attn.bias": b.attn.c_attn.bias,
                p + "attn.c_proj.weight": b.attn.c_proj.weight.t(),
                p + "attn.c_proj.bias": b.attn.c_proj.bias,
                p + "mlp.c_fc.weight": b.ffn.c_fc.weight.t(),
                p + "mlp.c_fc.bias": b.ffn.c_fc.bias,
                p + "mlp.c_proj.weight": b.ffn.c_proj.weight.t(),
                p + "mlp.c_proj.bias": b.ffn.c_proj.bias,
            }
        )
    missing, unexpected = hf.load_state_dict(
        {k: v.detach().clone() for k, v in sd.items()}, strict=False
    )
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(idx), hf(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [7, 64, 4096])
@pytest.mark.parametrize(
    "loss_fn",
    [chunked_cross_entropy, traceable_chunked_cross_entropy],
    ids=["eager", "traceable"],
)
def test_chunked_loss_equals_plain_with_ignored_positions(chunk, loss_fn):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 13, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 45, (5, 13), generator=g)
    targets[0, :4] = -100
    targets[3, 7:] = -100
    for reduction in ("mean", "sum"):
        # vocab_limit 45: rows 45..49 are padding; the reference has no such rows at all.
        for vocab_limit in (None, 45):
            plain = plain_cross_entropy(hidden, weight[:vocab_limit], targets, reduction=reduction)
            gh, gw = torch.autograd.grad(plain, (hidden, weight))
            chunked = loss_fn(
                hidden,
                weight,
                targets,
                chunk_size=chunk,
                reduction=reduction,
                vocab_limit=vocab_limit,
            )
            ch, cw = torch.autograd.grad(chunked * 1.0, (hidden, weight))
            assert torch.allclose(chunked, plain, atol=1e-5)
            assert torch.allclose(ch, gh, atol=1e-5) and torch.allclose(cw, gw, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="inductor on a CPU needs a C++ compiler")
def test_compiled_chunked_loss_gives_the_eager_gradients():
    """torch.compile traces the loss whole (fullgraph: no graph break at the head), and its
    gradients are eager's, not zeros: what the old autograd.Function gave compiled on CUDA."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 21, 16, generator=g, requires_grad=True)
    weight = torch.randn(64, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 60, (3, 21), generator=g)
    targets[1, :5] = -100

    def head(hidden, weight, targets):  # an op before the loss, as the model's final norm
        return chunked_cross_entropy(
            torch.tanh(hidden), weight, targets, chunk_size=16, vocab_limit=60
        )

    eager_loss = head(hidden, weight, targets)
    eager = torch.autograd.grad(eager_loss, (hidden, weight))
    compiled_loss = torch.compile(head, backend="inductor", fullgraph=True)(hidden, weight, targets)
    compiled = torch.autograd.grad(compiled_loss, (hidden, weight))
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)
    for got, expected in zip(compiled, eager, strict=True):
        assert got.abs().sum() > 0
        assert torch.allclose(got, expected, atol=1e-5)


def test_model_loss_matches_logits_cross_entropy():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(
        logits.view(-1, logits.shape[-1]), targets.view(-1)
    )
    assert torch.allclose(model(idx, targets), expected, atol=1e-5)


@pytest.mark.parametrize("block, canon", [("llama", 0), ("gpt2", 0), ("llama", 4), ("gpt2", 3)])
def test_cached_and_uncached_greedy_decoding_agree(block, canon):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(block=block, context=48, canon=canon))
    if canon:  # canon layers start near 0: make them matter, so a wrong cache would show
        for block_ in model.blocks:
            torch.nn.init.normal_(block_.canon.weight, std=0.5)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 9, 10]]  # different lengths: left padding inside
    cached = model.generate(prompts, 30, temperature=0, use_cache=True)
    uncached = model.generate(prompts, 30, temperature=0, use_cache=False)
    assert cached == uncached
    single = model.generate(prompts[1], 30, temperature=0)
    assert single == cached[1]  # padding does not change a row's result


def test_generate_options_seed_stop_and_stream():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    a = model.generate([1, 2, 3], 20, temperature=0.9, top_k=10, top_p=0.9, seed=3)
    b = model.generate([1, 2, 3], 20, temperature=0.9, top_k=10, top_p=0.9, seed=3)
    assert a == b and len(a) == 20
    streamed = []
    out = model.generate(
        [1, 2, 3], 20, temperature=0.9, seed=3, on_token=lambda r, t: streamed.append(t)
    )
    assert streamed == out
    stop = out[5]
    stopped = model.generate([1, 2, 3], 20, temperature=0.9, seed=3, stop_tokens=[stop])
    assert stopped == out[: out.index(stop)]
    limited = model.generate([1, 2, 3], 50, temperature=2.0, seed=1, vocab_limit=10)
    assert max(limited) < 10
    penalised = model.generate([1, 2, 3], 20, temperature=0, repetition_penalty=50.0)
    assert len(set(penalised)) > len(set(model.generate([1, 2, 3], 20, temperature=0))) - 1


@pytest.mark.parametrize("canon", [0, 4])
def test_padded_doc_ids_isolate_examples(canon):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(canon=canon)).eval()
    if canon:
        for block in model.blocks:
            torch.nn.init.normal_(block.canon.weight, std=0.5)
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = model(packed, position_ids=positions, doc_ids=doc_ids)
        assert torch.allclose(out[:, :7], model(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], model(b), atol=1e-5)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = tiny_cfg(dim=256, n_layers=8, vocab_size=1000)
    model = Transformer(cfg)
    assert abs(model.blocks[0].attn.wq.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].attn.wo.weight.std().item() - 0.02 / 4) < 0.001
    assert model.lm_head.weight is model.wte.weight


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(dropout=0.0))
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.activation_checkpointing = flag
        loss = model(idx, targets)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


def test_canon_layer_mixes_the_tokens_before_and_only_those():
    """A canon layer of width 3: position t's attention input depends on t-2..t, not on t-3 or
    later positions; with zero weights the model is the plain one."""
    torch.manual_seed(0)
    cfg = tiny_cfg(canon=3, n_layers=1)
    model = Transformer(cfg).eval()
    canon = model.blocks[0].canon
    assert canon.weight.shape == (3, cfg.dim)
    h = torch.randn(1, 8, cfg.dim, requires_grad=True)
    out = canon(h, (None, None), None, 0)
    out[0, 5].sum().backward()
    touched = (h.grad[0].abs().sum(dim=1) > 0).nonzero().squeeze(1).tolist()
    assert touched == [3, 4, 5]
    plain = Transformer(tiny_cfg(n_layers=1)).eval()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".canon." not in k}, strict=True
    )
    torch.nn.init.zeros_(canon.weight)
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), plain(idx))


def test_cpu_attention_runs_in_fp32_under_bf16_autocast():
    """On a CPU, bf16 SDPA is slower than fp32 at small heads (bench/cpu_attention.py): beyond
    SMALL_CONTEXT positions, under bf16 autocast the model's attention is computed in fp32 and
    handed back in bf16, with gradients that reach the bf16 inputs."""
    import torch.nn.functional as F

    from lmforge.model import SMALL_CONTEXT, _attention

    torch.manual_seed(0)
    T = SMALL_CONTEXT + 8
    q, k, v = (torch.randn(2, 3, T, 16).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _attention(q, k, v, is_causal=True)
    assert y.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert torch.equal(y, expected.bfloat16())
    y.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_cpu_rms_norm_equals_the_plain_formula_with_gradients():
    """The hand-written CPU RMSNorm backward (model._CPURMSNorm) gives what autograd gives
    through x / sqrt(mean(x^2) + eps) * weight."""
    from lmforge.model import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g) + 0.5)
    x = (3 * torch.randn(3, 5, 24, generator=g)).requires_grad_()
    grad = torch.randn(3, 5, 24, generator=g)
    weight = norm.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    expected = x_ref * torch.rsqrt(x_ref.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    expected.backward(grad)
    got = norm(x)
    got.backward(grad)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad, weight.grad, atol=1e-5, rtol=1e-5)
    # In float64 the same Function is exact to the analytic gradient.
    from lmforge.model import _CPURMSNorm

    x64 = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w64 = torch.rand(8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _CPURMSNorm.apply(a, b, 1e-5), (x64, w64))


def test_rope_roll_form_equals_rotate_half_with_gradients():
    """apply_rope (one roll and one addcmul, the sign folded into the sin table) is the Hugging
    Face form x * cos + rotate_half(x) * sin, forward and backward."""
    from lmforge.model import apply_rope, rope_tables

    cos, sin = rope_tables(16, 10, 10000.0)
    x = torch.randn(2, 3, 10, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    rotated = torch.cat([-x_ref[..., 8:], x_ref[..., :8]], dim=-1)
    expected = x_ref * cos + rotated * sin
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    grad = torch.randn_like(got)
    got.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=0)


def test_rope_positions_sliced_or_gathered_give_the_same_logits():
    """Plain positions take a slice of the rotary tables; explicit position_ids gather them."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    idx = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        plain = model(idx)
        gathered = model(idx, position_ids=torch.arange(12).expand(2, 12))
    torch.testing.assert_close(plain, gathered, atol=0, rtol=0)

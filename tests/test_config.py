"""One config schema: defaults < preset < YAML < --key=value; YAML 1.1's `3e-4` is a number;
unknown keys, wrong types and impossible values fail before any work, naming the key."""

from __future__ import annotations

import pytest
import yaml
from helpers import lmforge_subprocess

from lmforge.config import PRESETS, load_config, model_config, save_config
from lmforge.errors import UserError


def test_layers_resolve_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: seed-59m\n  n_layers: 4\noptim:\n  lr: 5e-4\n")
    cfg = load_config(str(path), ["--optim.lr=1e-3", "--train.batch_size", "8"])
    assert cfg.model.dim == PRESETS["seed-59m"]["dim"]  # from the preset
    assert cfg.model.n_layers == 4  # the YAML over the preset
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # the flag over the YAML
    assert cfg.train.batch_size == 8 and cfg.train.max_steps == 1000  # default


def test_yaml_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 5e-4\n  min_lr: 1e-5\n")
    cfg = load_config(str(path))
    assert cfg.optim.lr == 5e-4 and cfg.optim.min_lr == 1e-5


def test_undotted_keys_are_found_when_unique():
    assert load_config(None, ["--lr=2e-3"]).optim.lr == 2e-3
    with pytest.raises(UserError, match="ambiguous"):
        load_config(None, ["--patience=3"])  # train.patience and sft.patience


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--train.bogus=1"], "train.bogus"),
        (["--bogus.key=1"], "bogus"),
        (["--train.batch_size=abc"], "train.batch_size"),
        (["--optim.lr=0"], "optim.lr"),
        (["--train.batch_size=0"], "train.batch_size"),
        (["--model.context=4096"], "model.context"),
        (["--schedule.kind=linear"], "schedule.kind"),
        (["--model.dim=30", "--model.n_heads=4"], "model.dim"),
    ],
)
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_saved_config_reloads_to_the_same(tmp_path):
    cfg = load_config(None, ["--model.preset=trm-23m", "--optim.lr=1e-3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 1e-3
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_model_config_from_a_preset_or_a_file(tmp_path):
    assert model_config("gpt2-124m").n_layers == 12
    path = tmp_path / "m.yaml"
    path.write_text("model:\n  preset: tiny\n  dim: 64\n")
    assert model_config(str(path)).dim == 64
    with pytest.raises(UserError, match="unknown preset or config"):
        model_config("no-such")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--train.bogus=1"], "train.bogus"),
        (["--optim.lr=0"], "optim.lr"),
        (["missing.yaml"], "missing.yaml"),
    ],
)
def test_config_errors_are_one_line_exit_2_before_any_work(args, needle, tmp_path):
    result = lmforge_subprocess("train", *args, f"--run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and needle in result.stderr
    assert not (tmp_path / "run").exists()


def test_malformed_yaml_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: [1, 2\n")
    result = lmforge_subprocess("train", str(bad))
    assert result.returncode == 2 and "malformed YAML" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# Every key with a value its field's range refuses (the first, where there are several).
OUT_OF_RANGE = {
    "model.n_layers": 0, "model.dim": -8, "model.n_heads": 0, "model.n_kv_heads": -1,
    "model.ffn_hidden": -1, "model.context": 0, "model.max_context": 0, "model.vocab_size": 0,
    "model.pad_vocab_multiple": -64, "model.canon": 17, "model.dropout": 1.0,
    "model.rope_theta": 0.0, "model.norm_eps": -1e-5, "model.init_std": 0.0,
    "data.stride": -1,
    "train.max_steps": -1, "train.max_epochs": -1, "train.batch_size": 0, "train.grad_accum": 0,
    "train.seed": -1, "train.device": "gpu", "train.threads": -1, "train.max_grad_norm": -1.0,
    "train.max_skipped_steps": 0, "train.save_every": -1, "train.save_every_minutes": -1.0,
    "train.keep_last": 0, "train.eval_every": -1, "train.eval_batches": 0, "train.patience": -1,
    "train.min_delta": -0.1, "train.sample_every": -1, "train.sample_tokens": 0,
    "train.sample_temperature": -1.0, "train.resume": "", "train.warmup_passes": -1,
    "optim.lr": 0.0, "optim.min_lr": 1.0, "optim.weight_decay": -0.1, "optim.beta1": 1.0,
    "optim.beta2": -0.5, "optim.eps": 0.0, "optim.muon_lr": 0.0, "optim.muon_momentum": 1.0,
    "schedule.warmup_steps": -1, "schedule.decay_steps": -1, "schedule.wsd_decay_fraction": 0.0,
    "log.log_every": 0, "log.plot_every": -1, "log.peak_tflops": -1.0,
    "run.dir": "",
    "sft.weights": "1,x", "sft.val_fraction": 1.0, "sft.patience": -1, "sft.min_delta": -1.0,
    "sft.max_epochs": 0, "sft.questions_per_story": 0,
}  # fmt: skip
# Keys with nothing to check beyond their type and choices.
FREE = {"model.preset", "model.block", "model.tie_embeddings", "model.qk_norm", "model.bias",
        "model.gelu", "data.dir", "data.mode", "data.allow_instruction_data", "train.dtype",
        "train.compile", "train.sample_prompts", "train.activation_checkpointing",
        "train.distributed",
        "train.init_from", "optim.name", "schedule.kind", "log.keep_plot_iterations",
        "log.tensorboard", "log.progress", "sft.data", "sft.pack", "sft.skip_bad",
        "sft.allow_plain_text"}  # fmt: skip


def test_every_key_has_a_checked_range():
    import dataclasses

    from lmforge.config import SECTIONS

    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert keys == set(OUT_OF_RANGE) | FREE  # a new key needs a decision here


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_out_of_range_values_name_the_key_and_the_value(key):
    value = OUT_OF_RANGE[key]
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as error:
        load_config(None, [f"--{key}={value}"])
    assert repr(value) in str(error.value) or str(value) in str(error.value)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_must_be_finite(value):
    import dataclasses

    from lmforge.config import SECTIONS

    floats = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
              if f.type in (float, "float")]  # fmt: skip
    assert "optim.lr" in floats and "train.save_every_minutes" in floats
    for key in floats:
        with pytest.raises(UserError, match=rf"{key.replace('.', '[.]')} must be a finite"):
            load_config(None, [f"--{key}={value}"])


def test_sft_weights_one_per_source():
    assert load_config(None, ["--sft.data=a.json,b.json", "--sft.weights=1,0.5"]).sft.weights
    with pytest.raises(UserError, match="2 weights for 3 sft.data sources"):
        load_config(None, ["--sft.data=a,b,c", "--sft.weights=1,2"])
    with pytest.raises(UserError, match="not all 0"):
        load_config(None, ["--sft.weights=0,0"])


def test_saved_and_file_model_configs_are_checked_too(tmp_path):
    from lmforge.config import model_config_from_dict

    with pytest.raises(UserError, match="model.dim"):
        model_config_from_dict({"dim": 30, "n_heads": 4})  # e.g. a damaged checkpoint's config
    path = tmp_path / "m.yaml"
    path.write_text("model: [1, 2]\n")
    with pytest.raises(UserError, match="config section 'model'"):
        model_config(str(path))
    path.write_text("model:\n  init_std: -0.02\n")
    with pytest.raises(UserError, match="model.init_std must be positive"):
        model_config(str(path))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- model\n- train\n", "must hold a mapping of sections"),
        ("train: 5\n", "config section 'train' must be a mapping"),
        ("train:\n  sample_prompts: [{a: 1}]\n", "train.sample_prompts: expected list"),
        ("optim:\n  lr:\n", "optim.lr: expected float, got None"),
    ],
)
def test_yaml_of_the_wrong_shape(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_config(str(path))

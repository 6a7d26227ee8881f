"""Checkpoints that are never half-written and never silently wrong.

Each `step_N.pt` is written to a temporary name, fsynced and renamed; beside it `step_N.json`, a
small human-readable record (step, tokens, loss, data position) that also holds the SHA-256 of the
.pt file, checked before loading. Loading uses `weights_only=True`: a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or not an lmforge checkpoint."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path, state: dict[str, Any], record: dict[str, Any] | None = None
) -> Path:
    """Write `state` (tensors, dicts, numbers, strings) atomically, then its JSON record + checksum.

    A write error (disk full, no permission) becomes a one-line UserError; files already there
    are untouched.
    """
    path = Path(path)
    sidecar = path.with_suffix(".json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, lambda f: torch.save(state, f))
        info = dict(
            record or {},
            file=path.name,
            sha256=sha256_of(path),
            bytes=path.stat().st_size,
            saved_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        _write_atomic(sidecar, lambda f: f.write(json.dumps(info, indent=2) + "\n"), mode="w")
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
        raise UserError(
            f"could not write checkpoint {path}: {reason}; earlier checkpoints are "
            "intact (free disk space or fix permissions, then resume)"
        ) from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the checksum (when the JSON record is there) and load with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            expected = json.loads(sidecar.read_text(encoding="utf-8")).get("sha256")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"checkpoint record {sidecar} is corrupt") from None
        if expected and sha256_of(path) != expected:
            raise CheckpointError(
                f"checkpoint {path} is corrupt (checksum mismatch with "
                f"{sidecar.name}): truncated or modified"
            )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: the file is not usable
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}): "
            "truncated, corrupt or not a weights-only lmforge checkpoint"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an lmforge checkpoint (no model weights in it)")
    return state


def step_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_N.pt in the folder, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found)


def newest_valid(
    directory: str | Path,
    report: Callable[[str], None] = print,
    map_location: str | torch.device = "cpu",
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported and left in place."""
    for _, path in reversed(step_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as e:
            report(f"warning: {e}; trying the previous checkpoint (the bad file is left in place)")
    return None


def prune(directory: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` step checkpoints (and their records)."""
    removed = []
    for _, path in step_checkpoints(directory)[:-keep_last]:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
        removed.append(path)
    return removed


def set_aside(path: Path) -> Path | None:
    """A file about to be replaced (e.g. a corrupt checkpoint at that step) is renamed, not lost."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.stem}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    os.replace(path, target)
    return target


def resolve_checkpoint(ckpt_or_run: str | Path) -> Path:
    """A checkpoint file, or a run folder: its best.pt, else final_model.pt, else newest step."""
    path = Path(ckpt_or_run)
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint or run folder at {path}")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    for name in ("best.pt", "final_model.pt"):
        if (folder / name).is_file():
            return folder / name
    steps = step_checkpoints(folder)
    if not steps:
        raise CheckpointError(f"{path} holds no checkpoint (best.pt, final_model.pt or step_N.pt)")
    return steps[-1][1]


def load_model(ckpt_or_run: str | Path, device: str | torch.device = "cpu"):
    """(model, state) from an lmforge checkpoint or run folder, in eval mode."""
    from lmforge.config import model_config_from_dict
    from lmforge.model import Transformer

    path = resolve_checkpoint(ckpt_or_run)
    state = load_checkpoint(path, map_location=device)
    if "config" not in state:
        raise CheckpointError(f"{path} has no model config in it: not written by lmforge train")
    cfg = model_config_from_dict(state["config"]["model"])
    model = Transformer(cfg).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    state["path"] = str(path)
    return model, state


def load_weights_into(model: torch.nn.Module, ckpt_or_run: str | Path) -> Path:
    """Copy another checkpoint's weights into `model` (`--train.init_from`); shapes must match."""
    path = resolve_checkpoint(ckpt_or_run)
    weights = load_checkpoint(path)["model"]
    own = model.state_dict()
    wrong = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights]
    if wrong or missing:
        what = f"shape of {wrong[0]}" if wrong else f"missing {missing[0]}"
        raise CheckpointError(
            f"cannot start from {path}: its model differs ({what}); "
            "use the same model settings as the checkpoint"
        )
    model.load_state_dict(weights)
    return path


def load_run_tokenizer(state: dict[str, Any]):
    """The tokenizer a checkpoint was trained with: RUN/tokenizer/ beside RUN/checkpoints/."""
    from lmforge.tokenizers import load_tokenizer

    identity = state.get("tokenizer")
    if not identity:
        raise CheckpointError(f"{state.get('path', 'the checkpoint')} records no tokenizer")
    if identity.get("name") in ("gpt2", "byte"):  # no vocabulary file: built from the name
        from lmforge.tokenizers import get_tokenizer

        return get_tokenizer(identity["name"])
    path = Path(state.get("path", "."))
    for folder in (path.parent.parent / "tokenizer", path.parent / "tokenizer"):
        if folder.is_dir():
            return load_tokenizer(folder, identity)
    data_dir = state.get("config", {}).get("data", {}).get("dir")
    if data_dir and Path(data_dir).is_dir():
        return load_tokenizer(data_dir, identity)
    raise CheckpointError(
        f"cannot find the tokenizer of {path}: expected a tokenizer/ folder in its run folder"
    )

"""Checkpoints that are never half-written and never silently wrong.

Each checkpoint (`step_N.pt`, `best.pt`, `final_model.pt`) has beside it a small human-readable
record (`step_N.json`: step, tokens, loss, data position) that holds the SHA-256 of the .pt file,
checked before loading. The .pt is written to a temporary name and fsynced; then the record is
written; then the .pt is renamed into place. A record therefore always names the file beside it:
the new one, or, if a kill came between the two renames, the one it replaces (`replaces_sha256`).
Loading uses `weights_only=True`: a checkpoint cannot run code. Only this module reads or writes
checkpoint files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError
from lmforge.files import DISK_ERRNOS, disk_error, fsync_dir, temp_path, write_atomic

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")
WEIGHTS_FILES = ("best.pt", "final_model.pt")


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated, corrupt or not an lmforge checkpoint."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_record(path: Path) -> dict[str, Any] | None:
    record = record_path(path)
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint record {record} is corrupt") from None
    except OSError as e:
        raise disk_error(record, e, "read") from None
    if not isinstance(data, dict) or not data.get("sha256"):
        raise CheckpointError(f"checkpoint record {record} has no checksum in it")
    return data


def save_checkpoint(
    path: str | Path, state: dict[str, Any], record: dict[str, Any] | None = None
) -> Path:
    """Write `state` (tensors, dicts, numbers, strings) and its record + checksum, atomically.

    A write error (disk full, no permission) becomes a one-line error naming the file; the
    checkpoints already there are untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        previous = _read_record(path) if path.exists() else None
        info = dict(
            record or {},
            file=path.name,
            sha256=sha256_of(tmp),
            bytes=tmp.stat().st_size,
            saved_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        if previous:
            info["replaces_sha256"] = previous["sha256"]
        write_atomic(record_path(path), json.dumps(info, indent=2) + "\n")
        tmp.replace(path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        known = DISK_ERRNOS.get(e.errno or 0) if isinstance(e, OSError) else None
        if known:  # says what to do itself
            reason = known
        elif isinstance(e, OSError):
            reason = f"{e.strerror or e}: free disk space or fix permissions, then resume"
        else:  # the zip writer's message; the cause is the disk or a size limit
            reason = (
                "the write failed (disk full, a file-size limit or no permission): free disk "
                "space or fix permissions, then resume"
            )
        raise UserError(
            f"could not write checkpoint {path}: {reason}; earlier checkpoints are intact"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already when the write succeeded
    return path


def _torch_load(path: Path, map_location: Any) -> Any:
    """torch.load(weights_only=True), its failures named for what they are."""
    try:
        with warnings.catch_warnings():  # the one line below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise disk_error(path, e, "read") from None
    except MemoryError:
        raise UserError(f"not enough memory to load {path}: close other programs") from None
    except RuntimeError as e:
        if "memory" in str(e).lower() and "zip" not in str(e).lower():
            raise UserError(f"not enough memory to load {path}: {_first_line(e)}") from None
        raise _unreadable(path, e) from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise _unreadable(path, e) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _unreadable(path: Path, e: BaseException) -> CheckpointError:
    text = str(e)
    if "Unsupported global" in text or "GLOBAL" in text:
        return CheckpointError(
            f"{path} is a pickle that would run code to load (not a weights-only checkpoint): "
            "lmforge does not load such files; save plain tensors (torch.save(state_dict))"
        )
    return CheckpointError(
        f"checkpoint {path} cannot be read ({type(e).__name__}): truncated or corrupt"
    )


def _foreign(path: Path, state: Any) -> CheckpointError | None:
    """Name a checkpoint written by another tool, with what to do instead."""
    if not isinstance(state, dict):
        return CheckpointError(f"{path} holds a {type(state).__name__}, not an lmforge checkpoint")
    if "model_args" in state and "iter_num" in state:
        return CheckpointError(
            f"{path} is a nanoGPT checkpoint (ckpt.pt), not lmforge's: lmforge reads Hugging "
            "Face folders; save the model as one (transformers' GPT2LMHeadModel with its weights, "
            "save_pretrained) and start from it with --train.init_from=FOLDER"
        )
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return CheckpointError(
            f"{path} is a plain state dict (tensors only), not an lmforge checkpoint: it records "
            "no model shape or tokenizer; export such weights as a Hugging Face folder and use "
            "--train.init_from=FOLDER"
        )
    if "model" not in state or not isinstance(state["model"], dict):
        return CheckpointError(f"{path} is not an lmforge checkpoint (no model weights in it)")
    return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the checksum against the record beside it, load with weights_only=True (to the CPU
    by default), and check that it is an lmforge checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    record = _read_record(path)
    if record is None:
        state = _torch_load(path, map_location)  # to say what it is, if not ours
        problem = _foreign(path, state)
        raise problem or CheckpointError(
            f"checkpoint {path} has no checksum record ({record_path(path).name}) beside it, so "
            "it cannot be verified: copy the .json lmforge wrote along with the .pt"
        )
    actual = sha256_of(path)
    if actual not in (record["sha256"], record.get("replaces_sha256")):
        raise CheckpointError(
            f"checkpoint {path} is corrupt (checksum mismatch with "
            f"{record_path(path).name}): truncated or modified"
        )
    state = _torch_load(path, map_location)
    problem = _foreign(path, state)
    if problem is not None:
        raise problem
    return state


def step_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_N.pt in the folder, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found)


def checkpoint_files(directory: str | Path) -> list[Path]:
    """Every checkpoint in the folder: step_N.pt (oldest first), then best.pt, final_model.pt."""
    directory = Path(directory)
    weights = [directory / n for n in WEIGHTS_FILES if (directory / n).is_file()]
    return [p for _, p in step_checkpoints(directory)] + weights


def newest_valid(
    directory: str | Path,
    report: Callable[[str], None] = print,
    map_location: str | torch.device = "cpu",
) -> tuple[Path, dict[str, Any]] | None:
    """The newest step checkpoint that verifies; corrupt newer ones are reported and left in place.

    Only a checksum or format failure counts as corrupt: a read error or too little memory stops
    here, as what it is.
    """
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
        record_path(path).unlink(missing_ok=True)
        removed.append(path)
    return removed


def set_aside(path: Path) -> Path | None:
    """A corrupt checkpoint about to be written again (the run resumed from an earlier one) is
    renamed, not lost: `step_N.corrupt-YYYYMMDD-HHMMSS.pt`."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.stem}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    path.replace(target)
    if record_path(path).exists():
        record_path(path).replace(record_path(target))
    return target


def _candidates(folder: Path) -> list[Path]:
    """A run's checkpoints in the order `CKPT_OR_RUN` picks them: best, final, newest step."""
    names = [folder / n for n in WEIGHTS_FILES if (folder / n).is_file()]
    return names + [p for _, p in reversed(step_checkpoints(folder))]


def load_run_checkpoint(
    ckpt_or_run: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, Any]]:
    """A checkpoint file, or a run folder's best.pt, else final_model.pt, else newest step: the
    first that verifies (a one-line notice on stderr for each one that does not)."""
    path = Path(ckpt_or_run)
    if path.is_file():
        return path, load_checkpoint(path, map_location)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint or run folder at {path}")
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = _candidates(folder)
    if not candidates:
        raise CheckpointError(f"{path} holds no checkpoint (best.pt, final_model.pt or step_N.pt)")
    for candidate in candidates:
        try:
            return candidate, load_checkpoint(candidate, map_location)
        except CheckpointError as e:
            if candidate == candidates[-1]:
                raise CheckpointError(f"no checkpoint in {path} verifies (last: {e})") from None
            print(f"lmforge: notice: {e}; using the next checkpoint of {path}", file=sys.stderr)
    raise AssertionError("unreachable")


def load_model(ckpt_or_run: str | Path, device: str | torch.device = "cpu"):
    """(model, state) from an lmforge checkpoint or run folder, in eval mode."""
    path, state = load_run_checkpoint(ckpt_or_run)
    from lmforge.config import model_config_from_dict
    from lmforge.model import Transformer

    if not isinstance(state.get("config"), dict) or "model" not in state["config"]:
        raise CheckpointError(f"{path} has no model config in it: not written by lmforge train")
    cfg = model_config_from_dict(state["config"]["model"])
    model = Transformer(cfg)
    _load_weights(model, state["model"], path)
    model.to(device).eval()
    state["path"] = str(path)
    return model, state


def _load_weights(model: torch.nn.Module, weights: dict[str, Any], path: Path) -> None:
    own = model.state_dict()
    wrong = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights]
    if wrong or missing:
        what = f"shape of {wrong[0]}" if wrong else f"missing {missing[0]}"
        raise CheckpointError(
            f"cannot load {path}: its weights do not fit the model ({what}); "
            "use the same model settings as the checkpoint"
        )
    model.load_state_dict(weights)


def load_weights_into(model: torch.nn.Module, ckpt_or_run: str | Path) -> Path:
    """Copy another checkpoint's weights into `model` (`--train.init_from`); shapes must match."""
    path, state = load_run_checkpoint(ckpt_or_run)
    _load_weights(model, state["model"], path)
    return path


def load_run_tokenizer(state: dict[str, Any]):
    """The tokenizer a checkpoint was trained with: RUN/tokenizer/ beside RUN/checkpoints/."""
    from lmforge.tokenizers import get_tokenizer, load_tokenizer

    identity = state.get("tokenizer")
    if not identity:
        raise CheckpointError(f"{state.get('path', 'the checkpoint')} records no tokenizer")
    if identity.get("name") in ("gpt2", "byte"):  # no vocabulary file: built from the name
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

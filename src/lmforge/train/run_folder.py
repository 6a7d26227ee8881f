"""A run folder that guards itself, for both phases, before anything in it is written.

* One trainer at a time: `fcntl.flock` on `RUN/.lock`, which records the owner's pid and host. A
  second trainer exits with one line naming the pid; the kernel drops the lock of a process that
  dies (kill -9 included), so a stale file never blocks.
* Never a silent restart: `train.resume=none` on a folder that holds checkpoints, or checkpoints
  none of which verifies, is refused with one line; nothing is renamed, moved or pruned on the way.
* A resume continues the same run: the checkpoint's config is compared with the new one. Keys that
  decide what is trained (`FIXED`: the model, the tokenizer and data, the sequence of batches) must
  be equal; the others (cadence of evals/logs/saves, max_steps, patience, lr, ...) may change, and
  each change is printed and recorded (config.previous.yaml, run_info.json's `resumes`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import Config, save_config
from lmforge.distributed import Dist, agree
from lmforge.errors import UserError
from lmforge.files import remove_stale_temporaries, write_atomic, write_json
from lmforge.train import checkpoint as ckpt

LOCK_NAME = ".lock"
# Config keys that decide what is trained; "model" stands for every model.* key.
FIXED = (
    "model",
    "data.mode",
    "data.stride",
    "train.batch_size",
    "train.grad_accum",
    "train.seed",
    "train.init_from",
    "optim.name",
    "sft.data",
    "sft.weights",
    "sft.val_fraction",
    "sft.pack",
    "sft.questions_per_story",
    "sft.skip_bad",
    "sft.allow_plain_text",
)
# Keys that only say how this process runs or where things are: never compared.
UNCOMPARED = ("run.dir", "train.resume", "data.dir")


@dataclass
class Start:
    """A checkpoint this run continues from, and what changed in the config since."""

    path: Path
    state: dict[str, Any]
    changes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))


class RunFolder:
    def __init__(self, path: str | Path, dist: Dist | None = None) -> None:
        if not str(path).strip():
            raise UserError("run.dir is empty: name the run folder, e.g. --run.dir=runs/mine")
        self.path = Path(path)
        self.dist = dist or Dist()
        self.checkpoints = self.path / "checkpoints"
        self._lock_fd: int | None = None
        self._owner_recorded = False

    # ------------------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Hold the folder's lock (rank 0) for the whole run. A refused run leaves the folder as it
        found it: a lock file (or folder) this call created is removed again."""
        created = not self.path.exists()
        lock_created = not (self.path / LOCK_NAME).exists()
        agree(self.dist, self._acquire if self.dist.is_main else lambda: None)
        try:
            yield self
        except BaseException:
            if self.dist.is_main and lock_created and not self._owner_recorded:
                self._remove_lock(remove_folder=created)
            raise
        finally:
            self._release()

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; one trainer per folder is then up to the user
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            from lmforge.files import disk_error

            raise disk_error(self.path / LOCK_NAME, e, "create") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"run.dir {self.path} is in use by {owner}: wait for that trainer to end (or "
                "stop it), or choose another --run.dir"
            ) from None
        self._lock_fd = fd

    def record_owner(self) -> None:
        """Say in the lock file who holds it (written once the run's checks have passed)."""
        if self._lock_fd is None:
            return
        text = f"lmforge pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%c')}"
        try:
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, text.encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, the next write will say why
            return
        self._owner_recorded = True

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def _remove_lock(self, remove_folder: bool) -> None:
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            if remove_folder and not any(self.path.iterdir()):
                self.path.rmdir()
        except OSError:
            pass

    # ---------------------------------------------------------------------- where to start
    def starting_point(self, cfg: Config, phase: Any) -> Start | None:
        """The checkpoint to continue from (None: a new run), after every check; reads only."""
        self._check_phase(phase)
        resume = cfg.train.resume
        existing = ckpt.checkpoint_files(self.checkpoints)
        names = ", ".join(p.name for p in existing[-4:])
        if resume == "none":
            if existing:
                raise UserError(
                    f"train.resume=none, but {self.checkpoints} holds checkpoints ({names}): "
                    f"resume them (train.resume=auto), start new training from their weights in a "
                    f"new folder (--train.init_from={self.path} --run.dir=NEW), or move them away"
                )
            return None
        if resume == "auto":
            if not ckpt.step_checkpoints(self.checkpoints):
                if existing:
                    raise UserError(
                        f"{self.checkpoints} holds {names} but no step checkpoint to resume from: "
                        f"start new training from those weights in a new folder "
                        f"(--train.init_from={self.path} --run.dir=NEW), or move them away"
                    )
                return None
            found = ckpt.newest_valid(self.checkpoints, report=self._notice)
            if found is None:
                raise UserError(
                    f"none of the checkpoints in {self.checkpoints} verifies ({names}): nothing "
                    "was changed; move the damaged files away to start again, or resume from a "
                    "copy of the run that has good ones"
                )
            path, state = found
        else:
            path, state = Path(resume), ckpt.load_checkpoint(resume)
            if not state.get("optimizers"):
                raise UserError(
                    f"train.resume={resume} holds weights only (no optimizer or data position): "
                    "resume from a step_N.pt, or start new training with "
                    f"--train.init_from={resume}"
                )
        return Start(path, state, self._compare(state, cfg, phase, path))

    def _notice(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)

    def _check_phase(self, phase: Any) -> None:
        if phase.init_from is not None:
            init = Path(phase.init_from).resolve()
            if self.path.resolve() in (init.parent.parent, init.parent, init):
                raise UserError(
                    f"run.dir {self.path} is the run being started from: choose a new "
                    f"--run.dir for the {phase.name} run"
                )
        info = self.path / "run_info.json"
        if not info.is_file():
            return
        import json

        try:
            recorded = json.loads(info.read_text(encoding="utf-8")).get("phase")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = None
        if recorded and recorded != phase.name:
            raise UserError(
                f"run.dir {self.path} holds a {recorded} run: choose a new --run.dir for the "
                f"{phase.name} run"
            )

    def _compare(self, state: dict[str, Any], cfg: Config, phase: Any, path: Path) -> list[str]:
        """Refuse a resume that would train something else; return the allowed changes."""
        old, new = _flat(state.get("config") or {}), _flat(cfg.to_dict())
        old_world, world = int(state.get("world_size", 1)), self.dist.world_size
        refused, allowed = [], []
        for key in sorted(set(old) | set(new)):
            before, after = old.get(key), new.get(key)
            if before == after or key in UNCOMPARED or key not in new:
                continue
            change = f"{key} {_show(before)} -> {_show(after)}"
            if key == "train.batch_size":
                continue  # compared below as the global batch
            if key.split(".")[0] == "model" or key in FIXED:
                refused.append(change)
            else:
                allowed.append(change)
        batch = old.get("train.batch_size") or 0
        if batch * old_world != cfg.train.batch_size * world:
            refused.append(
                f"the global batch {batch} x {old_world} process(es) -> "
                f"{cfg.train.batch_size} x {world}"
            )
        elif batch != cfg.train.batch_size:
            allowed.append(
                f"train.batch_size {batch} -> {cfg.train.batch_size} on {world} processes "
                "(the same global batch)"
            )
        if key_changed := _data_change(state, phase):
            refused.append(key_changed)
        if refused:
            raise UserError(
                f"cannot resume {self.path} from {path.name}: {'; '.join(refused)} (these decide "
                "what is trained, so the run would not continue the same training): use a new "
                f"--run.dir, or start new training from these weights with "
                f"--train.init_from={path}"
            )
        return allowed

    # ------------------------------------------------------------------------------ writes
    def write_start(self, cfg: Config, phase: Any, info: dict[str, Any], start: Start | None):
        """config.yaml (the earlier one kept as config.previous.yaml when it changed),
        tokenizer/ and run_info.json, each written atomically. Rank 0 only."""
        if not self.dist.is_main:
            return
        self.record_owner()
        for sub in ("logs", "checkpoints", "training_plots"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(
            self.path, *(self.path / s for s in ("checkpoints", "logs", "training_plots"))
        )
        config = self.path / "config.yaml"
        if start is not None and start.changes and config.is_file():
            write_atomic(self.path / "config.previous.yaml", config.read_bytes())
        save_config(cfg, config)
        phase.tokenizer.save(self.path / "tokenizer")  # generate/chat/export find it here
        if start is not None:
            info["resumes"] = _previous_resumes(self.path) + [
                {"step": start.step, "from": start.path.name, "changes": start.changes}
            ]
        write_json(self.path / "run_info.json", info)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items()
            if isinstance(values, dict) for key, value in values.items()}  # fmt: skip


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value) if isinstance(value, str) else str(value)


def _data_change(state: dict[str, Any], phase: Any) -> str | None:
    """The data (and tokenizer) the checkpoint was trained on against what this run reads."""
    saved = state.get("data_identity")
    if saved is None:  # checkpoints of lmforge before 0.2 record the tokenizer only
        saved_tok = state.get("tokenizer") or {}
        mine = phase.data_identity.get("tokenizer") or {}
        if saved_tok and mine and saved_tok != mine:
            return f"tokenizer {saved_tok.get('name')} -> {mine.get('name')}"
        return None
    diffs = [key for key in sorted(set(saved) | set(phase.data_identity))
             if saved.get(key) != phase.data_identity.get(key)]  # fmt: skip
    if not diffs:
        return None
    if "tokenizer" in diffs:
        before = (saved.get("tokenizer") or {}).get("name")
        after = (phase.data_identity.get("tokenizer") or {}).get("name")
        if before == after:
            return f"tokenizer {before} (same name, another vocabulary)"
        return f"tokenizer {before} -> {after}"
    shown = ", ".join(f"{k} {saved.get(k)} -> {phase.data_identity.get(k)}" for k in diffs[:3])
    return f"the data ({shown})"


def _previous_resumes(run: Path) -> list[dict[str, Any]]:
    import json

    try:
        return list(json.loads((run / "run_info.json").read_text(encoding="utf-8"))["resumes"])
    except (OSError, KeyError, TypeError, ValueError):
        return []

"""Training batches read from memmapped token files, at a position that is a pure function of
(seed, step, micro_step, rank): a resumed run reads exactly the batches the uninterrupted run
would have read, and no file is ever loaded into memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.chat_format import IGNORE_INDEX, N_CHAT_TOKENS
from lmforge.errors import UserError

MODES = ("random", "epoch", "doc")
SCAN_TOKENS = 1 << 26  # document starts are found 64 M tokens at a time: flat memory


TOKEN_DTYPES = ("uint16", "uint32")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive(value: Any) -> bool:
    return _count(value) and value > 0


# What each key of meta.json must hold, as the error names it (prepare writes at least one window
# of tokens to each split); `read_meta` needs all but eot_id, which only doc batches need.
META_KEYS: dict[str, tuple[Any, str]] = {
    "dtype": (lambda v: v in TOKEN_DTYPES, " or ".join(TOKEN_DTYPES)),
    "train_tokens": (_positive, "a positive whole number"),
    "val_tokens": (_positive, "a positive whole number"),
    "vocab_size": (_positive, "a positive whole number"),
    "tokenizer": (
        lambda v: isinstance(v, dict) and isinstance(v.get("name"), str),
        'an object with the tokenizer\'s "name"',
    ),
    "eot_id": (_count, "a whole number >= 0"),
}
READ_META_NEEDS = ("dtype", "train_tokens", "val_tokens", "vocab_size", "tokenizer")


def load_meta_json(meta_path: Path, required: tuple[str, ...] = READ_META_NEEDS) -> dict[str, Any]:
    """meta.json parsed and checked: the `required` keys must be there, and every key of
    `META_KEYS` that is there must hold what it should. A damaged file is one UserError."""
    again = "re-run lmforge prepare to rebuild the folder"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is damaged (not JSON: {e}); {again}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path} is damaged (not a JSON object); {again}")
    for key, (valid, what) in META_KEYS.items():
        if key not in meta:
            if key in required:
                raise UserError(f"{meta_path} is damaged: it has no {key!r}; {again}")
        elif not valid(meta[key]):
            raise UserError(
                f"{meta_path} is damaged: {key!r} is {meta[key]!r}, not {what}; {again}"
            )
    vocab = meta.get("vocab_size")
    if "eot_id" in meta and vocab is not None and meta["eot_id"] >= vocab:
        raise UserError(
            f"{meta_path} is damaged: eot_id {meta['eot_id']} is outside the vocabulary of "
            f"{vocab} tokens; {again}"
        )
    recorded = meta.get("tokenizer", {}).get("vocab_size", vocab)
    if vocab is not None and recorded != vocab:
        raise UserError(
            f"{meta_path} is damaged: vocab_size {vocab} differs from its tokenizer's "
            f"{recorded!r}; {again}"
        )
    return meta


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data folder, checked, and checked against the token files beside
    it: what every reader of a prepared folder may rely on."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "not found"
        raise UserError(f"data folder {data_dir} {what}; run lmforge prepare first")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"{meta_path} not found: {data_dir} is not a prepared data folder; "
            "run lmforge prepare --out on it"
        )
    meta = load_meta_json(meta_path)
    itemsize = np.dtype(meta["dtype"]).itemsize
    expected = {"train.bin": meta["train_tokens"], "val.bin": meta["val_tokens"]}
    for name, tokens in expected.items():
        path = data_dir / name
        if not path.is_file():
            raise UserError(f"{path} not found; re-run lmforge prepare")
        if path.stat().st_size != tokens * itemsize:
            raise UserError(
                f"{path} holds {path.stat().st_size} bytes but meta.json says {tokens} "
                f"{meta['dtype']} tokens; the folder is incomplete or changed: re-run prepare"
            )
    return meta


class TokenBatches:
    """(x, y) batches of ``context`` tokens from a token file or array.

    ``mode="random"``: each sequence is a window of context+1 tokens at an offset drawn from
    ``np.random.default_rng([seed, step, micro_step])`` for the global batch (batch_size x
    world_size windows); rank r takes windows r*batch_size .. (r+1)*batch_size - 1.
    ``mode="epoch"``: non-overlapping windows every ``stride`` tokens (default ``context``),
    shuffled per epoch with ``default_rng([seed, epoch])`` and consumed in order: sequence ``j`` of
    micro-batch (step, micro_step, rank) is global sample
    ``((step * grad_accum + micro_step) * world_size + rank) * batch_size + j``.
    ``mode="doc"``: like random, but every window starts at a document boundary (on the ``eot``
    token that ends the document before, so it reads as a BOS), or every ``context`` tokens inside
    a document longer than the window. A random offset cuts the first part of a document off, and
    whatever later depends on it (a name to copy, a question's answer) cannot be learnt from that
    window; nanochat aligns its rows to BOS for the same reason. ``first_doc_only=True`` (for
    validation) scores only the window's first document, so that the mean loss weighs documents
    as the corpus does and can be set against the entropy floor.
    """

    def __init__(
        self,
        path_or_array: str | Path | np.ndarray,
        context: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        mode: str = "random",
        stride: int | None = None,
        grad_accum: int = 1,
        dtype: str | None = None,
        eot_id: int | None = None,
        first_doc_only: bool = False,
    ) -> None:
        if mode not in MODES:
            raise UserError(f"batch mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.context = context
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.mode = mode
        self.stride = stride or context
        self.grad_accum = grad_accum
        self.first_doc_only = first_doc_only
        meta: dict[str, Any] = {}
        if isinstance(path_or_array, np.ndarray):
            self._array: np.ndarray | None = path_or_array
            self.path = None
            self.num_tokens = len(path_or_array)
        else:
            self._array = None
            self.path = Path(path_or_array)
            if not self.path.is_file():
                raise UserError(f"token file {self.path} not found; run lmforge prepare first")
            if dtype is None or ((mode == "doc" or first_doc_only) and eot_id is None):
                meta_path = self.path.parent / "meta.json"
                if not meta_path.is_file():
                    raise UserError(f"{meta_path} not found: cannot tell the dtype of {self.path}")
                meta = load_meta_json(meta_path, required=("dtype",))
                dtype = dtype or meta["dtype"]
            self._dtype = np.dtype(dtype)
            self.num_tokens = self.path.stat().st_size // self._dtype.itemsize
        if self.num_tokens < context + 1:
            where = self.path or "the token array"
            raise UserError(
                f"{where} holds {self.num_tokens} tokens, fewer than one window of context+1 = "
                f"{context + 1}; lower the context or prepare more data"
            )
        # Epoch mode: window starts 0, stride, 2*stride, ... that fit entirely.
        self.windows_per_epoch = (self.num_tokens - context - 1) // self.stride + 1
        self._perm_cache: dict[int, np.ndarray] = {}
        self.eot_id = eot_id if eot_id is not None else meta.get("eot_id")
        # A token file whose ids do not fit its vocabulary (damaged, or another tokenizer's) would
        # crash the embedding lookup (on a GPU: a device-side assert); each batch is checked.
        vocab = meta.get("vocab_size")
        self.id_limit = vocab + N_CHAT_TOKENS if vocab is not None else None
        self.doc_starts: np.ndarray | None = None
        if mode == "doc" or first_doc_only:
            if self.eot_id is None:
                raise UserError("doc batches need the end-of-text id (eot_id in meta.json)")
        if mode == "doc":
            self.doc_starts = self._document_starts()

    def _document_starts(self) -> np.ndarray:
        """Window starts: 0, every eot (it ends the document before the next one), and every
        ``context`` tokens inside longer documents; all that leave room for a whole window."""
        data = self._data()
        eots = [np.flatnonzero(data[i : i + SCAN_TOKENS] == self.eot_id) + i
                for i in range(0, self.num_tokens, SCAN_TOKENS)]  # fmt: skip
        bounds = np.unique(np.concatenate([np.zeros(1, np.int64), *eots]).astype(np.int64))
        lengths = np.diff(np.append(bounds, self.num_tokens))
        pieces = -(-lengths // self.context)  # windows needed to cover each document
        first = np.repeat(bounds, pieces)
        within = np.arange(len(first)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        starts = first + within * self.context
        starts = starts[starts <= self.num_tokens - self.context - 1]
        if len(starts) == 0:
            raise UserError(
                f"{self.path or 'the token array'}: no document start leaves room for a window "
                f"of {self.context + 1} tokens; lower the context"
            )
        return starts

    # ------------------------------------------------------------------------------- positions
    @property
    def samples_per_step(self) -> int:
        """Sequences read per optimizer step across all micro-steps and ranks."""
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Optimizer steps needed to read every window once (epoch mode)."""
        return -(-self.windows_per_epoch // self.samples_per_step)

    def epoch_of(self, step: int) -> int:
        """Epoch (from 0) that the first sequence of ``step`` belongs to (epoch mode)."""
        return step * self.samples_per_step // self.windows_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)
            if len(self._perm_cache) > 2:  # a batch spans at most two epochs
                self._perm_cache.clear()
            self._perm_cache[epoch] = perm
        return perm

    def offsets(self, step: int, micro_step: int = 0) -> np.ndarray:
        """Start offsets (tokens) of the batch's windows: a pure function of the arguments."""
        if self.mode in ("random", "doc"):
            # The whole (global) batch is drawn at once and each rank takes its slice, so N ranks
            # with batch B read exactly what 1 process with batch N*B reads: the same loss curve.
            starts = self.doc_starts
            high = self.num_tokens - self.context if starts is None else len(starts)
            rng = np.random.default_rng([self.seed, step, micro_step])
            every = rng.integers(0, high, size=self.batch_size * self.world_size)
            mine = every[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            return mine if starts is None else starts[mine]
        first = (step * self.grad_accum + micro_step) * self.world_size + self.rank
        samples = first * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, within = np.divmod(samples, self.windows_per_epoch)
        windows = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            windows[mask] = self._permutation(int(epoch))[within[mask]]
        return windows * self.stride

    # --------------------------------------------------------------------------------- reading
    def _data(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        # Re-opened on each call, as nanoGPT does: a long-lived memmap keeps every page it has
        # touched mapped, which shows up as steadily growing memory use.
        return np.memmap(self.path, dtype=self._dtype, mode="r")

    def get_batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 tensors of shape (batch_size, context) on ``device``; y is x shifted."""
        starts = self.offsets(step, micro_step)
        index = starts[:, None] + np.arange(self.context + 1)  # (B, T+1)
        ids = self._data()[index]
        if self.id_limit is not None and ids.size and int(ids.max()) >= self.id_limit:
            row, col = np.unravel_index(int(ids.argmax()), ids.shape)
            raise UserError(
                f"{self.path}: token id {int(ids.max())} at position {int(index[row, col])} is "
                f"outside the vocabulary ({self.id_limit - N_CHAT_TOKENS} tokens): the file is "
                "damaged or was made with another tokenizer; re-run lmforge prepare"
            )
        windows = torch.from_numpy(ids.astype(np.int64))
        x, y = windows[:, :-1], windows[:, 1:]
        if self.first_doc_only:
            # Targets after the first eot that follows the window's first token belong to the
            # next document, which the window holds only in part: not scored.
            ends = (y == self.eot_id).int()
            after = torch.cumsum(ends, dim=1) - ends > 0
            y = y.masked_fill(after, IGNORE_INDEX)
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with compute.
            x = x.contiguous().pin_memory().to(self.device, non_blocking=True)
            y = y.contiguous().pin_memory().to(self.device, non_blocking=True)
        else:
            x, y = x.contiguous().to(self.device), y.contiguous().to(self.device)
        return x, y

    def __repr__(self) -> str:
        source = self.path or "array"
        return (
            f"TokenBatches({source}, tokens={self.num_tokens}, context={self.context}, "
            f"batch_size={self.batch_size}, mode={self.mode})"
        )

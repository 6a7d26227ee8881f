"""`lmforge report` and `lmforge compare`: short functions over a MetricsTable.

A dashboard PNG, a text summary (with a plain-words overfitting verdict) and a JSON dump, all
timestamped under training_plots/; during training LiveDashboard keeps one dashboard.png fresh.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import UserError
from lmforge.files import write_atomic
from lmforge.monitor.logparse import MetricsTable, load_metrics

RISE = 0.02  # val loss this far (relative) above its best counts as rising, not noise
RATIO_MAX, RATIO_GROWTH = 1.15, 0.10  # val/train ratio above this, and grown by this, = a gap
BLOWUP = 1.5  # final train loss this many times its smoothed minimum = diverging


def moving_average(values: Sequence[float], window: int | None = None) -> np.ndarray:
    """Trailing mean, window min(50, n/10) by default; the first points average what exists."""
    y = np.asarray(values, dtype=float)
    window = window or min(50, max(1, len(y) // 10))
    sums = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(len(y))
    lo = np.maximum(0, idx - window + 1)
    return (sums[idx + 1] - sums[lo]) / (idx + 1 - lo)


def overfitting_verdict(
    train_steps: Sequence[int],
    train_loss: Sequence[float],
    val_steps: Sequence[int],
    val_loss: Sequence[float],
) -> tuple[str, str]:
    """(verdict, rule): verdict is one of "no sign of overfitting", "overfitting", "diverging",
    "not enough validation points"; the rule says what was checked, with the numbers."""
    train, val = np.asarray(train_loss, float), np.asarray(val_loss, float)
    for name, steps, values in (("training", train_steps, train), ("validation", val_steps, val)):
        if (~np.isfinite(values)).any():
            i = int(np.argmax(~np.isfinite(values)))
            return "diverging", f"{name} loss became {values[i]} at step {steps[i]}"
    smooth = moving_average(train) if len(train) else train
    if len(train) >= 5:
        k = max(1, len(train) // 10)
        final, low = float(train[-k:].mean()), float(smooth.min())
        if final > BLOWUP * low and final - low > 0.1:
            return "diverging", (
                f"training loss: mean of the last {k} logged values {final:.4f} > {BLOWUP}x "
                f"its lowest moving average {low:.4f} (step {train_steps[int(smooth.argmin())]})"
            )
    if len(val) < 3:
        return "not enough validation points", f"need 3 validation losses, have {len(val)}"
    best = int(val.argmin())
    rise = (val[-1] - val[best]) / val[best]
    head = f"validation loss {val[-1]:.4f} vs its best {val[best]:.4f} (step {val_steps[best]})"
    if not len(train):
        verdict = "overfitting" if rise > RISE else "no sign of overfitting"
        return verdict, f"{head}: {rise:+.1%} (limit +{RISE:.0%}); no training loss to compare"
    train_at = np.interp(val_steps, train_steps, smooth)  # smoothed train loss at each eval
    ratio = val / train_at
    if rise > RISE and train_at[-1] < train_at[best]:
        return "overfitting", (
            f"{head}: {rise:+.1%} (> +{RISE:.0%}) while training loss fell "
            f"{train_at[best]:.4f} -> {train_at[-1]:.4f}"
        )
    if rise > RISE:
        return "diverging", (
            f"{head}: {rise:+.1%} (> +{RISE:.0%}) and training loss rose too "
            f"{train_at[best]:.4f} -> {train_at[-1]:.4f}"
        )
    if ratio[-1] > RATIO_MAX and ratio[-1] - ratio[0] > RATIO_GROWTH:
        return "overfitting", (
            f"val/train loss ratio grew {ratio[0]:.2f} -> {ratio[-1]:.2f} (limit {RATIO_MAX}, "
            f"growth limit {RATIO_GROWTH}): training loss falls faster than validation loss"
        )
    return "no sign of overfitting", (
        f"{head}: {rise:+.1%} (limit +{RISE:.0%}); val/train ratio {ratio[-1]:.2f} "
        f"(first {ratio[0]:.2f}; overfitting if > {RATIO_MAX} and up by > {RATIO_GROWTH})"
    )


def _summary(table: MetricsTable) -> tuple[dict[str, Any], list[str]]:
    """The report's figures and the summary lines that state them, computed together."""
    steps, loss = table.points("loss")
    val_steps, val = table.points("val_loss")
    f: dict[str, Any] = {"format": table.format, "source": table.source}
    out = [f"Training summary: {table.name}", f"Source: {table.source} (format: {table.format})"]
    out += [f"Settings: {line}" for line in settings_lines(table.info)] or ["Settings: not logged"]
    if loss:
        f |= dict(initial_loss=loss[0], final_loss=loss[-1], improvement=loss[0] / loss[-1])
        out.append(
            f"Loss: initial {loss[0]:.4f} (step {steps[0]}), final {loss[-1]:.4f} "
            f"(step {steps[-1]}), improvement x{f['improvement']:.2f}"
        )
    # Skip the first logged value: other trainers' first step includes compilation.
    ms, mfu = (table.points(c)[1] for c in ("ms_per_step", "mfu"))
    if ms:
        f["mean_ms_per_step"] = float(np.mean(ms[1:] or ms))
        out.append(
            f"Time per iteration: mean {f['mean_ms_per_step']:.1f} ms "
            f"(median {np.median(ms[1:] or ms):.1f} ms)"
        )
    f["mean_mfu"] = float(np.mean(mfu[1:] or mfu)) if mfu else None
    out.append(f"MFU: mean {f['mean_mfu']:.1%}" if mfu else "MFU: unknown (no peak FLOP/s known)")
    for column in ("tokens_seen", "elapsed_s"):
        f[f"final_{column}"] = table.points(column)[1][-1] if table.has(column) else None
    if f["final_tokens_seen"] is not None or f["final_elapsed_s"] is not None:
        out.append(
            f"Tokens seen: {_human(f['final_tokens_seen'] or math.nan)}, "
            f"wall time: {f['final_elapsed_s'] or math.nan:.0f} s"
            + (" (estimated from step times)" if table.info.get("estimated") else "")
        )
    if val:
        best = int(np.argmin(val))
        f |= dict(
            first_val_loss=val[0],
            best_val_loss=val[best],
            best_step=val_steps[best],
            final_val_loss=val[-1],
        )
        out.append(
            f"Validation loss: first {val[0]:.4f}, best {val[best]:.4f} "
            f"(step {val_steps[best]}), final {val[-1]:.4f}"
        )
    if val and loss:
        train_there = float(np.interp(val_steps[-1], steps, moving_average(loss)))
        f["val_train_ratio"] = val[-1] / train_there
        out.append(f"Val/train loss ratio (final): {f['val_train_ratio']:.3f}")
    f["verdict"], f["verdict_rule"] = overfitting_verdict(steps, loss, val_steps, val)
    if table.info.get("non_finite"):  # points() drops nan/inf, the parser noted where it was
        f["verdict"], f["verdict_rule"] = "diverging", table.info["non_finite"]
    out.append(f"Verdict: {f['verdict']} — {f['verdict_rule']}")
    floor = table.info.get("entropy_floor")
    if floor is not None and val:
        f |= dict(
            entropy_floor=floor,
            final_minus_floor=val[-1] - floor,
            best_minus_floor=min(val) - floor,
        )
        out.append(
            f"Entropy floor: {floor:.4f} nats/token; final val - floor "
            f"{val[-1] - floor:+.4f}, best val - floor {min(val) - floor:+.4f}"
        )
        out += [
            f"!!! val loss {v:.4f} at step {s} is below the entropy floor {floor:.4f}: "
            "this is a bug (leak, mask or loss error)"
            for s, v in zip(val_steps, val)
            if v < floor
        ][:3]
    return f, out


def summary_figures(table: MetricsTable) -> dict[str, Any]:
    """The numbers the summary reports (also saved in training_data_*.json)."""
    return _summary(table)[0]


def write_summary(table: MetricsTable) -> str:
    """The text summary (SPEC §4): settings, loss, speed, validation, verdict, entropy floor."""
    return "\n".join(_summary(table)[1]) + "\n"


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def settings_lines(info: dict[str, Any]) -> list[str]:
    """Model and training settings as two short lines (none when the log has none)."""
    m, t = info.get("model", {}), info.get("train", {})
    heads = m.get("n_heads")
    if heads is not None and m.get("n_kv_heads") not in (None, 0, heads):  # 0 means n_heads
        heads = f"{heads} (kv {m['n_kv_heads']})"
    lr = t.get("lr") and f"{t['lr']:g}" + (f" -> {t['min_lr']:g}" if t.get("min_lr") else "")
    batch = t.get("batch_size")
    if batch is not None and (t.get("grad_accum") or 1) > 1:
        batch = f"{batch} x {t['grad_accum']} accum"
    device = " ".join(str(t[k]) for k in ("device", "dtype") if t.get(k))
    params = info.get("params") and _human(info["params"])
    model = dict(
        params=params,
        block=m.get("block"),
        layers=m.get("n_layers"),
        heads=heads,
        dim=m.get("dim"),
        canon=m.get("canon"),  # 0 (off) is left out, as every false value is
        vocab=m.get("vocab_size"),
        tokenizer=tokenizer.get("name")
        if isinstance(tokenizer := info.get("tokenizer"), dict)
        else tokenizer,
    )
    train = dict(
        batch=batch,
        context=t.get("context") or m.get("context"),
        lr=lr,
        schedule=t.get("schedule"),
        optimizer=t.get("optimizer"),
        max_steps=t.get("max_steps"),
        device=device,
        phase=info.get("phase"),
    )
    lines = ["   ".join(f"{k} {v}" for k, v in part.items() if v) for part in (model, train)]
    return [line for line in lines if line]


def _no_data(ax: Any, title: str, reason: str) -> None:
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        f"no data ({reason})",
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=12,
        color="0.4",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _why_missing(table: MetricsTable, column: str) -> str:
    if not getattr(table, column):
        return f"not in this {table.format} log"
    if column == "mfu":
        return "unknown on this device: no peak FLOP/s"
    return "all values empty"


def _series_panel(
    ax: Any,
    table: MetricsTable,
    column: str,
    title: str,
    ylabel: str,
    scale: float = 1.0,
    log: bool = False,
    floor: float | None = None,
) -> None:
    steps, values = table.points(column)
    if not values:
        return _no_data(ax, title, _why_missing(table, column))
    y = np.asarray(values) * scale
    # The schedule is already smooth, and a window of 1 would only repeat the logged line.
    window = min(50, max(1, len(y) // 10)) if column != "lr" else 1
    few = len(y) < 30
    ax.plot(
        steps,
        y,
        lw=0.8 if window > 1 else 1.5,
        alpha=0.35 if window > 1 else 1.0,
        marker="o" if few else None,
        ms=4,
        label="logged" if window > 1 else None,
    )
    if window > 1:
        ax.plot(steps, moving_average(y, window), lw=2, label=f"moving average ({window})")
    median, title_note = float(np.median(y)), ""
    if not log and y.max() > 3 * median > 0:  # a compile/warm-up spike would flatten the rest
        top = 1.3 * float(y[y <= 3 * median].max())
        ax.set_ylim(0, top)
        title_note = f" (spikes above {top:.3g} clipped)"
    elif not log:
        ax.set_ylim(0, 1.1 * float(y.max()))  # from zero: noise should not look like a trend
    ax.set_title(title + title_note)
    _finish(ax, ylabel, log and bool(y.min() > 0), floor)


def _log_y(ax: Any) -> None:
    """Log y with plain tick labels (2, 3, 4 rather than 2x10^0): losses span about one decade."""
    from matplotlib.ticker import LogFormatterSciNotation

    class Plain(LogFormatterSciNotation):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""  # label the ticks it would

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(Plain())
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _finish(ax: Any, ylabel: str, log: bool, floor: float | None) -> None:
    if floor is not None:
        ax.axhline(floor, ls="--", color="k", lw=1, label=f"entropy floor {floor:.3f}")
    if log:
        _log_y(ax)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=9)


def _loss_panel(ax: Any, table: MetricsTable, floor: float | None) -> None:
    steps, loss = table.points("loss")
    val_steps, val = table.points("val_loss")
    if not loss and not val:
        return _no_data(ax, "Train vs validation loss", "no losses in this log")
    if loss:
        ax.plot(steps, moving_average(loss), lw=1.5, label="train (moving average)")
    ax.plot(val_steps, val, "o-", ms=4, lw=1.5, label="validation" if val else "no validation yet")
    ax.set_title("Train vs validation loss")
    _finish(ax, "loss (nats/token)", min(loss + val) > 0, floor)


def _atomic_savefig(fig: Any, path: Path) -> None:
    # atomic: the trainer refreshes it while a user may be viewing it
    write_atomic(path, lambda f: fig.savefig(f, format="png"), binary=True)


def render_dashboard(table: MetricsTable, path: str | Path, floor: float | None = None) -> Path:
    """The six-panel dashboard PNG, settings written underneath."""
    from matplotlib.figure import Figure  # lazily: `lmforge --help` should not pay for it
    from matplotlib.ticker import EngFormatter

    floor = floor if floor is not None else table.info.get("entropy_floor")
    fig = Figure(figsize=(16, 15), dpi=90)
    axes = fig.subplots(3, 2).ravel()
    fig.subplots_adjust(left=0.06, right=0.98, top=0.94, bottom=0.11, hspace=0.3, wspace=0.16)
    _loss_panel(axes[0], table, floor)
    _series_panel(
        axes[1], table, "loss", "Training loss per step", "loss (nats/token)", log=True, floor=floor
    )
    _series_panel(axes[2], table, "ms_per_step", "Time per iteration", "ms")
    _series_panel(axes[3], table, "mfu", "Model FLOPs utilisation", "MFU (%)", scale=100)
    _series_panel(axes[4], table, "lr", "Learning rate", "lr")
    _series_panel(axes[5], table, "tokens_per_s", "Throughput", "tokens/s")
    axes[5].yaxis.set_major_formatter(EngFormatter(sep=""))  # 412K, not 412000
    last = f", last step {table.step[-1]}" if table.step else ""
    fig.suptitle(f"{table.name} ({table.format}{last})", fontsize=15)
    text = "\n".join(settings_lines(table.info)) or "model and training settings: not in this log"
    fig.text(0.06, 0.015, text, fontsize=12, family="monospace", va="bottom")
    _atomic_savefig(fig, Path(path))
    return Path(path)


def write_table_report(table: MetricsTable, out_dir: str | Path | None = None) -> dict[str, Path]:
    """PNG + summary + JSON, timestamped, into out_dir (default RUN/training_plots/)."""
    run_dir = table.info.get("run_dir")
    default = Path(run_dir) if run_dir else Path(table.source).parent
    out = Path(out_dir) if out_dir else default / "training_plots"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    paths = {
        "png": out / f"training_metrics_{stamp}.png",
        "summary": out / f"training_summary_{stamp}.txt",
        "json": out / f"training_data_{stamp}.json",
    }
    render_dashboard(table, paths["png"])
    figures, lines = _summary(table)
    write_atomic(paths["summary"], "\n".join(lines) + "\n")
    dump = dict(
        generated=stamp,
        format=table.format,
        source=table.source,
        summary=figures,
        info=table.info,
        metrics=table.to_dict(),
    )
    write_atomic(paths["json"], json.dumps(dump, indent=1, default=str))
    return paths


def write_report(path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Read a run folder or log and write the timestamped PNG, summary and JSON."""
    return write_table_report(load_metrics(path), out_dir)


def _x_at(table: MetricsTable, column: str, steps: Sequence[int]) -> np.ndarray:
    """The x column (step, tokens_seen, elapsed_s) at the given steps, NaN where unknown."""
    if column == "step":
        return np.asarray(steps, float)
    known_steps, xs = table.points(column)
    if not xs:
        return np.full(len(steps), np.nan)
    return np.interp(steps, known_steps, xs, left=np.nan, right=np.nan)


def _run_label(table: MetricsTable, name: str) -> str:
    t = table.info.get("train", {})
    params = table.info.get("params") and f"{_human(table.info['params'])} params"
    bits = [t.get("optimizer"), t.get("lr") and f"lr {t['lr']:g}", params]
    return name + (f" ({', '.join(b for b in bits if b)})" if any(bits) else "")


def compare_runs(paths: Sequence[str | Path], out_dir: str | Path) -> Path:
    """One PNG overlaying runs' loss vs step, vs tokens seen and vs wall time (log y)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    tables = [load_metrics(p) for p in paths]
    names = [t.name for t in tables]
    if len(set(names)) < len(names):  # two runs called "run": say which folder
        names = [f"{Path(t.source).parent.name}/{t.name}" for t in tables]
    fig = Figure(figsize=(19, 6.5), dpi=90)
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(
        left=0.05, right=0.98, top=0.88, wspace=0.2, bottom=0.2 + 0.035 * math.ceil(len(tables) / 2)
    )
    panels = (("step", "step"), ("tokens_seen", "tokens seen"), ("elapsed_s", "wall time (s)"))
    for ax, (column, xlabel) in zip(axes, panels):
        title, missing = f"Loss vs {xlabel}", []
        for i, (table, name) in enumerate(zip(tables, names)):
            steps, loss = table.points("loss")
            val_steps, val = table.points("val_loss")
            x, x_val = _x_at(table, column, steps), _x_at(table, column, val_steps)
            if not np.isfinite(x).any() and not np.isfinite(x_val).any():
                missing.append(name)
                continue
            if loss:
                ax.plot(
                    x, moving_average(loss), color=f"C{i}", lw=1.8, label=_run_label(table, name)
                )
            ax.plot(x_val, val, "o", color=f"C{i}", ms=5, mfc="none", label=f"{name} validation")
        if len(missing) == len(tables):
            _no_data(ax, title, f"no {column} in these logs")
            continue
        if missing:
            ax.text(0.02, 0.02, f"no {column} in: {', '.join(missing)}", transform=ax.transAxes)
        ax.set(title=title, xlabel=xlabel, ylabel="loss (nats/token)")
        ax.grid(alpha=0.3, which="both")
        _log_y(ax)
        if column == "tokens_seen":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda h: len(h[0]))
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=10, frameon=False)
    fig.suptitle(
        "Runs compared (lines: train loss moving average, circles: validation)", fontsize=14
    )
    out = Path(out_dir) / f"compare_{datetime.now().strftime('%Y%m%d_%H%M%S')}.png"
    _atomic_savefig(fig, out)
    return out


class LiveDashboard:
    """Re-renders training_plots/dashboard.png from the CSV every `every` steps during training.

    A render costs ~0.5 s whatever the table's length (matplotlib's fixed text and tick work), so
    a refresh is skipped, and tried again at the next multiple of `every`, while the last render
    took more than BUDGET of the wall time since the previous one: fast GPU steps stay fast.
    """

    BUDGET = 0.02

    def __init__(self, run_dir: str | Path, every: int, keep_iterations: bool = False) -> None:
        self.run_dir, self.every, self.keep_iterations = Path(run_dir), every, keep_iterations
        self.path = self.run_dir / "training_plots" / "dashboard.png"
        self.seconds = 0.0  # total time spent refreshing, so the trainer can report the cost
        self._last_render, self._last_end = 0.0, time.perf_counter()

    def maybe_refresh(self, step: int) -> Path | None:
        if self.every <= 0 or step <= 0 or step % self.every:
            return None
        start = time.perf_counter()
        if self._last_render > self.BUDGET * (start - self._last_end):
            return None
        try:
            render_dashboard(load_metrics(self.run_dir), self.path)
            if self.keep_iterations:
                shutil.copyfile(self.path, self.path.with_name(f"iter_{step}_dashboard.png"))
            return self.path
        except (UserError, OSError, ValueError) as e:  # a plot must never end a training run
            print(f"dashboard refresh skipped at step {step}: {e}")
            return None
        finally:
            self._last_end = time.perf_counter()
            self._last_render = self._last_end - start
            self.seconds += self._last_render

    def final(self) -> dict[str, Path]:
        """The full timestamped report; dashboard.png becomes a copy of its PNG."""
        paths = write_report(self.run_dir)
        write_atomic(self.path, paths["png"].read_bytes())
        return paths

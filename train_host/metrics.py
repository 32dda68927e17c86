"""A run's metrics: metrics.jsonl appended as training goes, metrics.csv and curves.png at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """metrics.jsonl (appended as training goes), then metrics.csv and curves.png at the end."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # drop records a killed run wrote after its last checkpoint
            keep = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        records = read_records(self.path)
        if not records:
            return
        keys = sorted({k for r in records for k in r}, key=lambda k: (k != "step", k))
        with open(self.path.with_suffix(".csv"), "w") as f:
            f.write(",".join(keys) + "\n")
            for r in records:
                f.write(",".join("" if r.get(k) is None else str(r[k]) for k in keys) + "\n")
        plot_curves(records, self.path.parent / "curves.png")


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a kill during an append (or any unreadable line) is skipped."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_nll" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss (ELBO, nats/position)")
    axes[0].plot([r["step"] for r in val], [r["val_nll"] for r in val], "o-", label="val NLL bound (nats/token)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[1].plot([r["step"] for r in val], [r["val_acc"] for r in val], "o-", label="val masked accuracy")
    for key in sorted(k for k in (val[0] if val else {}) if k.startswith("val_acc@")):
        axes[1].plot([r["step"] for r in val], [r[key] for r in val], ".--", label=key)
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=8)
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train], label="learning rate")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_bar(console, main: bool):
    if not main or not console.is_terminal:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )


def log(r, stats, lr: float, bar, task) -> None:
    """Every `log_every` steps: a metrics record, the progress bar (or a plain line when not a terminal)."""
    tc = r.tc
    r.window[1] += 1
    r.window[2] += float(stats[0])
    if not r.d.main or (r.step % tc.log_every and r.step != tc.steps):
        return
    now = time.perf_counter()
    tps = r.window[1] * tc.batch_size * r.cfg.canvas_len / max(now - r.window[0], 1e-9)
    record = {"step": r.step, "loss": r.window[2] / r.window[1], "lr": lr, "tokens_per_s": tps,
              "masked_acc": float(stats[2] / max(stats[1], 1)), "elapsed": r.elapsed()}
    r.metrics_log.write(record)
    if bar:
        bar.update(task, completed=min(r.elapsed(), tc.time_budget) if tc.time_budget else r.step, loss=record["loss"], tps=tps)
    if not r.console.is_terminal:  # under a time budget: the time left, not a step count that will never be reached
        if tc.time_budget:
            where = f"step {r.step}, {_clock(max(0.0, tc.time_budget - r.elapsed()))} left"
        else:  # a step budget (a resumed run's too): the time left at the run's pace so far, evaluations included
            where = f"step {r.step}/{tc.steps}, {_clock(max(0, tc.steps - r.step) * r.elapsed() / max(r.step, 1))} left"
        r.console.print(f"{where} loss {record['loss']:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
    r.window = [now, 0, 0.0]


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

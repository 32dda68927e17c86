"""The training loop: one process or torchrun DDP, resumable exactly, with progress, metrics and curves.

Run it as `dllm train ...`, or under torchrun as `torchrun --nproc_per_node N -m train_host.train ...`
(same flags). Determinism: the data order and every random draw of a step are pure functions of
(seed, step), so `--resume` after N steps reproduces the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.tokenizer import TextTokenizer
from train_host import checkpoint as ckpt_io
from train_host import diffusion
from train_host.autoregressive import ar_loss
from train_host.data import CanvasDataset, batch_indices, load_manifest
from train_host.evaluate import evaluate
from train_host.model import Denoiser


@dataclass
class TrainConfig:
    """Everything a run depends on; saved with each checkpoint."""

    data: str
    out: str
    config: str = "tiny"
    objective: str = "mdlm"  # mdlm | ar (the autoregressive baseline: causal mask, next-token loss)
    d_model: int = 0  # 0: from the named config; set to try custom sizes
    n_layer: int = 0
    n_head: int = 0
    canvas_len: int = 128
    batch_size: int = 32  # canvases per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1
    steps: int = 1000
    time_budget: float = 0.0  # seconds; 0 = no limit
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: str = "loglinear"
    ema: float = 0.0  # e.g. 0.999; 0 = off
    eval_every: int = 100
    eval_canvases: int = 128
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    threads: int = 0
    compile: bool = False
    resume: bool = False
    pause_after: int = 0  # stop (with a checkpoint) after this many steps in this invocation; 0 = off

    def model_config(self, tokenizer: TextTokenizer) -> ModelConfig:
        overrides = {k: v for k, v in (("d_model", self.d_model), ("n_layer", self.n_layer), ("n_head", self.n_head)) if v}
        cfg = ModelConfig.from_name(self.config, vocab_size=tokenizer.vocab_size, canvas_len=self.canvas_len, mask_id=tokenizer.mask_id,
                                    causal=self.objective == "ar")
        if overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides, "name": "custom", "d_ff": 0})
        return cfg


def lr_at(tc: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / max(1, tc.warmup))
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * warm * (tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * cos)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _pick_device(name: str, d: _Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DllmError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    if name != "cpu":
        raise DllmError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def _autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    if device.type == "cpu":
        if name in ("bf16", "fp16"):
            raise DllmError(f"--dtype {name} is for GPUs; on the CPU training runs in fp32")
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to save and stop after the current step."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        if threading_is_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


class MetricsLog:
    """metrics.jsonl (appended as training goes), then metrics.csv and curves.png at the end."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # drop records a killed run wrote after its last checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        records = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]
        if not records:
            return
        keys = sorted({k for r in records for k in r}, key=lambda k: (k != "step", k))
        with open(self.path.with_suffix(".csv"), "w") as f:
            f.write(",".join(keys) + "\n")
            for r in records:
                f.write(",".join("" if r.get(k) is None else str(r[k]) for k in keys) + "\n")
        plot_curves(records, self.path.parent / "curves.png")


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


def train(tc: TrainConfig, console=None) -> dict:
    """Train (or resume) a run; returns the final metrics. Only rank 0 writes files and prints."""
    from rich.console import Console

    d = _setup_distributed(tc.device)
    try:
        return _train(tc, d, console or Console(stderr=True))
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _validate(tc: TrainConfig) -> None:
    if tc.steps <= 0:
        raise DllmError(f"--steps must be positive, got {tc.steps}")
    if tc.batch_size <= 0 or tc.grad_accum <= 0:
        raise DllmError("--batch-size and --grad-accum must be positive")
    if tc.lr <= 0:
        raise DllmError(f"--lr must be positive, got {tc.lr}")
    if not 0.0 <= tc.ema < 1.0:
        raise DllmError(f"--ema must be in [0, 1), got {tc.ema}")
    if tc.pause_after < 0:
        raise DllmError("--pause-after must not be negative")
    if tc.time_budget < 0:
        raise DllmError("--time-budget must not be negative")
    if tc.objective not in ("mdlm", "ar"):
        raise DllmError(f"unknown --objective {tc.objective!r}; choose mdlm (masked diffusion) or ar (the autoregressive baseline)")
    if tc.schedule not in diffusion.SCHEDULES:
        raise DllmError(f"unknown --schedule {tc.schedule!r}; choose one of: {', '.join(diffusion.SCHEDULES)}")


def _train(tc: TrainConfig, d: _Dist, console) -> dict:
    _validate(tc)
    device = _pick_device(tc.device, d)
    amp_dtype = _autocast_dtype(tc.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(tc.threads or max(1, (os.cpu_count() or 1) // d.world))
    per_rank, rem = divmod(tc.batch_size, d.world * tc.grad_accum)
    if rem or per_rank == 0:
        raise DllmError(f"--batch-size {tc.batch_size} must split evenly over {d.world} process(es) x {tc.grad_accum} accumulation steps")

    data_dir, run = Path(tc.data), Path(tc.out)
    manifest = load_manifest(data_dir)
    tokenizer = TextTokenizer.from_file(data_dir / "tokenizer.json")
    cfg = tc.model_config(tokenizer)
    train_ds = CanvasDataset(data_dir, "train", cfg.canvas_len, tokenizer.pad_id)
    val_ds = CanvasDataset(data_dir, "val", cfg.canvas_len, tokenizer.pad_id)

    existing = ckpt_io.list_checkpoints(run)
    resume_from = None
    if existing and not tc.resume:
        raise DllmError(f"{run} already holds checkpoints; continue it with --resume or train into a new --out")
    if tc.resume and existing:
        resume_from = existing[-1]
        saved = ckpt_io.read_config(resume_from)
        if saved["model"] != cfg.to_dict():
            raise DllmError(f"{resume_from} is a {saved['model']['name']} model of another shape than --config {tc.config} asks for; resume with the run's own settings")
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_partial(run)
        if tc.resume and not existing:
            console.print(f"[yellow]nothing to resume in {run}; starting a new run[/]")

    torch.manual_seed(tc.seed)
    core = Denoiser(cfg).to(device)
    opt = torch.optim.AdamW(_param_groups(core, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)
    ema = copy.deepcopy(core).eval() if tc.ema > 0 else None
    if ema is not None:
        ema.requires_grad_(False)
    step, samples_seen, elapsed_before = 0, 0, 0.0
    if resume_from is not None:
        _, weights, _, saved = ckpt_io.load_checkpoint(resume_from)
        tensors, meta = ckpt_io.load_trainer_state(resume_from)
        raw = {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")} or weights
        ckpt_io.load_weights(core, raw, str(resume_from))
        if ema is not None:
            ckpt_io.load_weights(ema, weights, str(resume_from))
        opt.load_state_dict(meta["optimizer_state"])
        torch.set_rng_state(tensors["rng.torch"])
        step, samples_seen, elapsed_before = meta["step"], meta["samples_seen"], meta["elapsed"]
        if d.main:
            console.print(f"resuming {run} from step {step} ({samples_seen:,} canvases seen)")
    model = core
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[d.local_rank] if device.type == "cuda" else None)
    fwd = torch.compile(model) if tc.compile else model

    metrics_log = MetricsLog(run, step if resume_from else None) if d.main else None
    if d.main:
        (run / "train_config.json").write_text(json.dumps({"train": asdict(tc), "model": cfg.to_dict(), "data": manifest}, indent=2))

    def save(metrics: dict) -> Path:
        trainer_tensors = _rng_tensors()
        if ema is not None:
            trainer_tensors.update({f"raw.{k}": v for k, v in ckpt_io.state_dict_for_save(core).items()})
        meta = {"step": step, "samples_seen": samples_seen, "elapsed": elapsed(), "train": asdict(tc)}
        path = ckpt_io.save_checkpoint(
            run, step, core, cfg, tokenizer, metrics,
            trainer_tensors=trainer_tensors, trainer_meta=meta, optimizer=opt,
            run_weights=ckpt_io.state_dict_for_save(ema) if ema is not None else None,
        )
        ckpt_io.prune_checkpoints(run, tc.keep_last)
        return path

    def run_eval() -> dict:
        return evaluate(ema if ema is not None else core, val_ds, cfg.mask_id, n_canvases=tc.eval_canvases,
                        n_t=4, schedule=tc.schedule, device=device, bos_id=tokenizer.eot_id)

    t_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def progress_fraction() -> float:
        p = step / tc.steps
        return max(p, elapsed() / tc.time_budget) if tc.time_budget else p

    tokens_per_step = tc.batch_size * cfg.canvas_len
    micro = tc.batch_size // tc.grad_accum
    last_saved, last_metrics, stop_reason = step, {}, "steps"
    pause_at = step + tc.pause_after if tc.pause_after else None
    window_t, window_steps, loss_acc = time.perf_counter(), 0, 0.0
    bar = _progress(console, d.main)
    task = bar.add_task("train", total=tc.time_budget or tc.steps, loss=float("nan"), tps=0.0) if bar else None

    with _StopFlag() as stop, (bar or _nullcontext()):
        while True:
            if step >= tc.steps:
                break
            if tc.time_budget and elapsed() >= tc.time_budget:
                stop_reason = "time budget"
                break
            if pause_at is not None and step >= pause_at:
                stop_reason = "paused"
                break
            lr = lr_at(tc, step, progress_fraction())
            for group in opt.param_groups:
                group["lr"] = lr
            stats = torch.zeros(4, dtype=torch.float64)  # loss sum, masked, correct, non-finite
            idx = batch_indices(len(train_ds), tc.batch_size, samples_seen, tc.seed)
            for m in range(tc.grad_accum):
                g = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * 101 + m)
                t_all = diffusion.sample_t(micro, g)
                noise_all = torch.rand((micro, cfg.canvas_len), generator=g)
                rows = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
                x = torch.from_numpy(train_ds.batch(idx[m * micro : (m + 1) * micro][rows])).to(device)
                sync = m == tc.grad_accum - 1 or d.world == 1
                with (model.no_sync() if not sync else _nullcontext()), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    if cfg.causal:
                        loss, st = ar_loss(fwd, x, tokenizer.eot_id, tokenizer.pad_id)
                    else:
                        loss, st = diffusion.mdlm_loss(fwd, x, t_all[rows], cfg.mask_id, tc.schedule, noise=noise_all[rows])
                    (loss / tc.grad_accum).backward()
                stats += torch.tensor([float(loss.detach()) / tc.grad_accum, float(st["masked"]), float(st["correct"]), float(not torch.isfinite(loss.detach()))], dtype=torch.float64)
            if d.world > 1:
                dist.all_reduce(stats)
                stats[0] /= d.world
            if stats[3] > 0:
                opt.zero_grad(set_to_none=True)
                last = f"step {last_saved}" if ckpt_io.list_checkpoints(run) else "none yet"
                raise DllmError(f"loss became {float(stats[0])} at step {step + 1}; stopped without saving (last good checkpoint: {last}); try a lower --lr")
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(core.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                with torch.no_grad():
                    for pe, pc in zip(ema.parameters(), core.parameters()):
                        pe.lerp_(pc, 1.0 - tc.ema)
            step += 1
            samples_seen += tc.batch_size
            loss_acc += float(stats[0])
            window_steps += 1

            if d.main and (step % tc.log_every == 0 or step == tc.steps):
                now = time.perf_counter()
                tps = window_steps * tokens_per_step / max(now - window_t, 1e-9)
                record = {"step": step, "loss": loss_acc / window_steps, "lr": lr, "tokens_per_s": tps,
                          "masked_acc": float(stats[2] / max(stats[1], 1)), "elapsed": elapsed()}
                metrics_log.write(record)
                if bar:
                    bar.update(task, completed=min(elapsed(), tc.time_budget) if tc.time_budget else step, loss=record["loss"], tps=tps)
                if not console.is_terminal:
                    console.print(f"step {step}/{tc.steps} loss {record['loss']:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
                window_t, window_steps, loss_acc = now, 0, 0.0

            want_stop = stop.signal is not None
            if d.world > 1:
                flag = torch.tensor([float(want_stop), float(bool(tc.time_budget) and elapsed() >= tc.time_budget)])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                want_stop = bool(flag[0])
            if want_stop:
                stop_reason = "interrupted"
                break
            if step % tc.eval_every == 0 and step < tc.steps:
                if d.main:
                    last_metrics = run_eval()
                    metrics_log.write({"step": step, **last_metrics})
                    path = save(last_metrics)
                    what = ("val NLL", "next-token acc") if cfg.causal else ("val NLL bound", "masked acc")
                    console.print(f"step {step}: {what[0]} {last_metrics['val_nll']:.3f} nats/token, {what[1]} {last_metrics['val_acc']:.3f}  [dim]saved {path.name}[/]")
                    last_saved = step
                if d.world > 1:
                    dist.barrier()

    if d.main:
        if step != last_saved or not ckpt_io.list_checkpoints(run):
            if stop_reason != "interrupted":
                last_metrics = run_eval()
                metrics_log.write({"step": step, **last_metrics})
            save(last_metrics)
        metrics_log.finish()
    if d.world > 1:
        dist.barrier()
    result = {"step": step, "stop": stop_reason, "run": str(run), "elapsed": elapsed(), **last_metrics}
    if stop_reason == "interrupted":
        result["signal"] = stop.signal
    return result


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(console, main: bool):
    if not main or not console.is_terminal:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
    )


if __name__ == "__main__":  # torchrun --nproc_per_node N -m train_host.train <dllm train flags>
    from jetson_dllm.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))

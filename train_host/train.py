"""The training loop: one process or torchrun DDP, resumable exactly, with progress, metrics and curves.

Run it as `dllm train ...`; `dllm train --nproc N` relaunches it under torchrun (train_host/launch.py). Determinism: the
data order and every random draw of a step are pure functions of (seed, step), so `--resume` after N
steps reproduces the weights of an uninterrupted run. The loop reads top to bottom:
setup -> (train_step, log, evaluate_and_save)* -> finish.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import family_of
from jetson_dllm.files import output_lock
from jetson_dllm.manifests import check_replaceable
from jetson_dllm.profiler import check_fits, training_bytes
from jetson_dllm.threads import resolve as resolve_threads
from jetson_dllm.tokenizer import TextTokenizer
from train_host import checkpoint as ckpt_io
from train_host import diffusion
from train_host.bd3 import clip_search, noise_range, searches_clip
from train_host.conditioning import batch_condition, freeze_denoiser, with_condition
from train_host.data import CanvasDataset, batch_indices, load_manifest, verified
from train_host.distributed import Dist, StopFlag, autocast_dtype, pick_device, setup_distributed
from train_host.evaluate import evaluate, unigram_nll
from train_host.metrics import MetricsLog, log, progress_bar
from train_host.networks import build_model
from train_host.optim import lr_at, param_groups
from train_host.pair_data import split_dataset
from train_host.parent import init_weights, initialise, load_teacher
from train_host.train_config import RUN_FORMAT, TrainConfig, validate


@dataclass
class _Run:
    """Everything one training run holds while it goes; built by `setup`, advanced by `train_step`."""

    tc: TrainConfig
    d: Dist
    console: object
    device: torch.device
    amp_dtype: torch.dtype | None
    per_rank: int
    run: Path
    cfg: ModelConfig
    tokenizer: TextTokenizer
    train_ds: CanvasDataset
    val_ds: CanvasDataset
    core: torch.nn.Module
    model: torch.nn.Module  # DDP-wrapped when world > 1
    fwd: torch.nn.Module  # compiled when --compile
    opt: torch.optim.Optimizer
    ema: torch.nn.Module | None
    metrics_log: MetricsLog | None
    step: int = 0
    samples_seen: int = 0
    elapsed_before: float = 0.0
    t_start: float = field(default_factory=time.perf_counter)
    last_saved: int = 0
    last_metrics: dict = field(default_factory=dict)
    unigram_nll: float = 0.0  # the word-frequency baseline of the validation text (computed once)
    eval_seconds: float | None = None  # how long the last evaluation took
    step_seconds: float = 0.0  # a running mean of a training step's time
    window: list = field(default_factory=lambda: [time.perf_counter(), 0, 0.0])  # start, steps, loss sum
    t_range: tuple = (0.0, 1.0)  # bd3: the noise range training draws from (searched at each evaluation)
    teacher: torch.nn.Module | None = None  # --distill: the frozen autoregressive parent (train_host/parent.py)

    @property
    def family(self):
        """The model family's host module (train_host/families): its loss and evaluation extras."""
        return family_of(self.cfg).host_module()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def eval_reserve(self) -> float:
        """Time to keep for the final evaluation: the last one's, or before any, an estimate from the step time
        (an evaluation runs 7 forward passes over `eval_canvases`; a forward pass costs about a third of a step)."""
        if self.eval_seconds is not None:
            return self.eval_seconds
        return 7 * self.tc.eval_canvases / self.tc.batch_size * self.step_seconds / 3

    def progress_fraction(self) -> float:
        p = self.step / self.tc.steps
        return max(p, self.elapsed() / self.tc.time_budget) if self.tc.time_budget else p


def train(tc: TrainConfig, console=None) -> dict:
    """Train (or resume) a run; returns the final metrics. Only rank 0 writes files and prints."""
    from rich.console import Console

    d = setup_distributed(tc.device)
    try:
        with output_lock(Path(tc.out)) if d.main else contextlib.nullcontext():  # one writer per run folder
            return _train(tc, d, console or Console(stderr=True))
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(tc: TrainConfig, d: Dist, console) -> dict:
    r = setup(tc, d, console)
    pause_at = r.step + tc.pause_after if tc.pause_after else None
    bar = progress_bar(console, d.main)
    task = bar.add_task("train", total=tc.time_budget or tc.steps, loss=float("nan"), tps=0.0) if bar else None
    stop_reason = "steps"
    with StopFlag() as stop, (bar or contextlib.nullcontext()):
        while r.step < tc.steps:
            if tc.time_budget and r.elapsed() + r.eval_reserve() >= tc.time_budget:  # the last evaluation fits too
                stop_reason = "time budget"
                break
            if pause_at is not None and r.step >= pause_at:
                stop_reason = "paused"
                break
            t0 = time.perf_counter()
            stats, lr = train_step(r)
            r.step_seconds = time.perf_counter() - t0 if r.step_seconds == 0 else 0.9 * r.step_seconds + 0.1 * (time.perf_counter() - t0)
            log(r, stats, lr, bar, task)
            if _should_stop(r, stop):
                stop_reason = "interrupted"
                break
            if r.step % tc.eval_every == 0 and r.step < tc.steps:
                evaluate_and_save(r)
    return finish(r, stop_reason, stop.signal)


def setup(tc: TrainConfig, d: Dist, console) -> _Run:
    """Check the settings, read the data, build (or resume) the model, optimizer and EMA."""
    validate(tc)
    device = pick_device(tc.device, d)
    amp_dtype = autocast_dtype(tc.dtype, device)
    if device.type == "cpu":
        torch.set_num_threads(resolve_threads(tc.threads, d.world))
    per_rank, rem = divmod(tc.batch_size, d.world * tc.grad_accum)
    if rem or per_rank == 0:
        raise DllmError(f"--batch-size {tc.batch_size} must split evenly over {d.world} process(es) x {tc.grad_accum} accumulation steps")
    data_dir, run = Path(tc.data), Path(tc.out)
    check_replaceable(run, "train_config.json", RUN_FORMAT, "training run")
    manifest = load_manifest(data_dir)
    tokenizer = TextTokenizer.from_file(verified(data_dir, manifest, "tokenizer.json"), manifest.get("special_ids"))
    cfg = _model_config(tc, run, tokenizer)
    check_fits(training_bytes(cfg, per_rank), f"training {cfg.name} on {per_rank} canvases of {cfg.canvas_len} tokens per step",
               "lower --canvas-len or --batch-size (or raise --grad-accum)")
    train_ds, val_ds = (split_dataset(data_dir, split, cfg, tokenizer) for split in ("train", "val"))  # pairs: a conditional model
    resume_from = _resume_point(tc, run, cfg, tokenizer)
    init = init_weights(tc.init, cfg, tokenizer) if tc.init and resume_from is None else None  # checked before writing
    teacher = load_teacher(tc.init, device) if tc.distill else None
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        ckpt_io.clean_partial(run)
        if tc.resume and resume_from is None:
            console.print(f"[yellow]nothing to resume in {run}; starting a new run[/]")
        if getattr(train_ds, "skipped", 0):  # a conditional model's pairs whose condition the encoder cannot read
            console.print(f"[yellow]{train_ds.skipped:,} training pairs left out: their first sentence is longer than --cond-len {cfg.cond_len}[/]")
    torch.manual_seed(tc.seed)
    core = build_model(cfg).to(device)
    if tc.freeze_denoiser:  # the staged training's second stage: the denoiser stays as --init trained it
        freeze_denoiser(core)
    opt = torch.optim.AdamW(param_groups(core, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95), eps=1e-8)
    ema = copy.deepcopy(core).eval().requires_grad_(False) if tc.ema > 0 else None
    model = core
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(core, device_ids=[d.local_rank] if device.type == "cuda" else None)
    r = _Run(tc, d, console, device, amp_dtype, per_rank, run, cfg, tokenizer, train_ds, val_ds, core, model,
             torch.compile(model) if tc.compile else model, opt, ema, None)
    if resume_from is not None:
        _restore(r, resume_from)
    elif init is not None:
        initialise(r, *init)
    r.last_saved, r.teacher = r.step, teacher
    if resume_from is None:
        r.t_range = noise_range(tc)
    r.unigram_nll = unigram_nll(train_ds, val_ds) if d.main else 0.0
    if d.main:
        r.metrics_log = MetricsLog(run, r.step if resume_from else None)
        (run / "train_config.json").write_text(json.dumps({"format": RUN_FORMAT, "train": asdict(tc), "model": cfg.to_dict(), "data": manifest}, indent=2))
    return r


def _model_config(tc: TrainConfig, run: Path, tokenizer: TextTokenizer) -> ModelConfig:
    """The model this run trains; a run started from --init resumes on the shape it recorded (its parent's, read when
    it started: the parent need not be there any more)."""
    existing = ckpt_io.list_checkpoints(run) if tc.resume and tc.init else []
    if existing:
        return ModelConfig.from_dict(ckpt_io.read_config(existing[-1])["model"], where=str(existing[-1]))
    return tc.model_config(tokenizer)


def _resume_point(tc: TrainConfig, run: Path, cfg: ModelConfig, tokenizer: TextTokenizer) -> Path | None:
    existing = ckpt_io.list_checkpoints(run)
    if existing and not tc.resume:
        raise DllmError(f"{run} already holds checkpoints; continue it with --resume or train into a new --out")
    if not (tc.resume and existing):
        return None
    saved = ckpt_io.read_config(existing[-1])
    if saved["special_ids"] != tokenizer.special_ids or ckpt_io.tokenizer_sha256(existing[-1]) != tokenizer.sha256:
        raise DllmError(f"{existing[-1]} was trained with another tokenizer than {tc.data} has; resume on the run's own data")
    if saved["model"] != cfg.to_dict():
        raise DllmError(f"{existing[-1]} is a {saved['model']['name']} model of another shape than --config {tc.config} asks for; resume with the run's own settings")
    return existing[-1]


def _restore(r: _Run, resume_from: Path) -> None:
    """Weights, EMA, optimizer, RNG and data position of a checkpoint, exactly."""
    _, weights, _, _ = ckpt_io.load_checkpoint(resume_from)
    tensors, meta = ckpt_io.load_trainer_state(resume_from)
    raw = {k[4:]: v for k, v in tensors.items() if k.startswith("raw.")} or weights
    ckpt_io.load_weights(r.core, raw, str(resume_from))
    if r.ema is not None:
        ckpt_io.load_weights(r.ema, weights, str(resume_from))
    try:
        r.opt.load_state_dict(meta["optimizer_state"])  # torch checks the groups' sizes and the tensors' shapes
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise DllmError(f"{resume_from}: the optimizer state does not fit this model ({str(e)[:80]}); resume from an earlier checkpoint") from None
    for p in (p for g in r.opt.param_groups for p in g["params"]):
        if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in r.opt.state.get(p, {}).values()):
            raise DllmError(f"{resume_from}: the optimizer state holds a tensor of another shape than its parameter; resume from an earlier checkpoint")
    torch.set_rng_state(tensors["rng.torch"])
    r.step, r.samples_seen, r.elapsed_before = meta["step"], meta["samples_seen"], meta["elapsed"]
    r.t_range = tuple(meta.get("t_range") or noise_range(r.tc))
    if r.d.main:
        r.console.print(f"resuming {r.run} from step {r.step} ({r.samples_seen:,} canvases seen)")


def train_step(r: _Run) -> tuple[torch.Tensor, float]:
    """One optimizer step over `grad_accum` micro-batches; returns (loss, masked, correct, non-finite) and the lr."""
    tc, cfg, d = r.tc, r.cfg, r.d
    lr = lr_at(tc, r.step, r.progress_fraction())
    for group in r.opt.param_groups:
        group["lr"] = lr
    stats = torch.zeros(4, dtype=torch.float64)  # loss sum, masked, correct, non-finite
    micro = tc.batch_size // tc.grad_accum
    idx = batch_indices(len(r.train_ds), tc.batch_size, r.samples_seen, tc.seed)
    rows = slice(d.rank * r.per_rank, (d.rank + 1) * r.per_rank)
    for m in range(tc.grad_accum):
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + r.step * 101 + m)
        t_all = diffusion.sample_t(micro, g)
        noise_all = torch.rand((micro, cfg.canvas_len), generator=g)
        picked = idx[m * micro : (m + 1) * micro][rows]
        x = torch.from_numpy(r.train_ds.batch(picked)).to(r.device)
        condition = batch_condition(r.train_ds, picked, r.device, tc.cond_drop, g)  # a conditional model's, some dropped
        sync = m == tc.grad_accum - 1 or d.world == 1
        with (r.model.no_sync() if not sync else contextlib.nullcontext()), \
                torch.autocast(r.device.type, dtype=r.amp_dtype or torch.float32, enabled=r.amp_dtype is not None):
            loss, st = r.family.train_loss(with_condition(r.fwd, condition), x, r, t_all[rows], noise_all[rows], g)
            (loss / tc.grad_accum).backward()
        stats += torch.tensor([float(loss.detach()) / tc.grad_accum, float(st["masked"]), float(st["correct"]),
                               float(not torch.isfinite(loss.detach()))], dtype=torch.float64)
    if d.world > 1:
        dist.all_reduce(stats)
        stats[0] /= d.world
    if stats[3] > 0:
        r.opt.zero_grad(set_to_none=True)
        last = f"step {r.last_saved}" if ckpt_io.list_checkpoints(r.run) else "none yet"
        raise DllmError(f"loss became {float(stats[0])} at step {r.step + 1}; stopped without saving (last good checkpoint: {last}); try a lower --lr")
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(r.core.parameters(), tc.grad_clip)
    r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    if r.ema is not None:
        with torch.no_grad():
            for pe, pc in zip(r.ema.parameters(), r.core.parameters()):
                pe.lerp_(pc, 1.0 - tc.ema)
    r.step += 1
    r.samples_seen += tc.batch_size
    return stats, lr


def _should_stop(r: _Run, stop: StopFlag) -> bool:
    """A signal on any rank stops every rank (after the same step)."""
    want_stop = stop.signal is not None
    if r.d.world > 1:
        flag = torch.tensor([float(want_stop), float(bool(r.tc.time_budget) and r.elapsed() >= r.tc.time_budget)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        want_stop = bool(flag[0])
    return want_stop


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def run_eval(r: _Run) -> dict:
    t0 = time.perf_counter()
    try:
        # with the word-frequency baseline beside it, so a checkpoint says whether it learned more than that
        return {**_run_eval(r), "unigram_nll": r.unigram_nll, **r.family.eval_extra(r)}
    finally:
        r.eval_seconds = time.perf_counter() - t0


def _run_eval(r: _Run) -> dict:
    return evaluate(r.ema if r.ema is not None else r.core, r.val_ds, r.cfg.mask_id, n_canvases=r.tc.eval_canvases,
                    n_t=4, schedule=r.tc.schedule, device=r.device, bos_id=r.tokenizer.bos_id)


def save(r: _Run, metrics: dict) -> Path:
    trainer_tensors = _rng_tensors()
    if r.ema is not None:
        trainer_tensors.update({f"raw.{k}": v for k, v in ckpt_io.state_dict_for_save(r.core).items()})
    meta = {"step": r.step, "samples_seen": r.samples_seen, "elapsed": r.elapsed(), "train": asdict(r.tc), "t_range": list(r.t_range)}
    path = ckpt_io.save_checkpoint(
        r.run, r.step, r.core, r.cfg, r.tokenizer, metrics,
        trainer_tensors=trainer_tensors, trainer_meta=meta, optimizer=r.opt,
        run_weights=ckpt_io.state_dict_for_save(r.ema) if r.ema is not None else None,
    )
    ckpt_io.prune_checkpoints(r.run, r.tc.keep_last)
    return path


def search_noise_range(r: _Run) -> None:
    """BD3: narrow the training noise range to the one whose loss varies least on validation canvases (rank 0
    searches, every rank follows)."""
    if r.d.main:
        n = min(len(r.val_ds), 2 * min(r.tc.batch_size, 16))  # two batches: the search costs 42 forward passes
        size = min(r.tc.batch_size, 16)
        batches = [torch.from_numpy(r.val_ds.batch(list(range(i, min(i + size, n))))).to(r.device) for i in range(0, n, size)]
        (low, high), _ = clip_search(r.ema if r.ema is not None else r.core, batches, r.cfg.mask_id, r.cfg.block_size, r.tc.schedule, r.step)
        r.t_range = (low, high)
    if r.d.world > 1:
        shared = torch.tensor(r.t_range, dtype=torch.float64, device=r.device)
        dist.broadcast(shared, 0)
        r.t_range = tuple(float(v) for v in shared)


def evaluate_and_save(r: _Run) -> None:
    if searches_clip(r.tc):
        search_noise_range(r)
    if r.d.main:
        r.last_metrics = run_eval(r)
        r.metrics_log.write({"step": r.step, **r.last_metrics})
        path = save(r, r.last_metrics)
        what = {"exact": ("val NLL", "next-token acc"), "bound": ("val NLL bound", "masked acc")}.get(family_of(r.cfg).nll,
                                                                                                  ("val denoising loss", "acc"))
        extra = r.family.eval_extra(r)
        clip = f", noise range [{extra['t_min']:.3g}, {extra['t_max']:.3g}]" if "t_min" in extra else ""
        value = r.last_metrics.get("val_nll", r.last_metrics.get("val_loss"))
        r.console.print(f"step {r.step}: {what[0]} {value:.3f} nats/token, "
                        f"{what[1]} {r.last_metrics['val_acc']:.3f}{clip}  [dim]saved {path.name}[/]")
        r.last_saved = r.step
    if r.d.world > 1:
        dist.barrier()


def finish(r: _Run, stop_reason: str, signum: int | None) -> dict:
    """The last evaluation and checkpoint (unless just saved), the CSV and curves; the run's result."""
    if r.d.main:
        if r.step != r.last_saved or not ckpt_io.list_checkpoints(r.run):
            if stop_reason != "interrupted":
                r.last_metrics = run_eval(r)
                r.metrics_log.write({"step": r.step, **r.last_metrics})
            save(r, r.last_metrics)
        r.metrics_log.finish()
    if r.d.world > 1:
        dist.barrier()
    result = {"step": r.step, "stop": stop_reason, "run": str(r.run), "elapsed": r.elapsed(), **r.last_metrics}
    if stop_reason == "interrupted":
        result["signal"] = signum
    return result

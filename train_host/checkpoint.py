"""Checkpoints: safetensors weights + JSON config + tokenizer, with the exact training state beside them.

A run folder holds `checkpoints/step_00001200/` folders. Each is written in full into a hidden temporary
folder, every file fsynced, then renamed into place, so any `step_*` folder that exists is complete; a
killed write leaves only a `.tmp-*` folder that is ignored and cleaned up. Contents:

    model.safetensors     weights to run (the EMA weights when EMA is on)
    config.json           format, model config, step, metrics, sha256 of every file
    tokenizer.json        the tokenizer the model was trained with
    trainer.safetensors   optimizer moments, raw weights under EMA, RNG states   (resume only)
    trainer.json          step, data position, elapsed time, optimizer hyper-parameters (resume only)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.files import atomic_folder, sha256_file
from jetson_dllm.manifests import CheckpointConfig, member, read_manifest, write_manifest
from jetson_dllm.tokenizer import TextTokenizer
from train_host.networks import build_model

CKPT_FORMAT = "jetson-dllm-checkpoint"
CKPT_VERSION = 2  # 2: sealed config.json, checked schema, every file hashed and verified
REQUIRED = ("model.safetensors", "tokenizer.json")


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters without tied duplicates (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, p in model.state_dict().items():
        key = p.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = p.detach().contiguous().cpu()
    return out


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value.contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta, bad: str = "{}") -> dict:
    """The optimizer's state dict from its flattened tensors and scalars; `bad` formats the error of a malformed one."""
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("scalars", {}), dict):
        raise DllmError(bad.format("the optimizer's record is not an object with param_groups"))
    groups = meta["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise DllmError(bad.format("the optimizer's parameter groups are malformed"))
    known = {p for g in groups for p in g["params"]}
    state: dict[int, dict] = {}
    try:
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for key, value in meta.get("scalars", {}).items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    except ValueError:
        raise DllmError(bad.format(f"an optimizer entry is misnamed ({str(key)[:40]!r})")) from None
    if set(state) - known:
        raise DllmError(bad.format(f"optimizer state for parameter {sorted(set(state) - known)[0]}, which no group holds"))
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    cfg: ModelConfig,
    tokenizer: TextTokenizer,
    metrics: dict,
    trainer_tensors: dict[str, torch.Tensor] | None = None,
    trainer_meta: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    run_weights: dict[str, torch.Tensor] | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write checkpoint `step` atomically and return its folder.

    `run_weights` are the weights to run (EMA); by default the model's own. The optimizer and
    `trainer_*` parts are only needed to resume.
    """
    to_save = run_weights if run_weights is not None else state_dict_for_save(model)
    check_finite(to_save, f"step {step}")  # a diverged model is never saved
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    # A re-save of the same step (resume, then stop at once) replaces it whole.
    with atomic_folder(final, replace=True) as tmp:
        save_file(to_save, str(tmp / "model.safetensors"))
        tokenizer.save(tmp / "tokenizer.json")
        if optimizer is not None or trainer_tensors:
            tensors = dict(trainer_tensors or {})
            meta = dict(trainer_meta or {})
            if optimizer is not None:
                opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
                tensors.update(opt_tensors)
            save_file(tensors, str(tmp / "trainer.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(meta, indent=1))
        config = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "model": cfg.to_dict(),
            "step": step,
            "metrics": metrics,
            "special_ids": tokenizer.special_ids,
            **({"provenance": provenance} if provenance else {}),  # an imported model's source (dllm import)
            "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())},
        }
        write_manifest(tmp / "config.json", config)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of killed writes are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and all((p / name).is_file() for name in ("config.json", *REQUIRED)))  # a half-pruned one is skipped


def clean_partial(run_dir: Path) -> None:
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def read_config(ckpt: Path) -> dict:
    path = ckpt / "config.json"
    if not path.is_file():
        raise DllmError(f"{ckpt} is not a jetson-dllm checkpoint (no config.json); point at a run folder or a checkpoints/step_* folder")
    config = read_manifest(path, CKPT_FORMAT, CKPT_VERSION, "checkpoint", "use an earlier checkpoint", CheckpointConfig)
    unlisted = [n for n in REQUIRED if n not in config["files"]]
    if unlisted:
        raise DllmError(f"{path}: {', '.join(unlisted)} is not hashed in the config; use an earlier checkpoint")
    return config


def metric_of(ckpt: Path, key: str = "val_nll") -> float:
    return read_config(ckpt).get("metrics", {}).get(key, float("inf"))


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint folder from a checkpoint folder itself or a run folder (its best, or latest, checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise DllmError(f"checkpoint {path} not found")
    if (path / "config.json").is_file():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise DllmError(f"{path} holds no checkpoints; train one with `dllm train`")
    if which == "latest":
        return ckpts[-1]
    return min(ckpts, key=lambda c: (metric_of(c), -int(c.name[5:])))


def verify_files(ckpt: Path, config: dict, names: tuple[str, ...] | None = None) -> None:
    """Every file the config lists (or `names` of them) is present, inside the folder and unaltered."""
    for name, expected in config["files"].items():
        if names is not None and name not in names:
            continue
        path = member(ckpt, name, "checkpoint config")
        if not path.is_file():
            raise DllmError(f"{path} is missing; the checkpoint is incomplete, use an earlier one")
        if sha256_file(path) != expected:
            raise DllmError(f"{path} is truncated or altered (sha256 mismatch); use an earlier checkpoint")


def tokenizer_sha256(ckpt: Path) -> str:
    """The sha256 of a checkpoint's tokenizer (what the tokenizer wrapper reports), checked against the config."""
    config = read_config(ckpt)
    verify_files(ckpt, config, ("tokenizer.json",))
    return TextTokenizer.from_file(ckpt / "tokenizer.json", config["special_ids"]).sha256


def check_finite(weights: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run), naming the first such tensor."""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DllmError(f"{where}: {name} holds NaN or infinite values (the run diverged); use an earlier checkpoint or train with a lower --lr")


def load_checkpoint(path: str | Path, which: str = "best") -> tuple[ModelConfig, dict[str, torch.Tensor], TextTokenizer, dict]:
    """(model config, weights, tokenizer, config.json) of a checkpoint, every file checked against its hash."""
    ckpt = resolve_checkpoint(path, which)
    config = read_config(ckpt)
    verify_files(ckpt, config)
    cfg = ModelConfig.from_dict(config["model"], where=str(ckpt / "config.json"))
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise DllmError(f"{ckpt / 'model.safetensors'} cannot be read ({e}); use an earlier checkpoint") from None
    check_finite(weights, str(ckpt / "model.safetensors"))
    tokenizer = TextTokenizer.from_file(ckpt / "tokenizer.json", config["special_ids"])
    if tokenizer.mask_id != cfg.mask_id or tokenizer.vocab_size > cfg.vocab_size:
        raise DllmError(f"{ckpt}: tokenizer does not match the model config; the checkpoint is inconsistent")
    config["path"] = str(ckpt)
    return cfg, weights, tokenizer, config


def load_model(path: str | Path, which: str = "best", device: str = "cpu"):
    """A Denoiser in eval mode from a checkpoint, plus its tokenizer and config.json."""
    cfg, weights, tokenizer, config = load_checkpoint(path, which)
    model = build_model(cfg)
    load_weights(model, weights, config["path"])
    return model.to(device).eval(), tokenizer, config


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, fresh: frozenset[str] = frozenset()) -> None:
    """`weights` into `model`, every tensor's name and shape checked; `fresh` names tensors `source` may lack (they keep
    the model's initial values: a self-conditioning projection post-trained onto a checkpoint without one)."""
    expected = state_dict_for_save(model)
    missing = set(expected) - set(weights) - set(fresh)
    unexpected = set(weights) - set(expected)
    if missing or unexpected:
        raise DllmError(f"{source} does not fit this model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise DllmError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config says {tuple(expected[name].shape)}")
    model.load_state_dict(weights, strict=False)


TRAINER_FILES = ("trainer.safetensors", "trainer.json")


def load_trainer_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state a run resumes from (optimizer, RNG, data position), its structure checked as the weights' is: the
    trainer files hashed in the config and unaltered, the tensors a readable safetensors file holding the RNG state,
    the JSON an object with the step, the canvases seen and the time spent, the optimizer's tensors and scalars
    matching its parameter groups. Anything else: one DllmError naming the checkpoint, never a traceback."""
    config = read_config(ckpt)
    unlisted = [n for n in TRAINER_FILES if n not in config["files"]]
    if unlisted:
        raise DllmError(f"{ckpt}: {unlisted[0]} is not hashed in the config, so it cannot be trusted to resume from; "
                        "resume from an earlier checkpoint, or start a new run with --init " + str(ckpt))
    verify_files(ckpt, config, TRAINER_FILES)
    bad = f"{ckpt}: the trainer state is unreadable ({{}}); resume from an earlier checkpoint, or start a new run with --init {ckpt}"
    try:
        tensors = load_file(str(ckpt / "trainer.safetensors"))
    except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError...)
        raise DllmError(bad.format(f"trainer.safetensors: {str(e)[:80]}")) from None
    try:
        meta = json.loads((ckpt / "trainer.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DllmError(bad.format(f"trainer.json is not JSON: {str(e)[:60]}")) from None
    if not isinstance(meta, dict):
        raise DllmError(bad.format("trainer.json is not an object"))
    for key, kinds in (("step", int), ("samples_seen", int), ("elapsed", (int, float))):
        value = meta.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool) or not value >= 0:
            raise DllmError(bad.format(f"{key} is {str(value)[:20]!r}, not a count"))
    rng = tensors.get("rng.torch")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1:
        raise DllmError(bad.format("no torch RNG state"))
    if "optimizer" in meta:
        meta["optimizer_state"] = _unflatten_optimizer(tensors, meta["optimizer"], bad)
    return tensors, meta


def prune_checkpoints(run_dir: Path, keep_last: int, metric: str = "val_nll") -> None:
    """Delete all but the last `keep_last` checkpoints and the best one."""
    ckpts = list_checkpoints(run_dir)
    if len(ckpts) <= keep_last:
        return
    best = min(ckpts, key=lambda c: (metric_of(c, metric), -int(c.name[5:])))
    for c in ckpts[:-keep_last]:
        if c != best:
            shutil.rmtree(c, ignore_errors=True)

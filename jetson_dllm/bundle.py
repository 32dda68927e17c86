"""The bundle: the one folder that travels from host to Jetson.

    manifest.json        format version, model config, tokenizer special ids, inputs and heads, canvas
                         lengths, precisions (file per precision), sha256 of every file, parity and
                         calibration reports
    tokenizer.json
    model.<precision>.onnx
    engines/             TensorRT engines, built on the device (their names and metadata say what they
                         were built from; see jetson_dllm/engine.py)

A bundle is written into a hidden temporary folder and renamed into place when complete, so a folder
with a manifest.json is always whole; reading verifies the hashes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.families import Family, family_of, model_graphs
from jetson_dllm.files import atomic_folder, output_lock, sha256_file
from jetson_dllm.manifests import BundleManifest, check_replaceable, member, read_manifest, write_manifest
from jetson_dllm.precisions import PRECISIONS
from jetson_dllm.tokenizer import TextTokenizer

BUNDLE_FORMAT = "jetson-dllm-bundle"
BUNDLE_VERSION = 2  # 2: sealed manifest, checked schema and paths
MANIFEST = "manifest.json"
ENGINES = "engines"


@dataclass
class Bundle:
    path: Path
    manifest: dict
    engines_carried: dict = field(default_factory=dict)  # after an --overwrite export: engines kept and dropped

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"])

    @property
    def precisions(self) -> list[str]:
        return list(self.manifest["precisions"])

    @property
    def canvas_lengths(self) -> list[int]:
        return list(self.manifest["canvas_lengths"])

    @property
    def topk(self) -> int:
        return int(self.manifest["heads"]["sampling"]["k"])

    @property
    def engines_dir(self) -> Path:
        return self.path / ENGINES

    @property
    def family(self) -> Family:
        return family_of(self.config)

    def _entry(self, precision: str) -> dict:
        entry = self.manifest["precisions"].get(precision)
        if entry is None:
            raise DllmError(f"{self.path} has no {precision} model (it has {', '.join(self.precisions)}); export it with `dllm export --{precision.split('-')[0]}`")
        return entry

    def _entry_key(self, graph: str) -> str:
        return entry_key(self.config, graph)

    def onnx_path(self, precision: str, graph: str = "") -> Path:
        """The ONNX file of a precision's graph (`""`: the family's first graph); a clear error when the bundle does
        not have it."""
        entry, key = self._entry(precision), self._entry_key(graph)
        if key not in entry:
            raise DllmError(f"{self.path} has no {precision} {graph} graph; re-export the bundle")
        if entry[key] not in self.manifest["files"]:  # every file that runs is hashed: none is optional
            raise DllmError(f"{self.path}: {entry[key]} is not listed in the manifest's hashes; re-export the bundle")
        return member(self.path, entry[key])

    def graph_paths(self, precision: str) -> dict[str, Path]:
        """The precision's ONNX file of each graph of the family that the bundle carries."""
        entry = self._entry(precision)
        return {g: self.onnx_path(precision, g) for g in model_graphs(self.config) if self._entry_key(g) in entry}

    def onnx_sha256(self, precision: str, graph: str = "") -> str:
        return self.manifest["files"][self._entry(precision)[self._entry_key(graph)]]

    def tokenizer(self):
        tok = TextTokenizer.from_file(self.path / "tokenizer.json", self.manifest["special_ids"])
        if tok.special_ids != self.manifest["special_ids"]:
            raise DllmError(f"{self.path}/tokenizer.json does not match the manifest's special ids; export the bundle again")
        return tok

    def verify(self, names: list[str] | None = None) -> dict[str, str]:
        """Check files against their recorded sha256; returns name -> "ok" | "missing" | "altered"."""
        status = {}
        for name, digest in self.manifest["files"].items():
            if names is not None and name not in names:
                continue
            path = member(self.path, name)
            if not path.is_file():
                status[name] = "missing"
            elif sha256_file(path) != digest:
                status[name] = "altered"
            else:
                status[name] = "ok"
        return status

    def check(self, names: list[str]) -> None:
        """Raise a clear error unless every named file is listed in the manifest, present and unaltered."""
        unlisted = [n for n in names if n not in self.manifest["files"]]
        if unlisted:
            raise DllmError(f"{self.path}: {', '.join(unlisted)} is not listed in the manifest; re-export the bundle")
        for name, state in self.verify(names).items():
            if state != "ok":
                raise DllmError(f"{self.path / name} is {state} (sha256 mismatch with the manifest); copy the bundle again or re-export it")


def entry_key(cfg, graph: str) -> str:
    """Which key of a precision's manifest entry names a graph's file: the model's first graph is `file` (what bundles
    before several graphs held), the others by their name. The one place an entry is decoded."""
    return "file" if graph in ("", family_of(cfg).graphs[0]) else graph


def entry_of(cfg, files: dict[str, str], **extra) -> dict:
    """A precision's manifest entry from graph -> file name (and fields such as `target`)."""
    return {entry_key(cfg, graph): name for graph, name in files.items()} | extra


def entry_files(cfg, entry: dict) -> dict[str, str]:
    """graph -> file name of the model's graphs a precision's entry holds."""
    return {graph: entry[entry_key(cfg, graph)] for graph in model_graphs(cfg) if entry_key(cfg, graph) in entry}


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's sealed manifest and check what it says; with `verify`, every file against its hash too
    (a bundle is used whole or refused: one altered byte anywhere is named and refused)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.exists():
        raise DllmError(f"bundle {path} not found")
    if not manifest_path.is_file():
        raise DllmError(f"{path} is not a bundle (no {MANIFEST}); make one with `dllm export CHECKPOINT -o {path}`")
    manifest = read_manifest(manifest_path, BUNDLE_FORMAT, BUNDLE_VERSION, "bundle", "copy the bundle again or re-export it", BundleManifest)
    bundle = Bundle(path, manifest)
    _check_consistent(bundle)
    if verify:
        bundle.check(list(manifest["files"]))
    return bundle


def _check_consistent(bundle: Bundle) -> None:
    """What the schema cannot say: the model config is valid, precisions are known and their files hashed, the
    canvas shapes fit the model, the special ids are the model's."""
    m, where = bundle.manifest, bundle.path / MANIFEST
    cfg = ModelConfig.from_dict(m["model"], where=str(where))
    for name in m["files"]:
        member(bundle.path, name)
    for required in ("tokenizer.json",):
        if required not in m["files"]:
            raise DllmError(f"{where}: {required} is not hashed in the manifest; re-export the bundle")
    if "fp32" not in m["precisions"]:
        raise DllmError(f"{where}: the bundle has no fp32 graph (every export writes one); re-export the bundle")
    for precision, entry in m["precisions"].items():
        if precision not in PRECISIONS:
            raise DllmError(f"{where}: unknown precision {precision[:20]!r}; re-export the bundle")
        graphs = {entry_key(cfg, g) for g in model_graphs(cfg)}  # the entry's files, one per graph
        for key, name in entry.items():
            if key == "target":
                continue
            if key not in graphs:
                raise DllmError(f"{where}: the {precision} entry names {key[:30]!r}, which is no graph of a {cfg.family} model; re-export the bundle")
            if member(bundle.path, name).name not in m["files"]:
                raise DllmError(f"{where}: the {precision} file {name} is not hashed in the manifest; re-export the bundle")
    if any(not 1 <= c <= cfg.canvas_len for c in m["canvas_lengths"]):
        raise DllmError(f"{where}: canvas lengths {m['canvas_lengths']} must be within 1..{cfg.canvas_len} (the model's canvas)")
    ids = m["special_ids"]
    if ids["mask"] != cfg.mask_id or max(ids.values()) >= cfg.vocab_size:
        raise DllmError(f"{where}: special ids {ids} do not fit the model (mask {cfg.mask_id}, vocabulary {cfg.vocab_size})")
    if m["heads"]["sampling"]["k"] >= cfg.vocab_size:
        raise DllmError(f"{where}: a top-{m['heads']['sampling']['k']} head is not smaller than the vocabulary ({cfg.vocab_size})")


def write_bundle(out_dir: str | Path, build, overwrite: bool = False) -> Bundle:
    """Create a bundle atomically: `build(tmp_dir)` writes the files and returns the manifest (without
    `files`); hashes are added, then the folder is renamed into place. A failure leaves nothing behind.
    Only a bundle may be replaced (with `overwrite`), never another folder."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, MANIFEST, BUNDLE_FORMAT, "bundle")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DllmError(f"{out_dir} exists and is not empty; choose another -o or pass --overwrite")
    with output_lock(out_dir):
        return _write_bundle(out_dir, build)


def _write_bundle(out_dir: Path, build) -> Bundle:
    with atomic_folder(out_dir, replace=True) as tmp:
        manifest = build(tmp)
        (tmp / ENGINES).mkdir(exist_ok=True)
        manifest["files"] = {
            str(p.relative_to(tmp)): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.parts[len(tmp.parts)] != ENGINES and p.name != MANIFEST
        }
        write_manifest(tmp / MANIFEST, manifest)
        carried = carry_engines(out_dir / ENGINES, tmp / ENGINES, manifest)
    bundle = load_bundle(out_dir)
    bundle.engines_carried = carried
    return bundle


def carry_engines(old: Path, new: Path, manifest: dict) -> dict[str, list[str]]:
    """Engines built on the device from the bundle being replaced: those built from an ONNX file that is the same
    in the new bundle (their key still matches) are kept; the others are dropped and named."""
    kept, dropped = [], []
    if not old.is_dir():
        return {"kept": kept, "dropped": dropped}
    hashes = {manifest["files"].get(entry["file"]) for entry in manifest["precisions"].values()}
    for plan in sorted(old.glob("*.plan")):
        try:
            spec = json.loads(plan.with_suffix(".json").read_text())["spec"]
        except (OSError, ValueError, KeyError, TypeError):
            spec = {}
        if spec.get("onnx_sha256") in hashes:
            for src in (plan, plan.with_suffix(".json")):
                shutil.copy2(src, new / src.name)
            kept.append(plan.name)
        else:
            dropped.append(plan.name)
    return {"kept": kept, "dropped": dropped}


def update_manifest(bundle: Bundle, **fields) -> None:
    """Replace top-level manifest fields in place (atomically), e.g. after adding an engine report."""
    bundle.manifest.update(fields)
    write_manifest(bundle.path / MANIFEST, bundle.manifest)

"""TensorRT engines for a bundle: what an engine depends on, where it lives, and how it is built.

Engines are not portable, so they are built on the device from the bundle's ONNX and kept in the bundle's
`engines/` folder: `<precision>-b<batch>-c<canvas>-<key>.plan` with a `.json` of the same name holding
everything the key was made from (ONNX sha256, TensorRT version, device name and compute capability,
L4T release, precision, shapes, builder settings). A request whose key has no engine means "build it",
never an attempt to deserialize something built elsewhere.

Routes (TensorRT 10.x):
    fp16  model.fp16.onnx, strongly typed: the graph's own casts keep RMSNorm, softmax, residuals and
          the top-K in FP32, exactly as exported (and the only mode TensorRT 11 keeps).
    int8  model.int8.onnx (explicit Q/DQ), weakly typed with INT8 + FP16 flags and the FP32 layers the
          export lists pinned by precision constraints.
    fp32  model.fp32.onnx, no precision flags.
Everything here but `build_engine` is plain Python and tested off the device.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from jetson_dllm.bundle import Bundle, entry_key, load_bundle
from jetson_dllm.errors import DllmError
from jetson_dllm.families import check_engines
from jetson_dllm.files import atomic_write
from jetson_dllm.precisions import PRECISIONS, for_runner
from jetson_dllm.runners.graphs import COMMIT_OUTPUTS, GRAPHS, graph_signature, graph_spec, tensor_shapes

ENGINE_FORMAT = 1  # bump when what goes into an engine (settings below) changes
ALIGNMENT = 256  # TensorRT wants I/O addresses 256-byte aligned
SUPPORTED_TRT_MAJOR = 10
L4T_RELEASE = Path("/etc/nv_tegra_release")


@dataclass(frozen=True)
class Device:
    """What an engine is tied to."""

    name: str
    compute_capability: str
    trt_version: str
    l4t: str  # "36.4.3", or "" off a Jetson
    total_memory: int  # bytes (on a Jetson: the shared RAM)
    integrated: bool


@dataclass(frozen=True)
class EngineSpec:
    precision: str
    batch: int
    canvas: int  # a block-diffusion graph's: the cache length
    onnx_sha256: str
    graph: str = ""  # "" the canvas graph; a block-diffusion bundle's "block_step" or "commit"




def engine_graphs(bundle: Bundle) -> tuple[str, ...]:
    """The graphs TensorRT builds an engine of, per batch: a cached family's (block step and commit, over the whole
    cache), or "" for the canvas graph, one engine per canvas length (its keys as they were before graphs had names)."""
    return bundle.family.trt_graphs if bundle.family.cached else ("",)


def check_trt_version(version: str) -> None:
    """TensorRT 10.x only: older lacks the name-based API, 11 drops weakly typed INT8."""
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise DllmError(f"cannot read the TensorRT version {version!r}") from None
    if major < SUPPORTED_TRT_MAJOR:
        raise DllmError(f"TensorRT {version} is too old; jetson-dllm needs TensorRT 10 (JetPack 6.1 or newer)")
    if major > SUPPORTED_TRT_MAJOR:
        raise DllmError(f"TensorRT {version} is not supported yet (jetson-dllm targets TensorRT 10.x, JetPack 6.x); use the onnx backend meanwhile")


def read_l4t_release(path: Path = L4T_RELEASE) -> str:
    """L4T release from /etc/nv_tegra_release ("# R36 (release), REVISION: 4.3, ..." -> "36.4.3"); "" when absent."""
    try:
        line = Path(path).read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""
    major = re.search(r"R(\d+)", line)
    revision = re.search(r"REVISION:\s*([\d.]+)", line)
    if not major:
        return ""
    return f"{major.group(1)}.{revision.group(1)}" if revision else major.group(1)


def engine_key(spec: EngineSpec, device: Device, settings: dict) -> str:
    record = {"format": ENGINE_FORMAT, "spec": asdict(spec), "device": asdict(device), "settings": settings}
    record["device"].pop("total_memory")  # the same board with more free memory builds the same engine
    if not spec.graph:
        record["spec"].pop("graph")  # canvas engines keep the keys they had before block graphs existed
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def engine_path(bundle: Bundle, spec: EngineSpec, device: Device, settings: dict) -> Path:
    graph = f"-{spec.graph}" if spec.graph else ""
    return bundle.engines_dir / f"{spec.precision}{graph}-b{spec.batch}-c{spec.canvas}-{engine_key(spec, device, settings)}.plan"


def engine_spec(bundle: Bundle, precision: str, batch: int, canvas: int, graph: str = "") -> EngineSpec:
    if canvas not in bundle.canvas_lengths:
        raise DllmError(f"canvas {canvas} is not one of the bundle's shapes ({', '.join(map(str, bundle.canvas_lengths))})")
    if batch < 1:
        raise DllmError(f"batch must be at least 1, got {batch}")
    check_engines(bundle.config, bundle.path)
    if graph not in engine_graphs(bundle):
        raise DllmError(f"{bundle.path} has no {graph or 'canvas'} graph to build an engine of")
    bundle.onnx_path(precision, graph)  # a clear error when the bundle lacks the precision
    return EngineSpec(precision, batch, canvas, bundle.onnx_sha256(precision, graph), graph)


def input_shapes(cfg, batch: int, canvas: int, graph: str = "") -> dict[str, tuple[int, ...]]:
    """The fixed shapes of an engine's batch-dependent inputs (its optimization profile), from the graph's signature;
    a cached graph's cache is the model's whole context."""
    shapes = tensor_shapes((graph or "canvas",), cfg, 1, batch, canvas)
    return {name: shapes[name][0] for name in graph_signature(graph or "canvas", cfg, 1)[0] if shapes[name][0]}


def fp32_layers(bundle: Bundle, graph: str = "") -> list[str]:
    """The nodes an INT8 build pins to FP32: the manifest's list, or for a block-diffusion bundle, the graph's own."""
    nodes = bundle.manifest.get("fp32_nodes", [])
    return nodes.get(graph, []) if isinstance(nodes, dict) else nodes


def _engine_outputs(graph: str, cfg=None) -> tuple[str, ...]:
    spec = graph_spec(graph or "canvas", cfg) if cfg is not None else GRAPHS[graph or "canvas"]  # a family's own outputs too
    return spec.outputs + (COMMIT_OUTPUTS if spec.cache == "write" else ())


def builder_settings(precision: str, total_memory: int, fp32_layers: int = 0, optimization_level: int = 3, graph: str = "",
                     cfg=None) -> dict:
    """The builder configuration for a precision on a device with `total_memory` bytes (shared on a Jetson)."""
    if precision not in for_runner("trt"):
        raise DllmError(f"unknown precision {precision!r} for TensorRT; choose {', '.join(for_runner('trt'))}")
    if not 0 <= optimization_level <= 5:
        raise DllmError(f"--opt-level must be in 0..5, got {optimization_level}")
    gib = 1 << 30
    return {
        "strongly_typed": precision == "fp16",
        "flags": list(PRECISIONS[precision].trt_flags),
        "fp32_layers": fp32_layers if precision == "int8" else 0,
        # Workspace: an eighth of memory, within [256 MiB, 2 GiB]; the tactic DRAM pool (which on an
        # integrated GPU counts all builder memory) at half of memory, not the default 75 %.
        "workspace": int(min(2 * gib, max(gib // 4, total_memory // 8))),
        "tactic_dram": int(total_memory // 2),
        "optimization_level": optimization_level,
        "max_aux_streams": 0,  # one stream: less memory, and capturable in a CUDA graph
        "outputs": list(_engine_outputs(graph, cfg)),  # logits stay internal
    }


def build_memory_needed(onnx_bytes: int, settings: dict) -> int:
    """Rough peak of a build: the ONNX in memory, the network's weights, the plan, the workspace."""
    return 3 * onnx_bytes + settings["workspace"] + (256 << 20)


def check_build_memory(needed: int, meminfo: dict[str, int]) -> None:
    """Refuse a build that will not fit, saying what to do; swap counts only for host-side data."""
    available = meminfo.get("MemAvailable", 0)
    swap = meminfo.get("SwapFree", 0)
    if not available:
        return
    if needed > available + swap // 2:
        raise DllmError(f"building needs about {needed / 2**30:.1f} GiB but {available / 2**30:.1f} GiB is available "
                        f"(+{swap / 2**30:.1f} GiB swap): close other programs, stop the desktop "
                        "(sudo systemctl isolate multi-user.target), add swap (see jetson-setup.sh), or lower --workspace")


def io_buffers(cfg, graphs: tuple[str, ...], batch: int, k: int, canvas: int = 0) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """I/O tensors of engines of `graphs` (a canvas graph's at a canvas length; a cached family's share the cache, its
    valid length and the tokens): name -> (shape, dtype, bytes rounded up to the 256-byte alignment), from the
    graphs' one signature (runners.graph_signature)."""
    return {name: (shape, dtype, _aligned(shape, 4)) for name, (shape, dtype) in tensor_shapes(graphs, cfg, k, batch, canvas).items()}


def _aligned(shape: tuple[int, ...], itemsize: int) -> int:
    n = itemsize
    for d in shape:
        n *= d
    return -(-n // ALIGNMENT) * ALIGNMENT


def write_engine(path: Path, plan: bytes, metadata: dict) -> None:
    """Plan, then metadata, each atomically: a half-written engine never appears, and a plan without its
    metadata is treated as unknown (rebuilt)."""
    atomic_write(path, plan)
    atomic_write(path.with_suffix(".json"), json.dumps(metadata, indent=2))


def engine_status(bundle: Bundle, device: Device | None = None) -> list[dict]:
    """Every engine in the bundle with whether it fits `device` (or this machine, when it has TensorRT)."""
    if device is None:
        device = detect_device(required=False)
    rows = []
    for plan in sorted(bundle.engines_dir.glob("*.plan")):
        meta_path = plan.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            meta = None
        plain = (str, int, float, bool, type(None))
        if not (isinstance(meta, dict) and isinstance(meta.get("spec"), dict) and isinstance(meta.get("device", {}), dict)
                and all(isinstance(v, plain) for part in (meta["spec"], meta.get("device", {})) for v in part.values())):
            rows.append({"file": plan.name, "verdict": "no: metadata missing or unreadable, rebuild"})  # JSON, but not ours
            continue
        row = {"file": plan.name, **meta["spec"], **meta.get("device", {})}
        precision, graph = meta["spec"].get("precision"), meta["spec"].get("graph", "")
        entry = bundle.manifest["precisions"].get(precision) if isinstance(precision, str) else None
        key = entry_key(bundle.config, graph) if isinstance(graph, str) else None
        source = bundle.manifest["files"].get(entry.get(key)) if isinstance(entry, dict) and isinstance(key, str) else None
        if source is None or meta["spec"].get("onnx_sha256") != source:
            row["verdict"] = "no: built from another ONNX, rebuild"
        elif device is None:
            row["verdict"] = "unknown: no TensorRT GPU on this machine"
        else:
            key = engine_key(EngineSpec(**meta["spec"]), device, meta["settings"])
            row["verdict"] = "yes" if plan.name.endswith(f"-{key}.plan") else (
                f"no: built with TensorRT {meta['device'].get('trt_version')} on {meta['device'].get('name')}, rebuild")
        rows.append(row)
    return rows


def bundle_report(bundle_dir: str | Path) -> dict:
    """`dllm inspect`: what a bundle holds, the state of every hashed file, and which engines fit this device."""
    from jetson_dllm.runners.onnx_runner import check_bundle_graphs

    bundle = load_bundle(bundle_dir, verify=False)
    files = bundle.verify()
    graphs = check_bundle_graphs(bundle) if not [n for n, state in files.items() if state != "ok"] else "not checked (files altered)"
    return {"graphs": graphs,"bundle": str(bundle_dir), "model": bundle.manifest["model"], "precisions": bundle.precisions, "files": files,
            "sizes": {n: (bundle.path / n).stat().st_size if (bundle.path / n).is_file() else None for n in files},
            "engines": engine_status(bundle), "engines_dir": str(bundle.engines_dir), "canvas_lengths": bundle.canvas_lengths,
            "topk": bundle.topk, "opset": bundle.manifest.get("opset"), "version": bundle.manifest.get("version"),
            "parity": bundle.manifest.get("parity"), "block_parity": bundle.manifest.get("block_parity"),
            "decode_parity": bundle.manifest.get("decode_parity"),
            "calibration": bundle.manifest.get("calibration"),
            "bad": [n for n, state in files.items() if state != "ok"]}


def detect_device(required: bool = True) -> Device | None:
    """This machine's GPU and TensorRT, or None (required=False) / a clear error when there are none."""
    try:
        import tensorrt as trt
    except ImportError:
        if required:
            raise DllmError("TensorRT is not installed here; on a Jetson run jetson-setup.sh (JetPack 6.1+); on this machine run the bundle with onnxruntime (dllm run BUNDLE --backend onnx)") from None
        return None
    try:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(0)
    except ImportError:
        if required:
            raise DllmError("pycuda is not installed; run jetson-setup.sh (or pip install pycuda with CUDA on PATH)") from None
        return None
    except Exception as e:  # pycuda.driver.Error: no driver, no GPU
        if required:
            raise DllmError(f"no CUDA GPU is usable here ({str(e).splitlines()[0][:80]}); on this machine run the bundle with onnxruntime (dllm run BUNDLE --backend onnx)") from None
        return None
    check_trt_version(trt.__version__)
    major, minor = dev.compute_capability()
    integrated = bool(dev.get_attribute(cuda.device_attribute.INTEGRATED))
    return Device(dev.name(), f"{major}.{minor}", trt.__version__, read_l4t_release(), int(dev.total_memory()), integrated)

"""Building TensorRT engines on the device: `dllm build`, and the build a runner asks for when an engine is missing.

What an engine depends on, where it lives and the builder settings are in jetson_dllm.engine (plain Python, tested
off the device); this module is the part that needs TensorRT.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path

from jetson_dllm.bundle import Bundle, load_bundle
from jetson_dllm.engine import (
    ENGINE_FORMAT,
    Device,
    EngineSpec,
    build_memory_needed,
    builder_settings,
    check_build_memory,
    detect_device,
    engine_graphs,
    engine_path,
    engine_spec,
    fp32_layers,
    input_shapes,
    write_engine,
)
from jetson_dllm.errors import DllmError
from jetson_dllm.profiler import read_meminfo


def build_engines(bundle_dir: str | Path, precision: str = "fp16", canvases: list[int] = (128,), batches: list[int] = (1,),
                  opt_level: int = 3, progress=None) -> list[dict]:
    """`dllm build`: an engine per (batch, canvas) for this device, each built only if missing.

    Every shape is validated before any build. Returns per engine {path, built, device, trt_version}."""
    bundle = load_bundle(bundle_dir)
    device = detect_device()
    graphs = engine_graphs(bundle)
    if bundle.family.cached:  # an engine per graph and batch, over the whole cache
        shapes = [(b, bundle.config.canvas_len, g) for b in batches for g in graphs]
    else:
        shapes = [(b, c, g) for b in batches for c in canvases for g in graphs]
    planned = [(engine_spec(bundle, precision, b, c, g), _settings(bundle, precision, device, g, opt_level)) for b, c, g in shapes]
    done = []
    for spec, settings in planned:
        path = engine_path(bundle, spec, device, settings)
        built = not path.is_file()
        if built:
            path = build_engine(bundle, spec, device, settings, progress=progress)
        done.append({"path": path, "built": built, "device": device.name, "trt_version": device.trt_version})
    return done


def _settings(bundle: Bundle, precision: str, device: Device, graph: str, opt_level: int = 3) -> dict:
    return builder_settings(precision, device.total_memory, len(fp32_layers(bundle, graph)), opt_level, graph, bundle.config)


def find_or_build(bundle: Bundle, precision: str, batch: int, canvas: int, build: bool = True, progress=None, graph: str = "") -> Path:
    """The engine for (precision, batch, canvas[, block graph]) on this device, built when missing and `build` is set."""
    device = detect_device()
    spec = engine_spec(bundle, precision, batch, canvas, graph)
    settings = _settings(bundle, precision, device, graph)
    path = engine_path(bundle, spec, device, settings)
    if path.is_file() and path.with_suffix(".json").is_file():
        return path
    if not build:
        shape = "" if graph else f" --canvas {canvas}"
        raise DllmError(f"no {precision} {graph or 'canvas'} engine for batch {batch} on this device; "
                        f"build it: dllm build {bundle.path} --precision {precision} --batch {batch}{shape}")
    return build_engine(bundle, spec, device, settings, progress=progress)


def build_engine(bundle: Bundle, spec: EngineSpec, device: Device, settings: dict, progress=None) -> Path:
    """Parse the ONNX and build a serialized engine with TensorRT; returns the plan's path."""
    import tensorrt as trt

    onnx_path = bundle.onnx_path(spec.precision, spec.graph)
    bundle.check([onnx_path.name])
    check_build_memory(build_memory_needed(onnx_path.stat().st_size, settings), read_meminfo())
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings["strongly_typed"] else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise DllmError(f"TensorRT could not parse {onnx_path.name}: {'; '.join(errors)[:300]}")
    for i in reversed(range(network.num_outputs)):  # run the sampling head only: logits stay on the GPU
        tensor = network.get_output(i)
        if tensor.name not in settings["outputs"]:
            network.unmark_output(tensor)
    if spec.precision == "int8":
        keep = set(fp32_layers(bundle, spec.graph))
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.name in keep:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace"])
    if device.integrated:
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_DRAM, settings["tactic_dram"])
    for flag in settings["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.builder_optimization_level = settings["optimization_level"]
    config.max_aux_streams = settings["max_aux_streams"]
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, shape in input_shapes(bundle.config, spec.batch, spec.canvas, spec.graph).items():
        profile.set_shape(name, shape, shape, shape)  # fixed shapes: one engine per (batch, canvas)
    config.add_optimization_profile(profile)
    cache_path = bundle.engines_dir / f"timing-{device.name.replace(' ', '_')}-trt{device.trt_version}.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if progress is not None:
        config.progress_monitor = _monitor(trt, progress)
    t0 = time.time()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DllmError(f"TensorRT failed to build the {spec.precision} engine (see the messages above); "
                        "try --precision fp16, a smaller --canvas, or more memory")
    bundle.engines_dir.mkdir(exist_ok=True)
    with open(cache_path, "wb") as f:
        f.write(memoryview(config.get_timing_cache().serialize()))
    path = engine_path(bundle, spec, device, settings)
    metadata = {"format": ENGINE_FORMAT, "spec": asdict(spec), "device": asdict(device), "settings": settings,
                "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "build_seconds": round(time.time() - t0, 1),
                "host": platform.node()}
    write_engine(path, plan, metadata)
    return path


def _monitor(trt, progress):
    """A TensorRT progress monitor forwarding (phase, step, steps) to a callback."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.phases = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.phases[phase_name] = num_steps
            progress(phase_name, 0, num_steps)

        def step_complete(self, phase_name, step):
            progress(phase_name, step + 1, self.phases.get(phase_name, 0))
            return True  # keep building

        def phase_finish(self, phase_name):
            progress(phase_name, self.phases.get(phase_name, 0), self.phases.get(phase_name, 0))

    return Monitor()

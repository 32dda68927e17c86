"""The onnxruntime runner: a bundle's (or a bare) ONNX model with the CPU, CUDA or TensorRT execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jetson_dllm.bundle import load_bundle
from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.runners.feeds import call_slots, canvas_inputs, encoder_inputs, valid_length
from jetson_dllm.runners.graphs import ENTROPY, GRAPHS, OPTIONAL_OUTPUTS, graph_signature, graph_width, signature_at
from jetson_dllm.runners.onnx_cache import CacheBuffers, valid_rank
from jetson_dllm.runners.protocol import RunnerBase, check_graph
from jetson_dllm.threads import resolve as resolve_threads
from jetson_dllm.threads import spinning
from jetson_dllm.tokenizer import TextTokenizer

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(spec: str, available: list[str], cache_dir: str, fp16: bool) -> list:
    """Provider list for onnxruntime from "cpu", "cuda", "trt" or full names, comma-separated."""
    names = [PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in (spec or "cpu").split(",") if p.strip()]
    missing = [n for n in names if n not in available]
    if missing:
        raise DllmError(f"onnxruntime here has no {', '.join(missing)} (it has {', '.join(available)}); "
                        "install onnxruntime-gpu (see jetson-setup.sh) or use --providers cpu")
    providers: list = []
    for n in names:
        if n == "TensorrtExecutionProvider":
            providers.append((n, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache_dir,
                                  "trt_timing_cache_enable": True, "trt_fp16_enable": fp16}))
        else:
            providers.append(n)
    if "CPUExecutionProvider" not in names:
        providers.append("CPUExecutionProvider")  # for any node the accelerator does not take
    return providers


def session_from_onnx(path: str | Path, providers: list | None = None, threads: int = 0):
    """An onnxruntime session over an ONNX (or .ort) file, opened from the path; a clear error if it cannot load.

    Opened from the path, not from bytes in Python: a proto edited and serialized here leaves a dead copy or
    two of the weights in the heap (measured: xlarge FP32 1,091 MB of RSS that way against 531 MB from the
    path), and on a Jetson every copy comes out of the same 8 GB."""
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = resolve_threads(threads)
    # idle workers sleep unless the user asked OpenMP to spin (jetson_dllm.threads: spinning collapses on a busy machine)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning() else "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph types
        raise DllmError(f"onnxruntime could not load {path}: {str(e).splitlines()[0][:160]}") from None


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise DllmError("the onnx backend needs onnxruntime: pip install 'jetson-dllm[export]' (or onnxruntime-gpu)") from None
    return ort


ORT_TYPES = {"tensor(int32)": "int32", "tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}


def check_signature(graph: str, session, cfg: ModelConfig, topk: int, where: str) -> None:
    """Refuse a graph whose inputs or outputs (names, dtypes, static dims) are not what the manifest's model config
    and top-K say it is: the manifest and its graphs must agree before anything runs."""
    want_in, want_out = graph_signature(graph, cfg, topk)
    have_in = {i.name: (ORT_TYPES.get(i.type, i.type), i.shape) for i in session.get_inputs()}
    have_out = {o.name: (ORT_TYPES.get(o.type, o.type), o.shape) for o in session.get_outputs()}
    if set(have_in) != set(want_in):
        raise DllmError(f"{where}: the {graph} graph takes {sorted(have_in)}, but a {cfg.family} model's takes {sorted(want_in)}; re-export the bundle")
    missing = sorted(set(want_out) - set(have_out) - set(OPTIONAL_OUTPUTS))
    if missing:
        raise DllmError(f"{where}: the {graph} graph has no output {missing[0]}; re-export the bundle")
    for name, (dtype, dims) in {**want_in, **{n: d for n, d in want_out.items() if n in have_out}}.items():
        got_type, got_dims = have_in[name] if name in have_in else have_out[name]
        if name == "valid_len" and got_type == dtype and not got_dims:
            continue  # exported before per-row valid lengths: one for every row (runs, but rows must agree)
        bad = got_type != dtype or len(got_dims) != len(dims) or any(
            isinstance(g, int) and isinstance(w, int) and g != w for g, w in zip(got_dims, dims))
        if bad:
            raise DllmError(f"{where}: the {graph} graph's {name} is {got_type} {list(got_dims)}, but the manifest's model "
                            f"({cfg.n_layer} layers, {cfg.n_kv_head} key/value heads, canvas {cfg.canvas_len}, top-{topk}) needs {dtype} "
                            f"{list(dims)}; re-export the bundle")


def check_bundle_graphs(bundle) -> str | None:
    """Every graph of every precision against the manifest (`dllm inspect` checks what `dllm run` would): the first
    disagreement, or None; "" when onnxruntime is not here to open them."""
    try:
        _ort()
    except DllmError:
        return ""
    for precision in bundle.precisions:
        for graph, path in bundle.graph_paths(precision).items():
            try:
                check_signature(graph, session_from_onnx(path, threads=1), bundle.config, bundle.topk, str(path))
            except DllmError as e:
                return str(e)
    return None


class OnnxRunner(RunnerBase):
    """onnxruntime sessions, one per graph of the bundle, behind the runner interface.

    For sampling, only the top-K outputs are bound, so the vocabulary-sized logits never leave the session;
    inputs and outputs are bound (I/O binding) to buffers allocated once per shape, so a call allocates nothing on
    the Python side. Cached graphs share one cache per batch size (onnx_cache.CacheBuffers). Returned arrays are
    those buffers: they stay valid until the next call (copy them to keep them longer)."""

    def __init__(self, sessions: dict, cfg: ModelConfig, precision: str = "fp32", tokenizer: TextTokenizer | None = None,
                 canvas_lengths: list[int] | None = None, weight_bytes: int = 0):
        self.sessions, self.cfg, self.precision, self.tokenizer = sessions, cfg, precision, tokenizer
        self.graphs = tuple(sessions)
        self.canvas_lengths = canvas_lengths or cfg.canvas_buckets()
        self.weight_bytes = weight_bytes
        first = next(iter(sessions.values()))
        outputs = {o.name: o.shape for o in first.get_outputs()}
        if "topk_ids" not in outputs or not isinstance(outputs["topk_ids"][-1], int):
            raise DllmError("the ONNX graph has no static top-K head (topk_logprobs / topk_ids); export it with dllm export")
        self.topk = int(outputs["topk_ids"][-1])
        self.name = f"onnx-{first.get_providers()[0].replace('ExecutionProvider', '').lower()}"
        # The optional entropy output, where a graph has it (exported since it came): returned with the top-K.
        self.extra = {g: (ENTROPY,) if ENTROPY in {o.name for o in s.get_outputs()} else () for g, s in sessions.items()}
        self._bound: dict[tuple[int, int], tuple] = {}
        self.cache: dict[int, CacheBuffers] = {}  # batch -> the cache and its bindings, allocated once
        # Graphs exported before per-row valid lengths take one for every row: rows in a call must agree.
        self.legacy_positions = any(GRAPHS[g].cache and not valid_rank(s) for g, s in sessions.items())
        self.pool: CacheBuffers | None = None  # open_slots: the server's rows, one request per slot
        self.scratch: dict[int, CacheBuffers] = {}

    def _binding(self, shape: tuple[int, int]):
        """Input and output buffers for a canvas shape, bound once and reused by every later step."""
        if shape not in self._bound:
            if len(self._bound) > 8:  # many shapes (a sweep): keep memory bounded
                self._bound.clear()
            B, T = shape
            inputs, outputs = signature_at("canvas", self.cfg, self.topk, B, T)
            has = {o.name for o in self.sessions["canvas"].get_outputs()}  # the entropy where the graph has it
            ins = {name: np.zeros(*shape) for name, shape in inputs.items()}
            outs = {name: np.zeros(*shape) for name, shape in outputs.items() if name in has and name != "logits"}
            binding = self.sessions["canvas"].io_binding()
            for name, arr in ins.items():
                binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            for name, arr in outs.items():
                binding.bind_output(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            self._bound[shape] = (binding, ins, outs)
        return self._bound[shape]

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        spec = check_graph(self, graph)
        outputs = outputs or spec.outputs + (self.extra[graph] if spec.outputs else ())
        if spec.cache:
            return self._run_cached(graph, feeds, outputs)
        if graph == "encoder":  # a conditional model's condition, once per request: no buffers to keep
            return dict(zip(outputs, self.sessions[graph].run(list(outputs), encoder_inputs(feeds, self.cfg))))
        inputs = canvas_inputs(feeds, self.canvas_lengths, self.cfg)
        if "logits" in outputs:
            return dict(zip(outputs, self.sessions[graph].run(list(outputs), inputs)))
        binding, bufs, outs = self._binding(inputs["tokens"].shape)
        for name, value in inputs.items():
            np.copyto(bufs[name], value)
        self.sessions[graph].run_with_iobinding(binding)
        return {name: outs[name] for name in outputs}

    def _run_cached(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        tokens = feeds.get("tokens")
        width = graph_width(graph, self.cfg)
        if tokens is None or np.ndim(tokens) != 2 or (tokens.shape[1] != width if isinstance(width, int) else not 0 < tokens.shape[1] <= self.cfg.canvas_len):
            shape = width if isinstance(width, int) else f"1..{self.cfg.canvas_len}"
            raise DllmError(f"the {graph} graph takes tokens shaped (batch, {shape})")
        batch = tokens.shape[0]
        valid = valid_length(feeds, batch, self.cfg.canvas_len - tokens.shape[1] + 1)
        slots = call_slots(feeds, batch, self.pool.batch if self.pool else 0)
        if slots is None:  # the call's rows are a cache of their own
            into = buffers = self._cache(batch)
            slots = np.arange(batch)
        elif batch == self.pool.batch and (slots == np.arange(batch)).all():  # every row of the pool, in order
            into = buffers = self.pool
        else:  # some rows of the pool: their caches copied to buffers of the call's size, the new keys written back
            into, buffers = self.pool, self._scratch(batch)
            buffers.gather(self.pool, slots, int(valid.max()))
        io = buffers.load(graph, feeds, valid)
        self.sessions[graph].run_with_iobinding(io.binding)
        if GRAPHS[graph].cache == "write":
            buffers.write_new(io, into, slots, valid)
        return {name: io.out[name] for name in outputs}

    def _buffers(self, batch: int) -> CacheBuffers:
        return CacheBuffers({g: s for g, s in self.sessions.items() if GRAPHS[g].cache}, self.cfg, batch, self.topk, self.legacy_positions)

    def _cache(self, batch: int) -> CacheBuffers:
        if batch not in self.cache:  # one batch size at a time: a new one replaces the old cache
            self.cache = {batch: self._buffers(batch)}
        return self.cache[batch]

    def _scratch(self, batch: int) -> CacheBuffers:
        """Buffers for a call on `batch` rows of the pool: the last few sizes kept (a server's calls vary in size)."""
        if batch not in self.scratch:
            if len(self.scratch) >= 4:
                self.scratch.pop(next(iter(self.scratch)))
            self.scratch[batch] = self._buffers(batch)
        return self.scratch[batch]

    def open_slots(self, rows: int) -> int:
        if not any(GRAPHS[g].cache for g in self.sessions):
            return 0  # a canvas model keeps no cache
        self.pool, self.scratch = self._buffers(rows), {}
        return self.pool.nbytes

    def cache_arrays(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The cache's keys and values for a batch size, as the runner holds them (INT8 calibration records the
        cached graphs' raw inputs from them)."""
        buffers = self._cache(batch)
        return buffers.k, buffers.v

    def memory(self) -> dict[str, int]:
        held = [*self.cache.values(), *([self.pool] if self.pool else []), *self.scratch.values()]
        return {"weights": self.weight_bytes, "cache": sum(b.nbytes for b in held)}

    def close(self) -> None:
        self._bound.clear()
        self.cache.clear()
        self.scratch.clear()
        self.pool = None
        self.sessions = {}


def onnx_runner_from_graphs(paths: dict[str, Path], cfg: ModelConfig, precision: str = "fp32", threads: int = 0,
                            tokenizer: TextTokenizer | None = None) -> OnnxRunner:
    """Bare ONNX files of a cached family's graphs (graph -> path, the first with the top-K head) on the CPU: what
    export parity and calibration run, the same runner a bundle gets."""
    sessions = {graph: session_from_onnx(path, threads=threads) for graph, path in paths.items()}
    return OnnxRunner(sessions, cfg, precision, tokenizer, weight_bytes=sum(Path(p).stat().st_size for p in paths.values()))


def onnx_runner_from_file(path: str | Path, cfg: ModelConfig, precision: str = "fp32", threads: int = 0,
                          tokenizer: TextTokenizer | None = None, graph: str = "canvas") -> OnnxRunner:
    """A bare ONNX file (no bundle around it) on the CPU: what export parity and the INT8 search run."""
    return onnx_runner_from_graphs({graph: Path(path)}, cfg, precision, threads, tokenizer)


def onnx_runner_from_bundle(bundle_path: str, precision: str = "fp32", providers: str = "cpu", threads: int = 0,
                            verify_files: bool = True) -> OnnxRunner:
    """A bundle's graphs of `precision` (those of its family it carries), each file checked against the manifest's
    hash first."""
    ort = _ort()
    bundle = load_bundle(bundle_path, verify=verify_files)
    tokenizer = bundle.tokenizer()
    paths = bundle.graph_paths(precision)  # every file was checked against its hash by load_bundle
    cache = bundle.engines_dir / "ort-trt"
    resolved = resolve_providers(providers, ort.get_available_providers(), str(cache), fp16=precision != "fp32")
    if any(isinstance(p, tuple) for p in resolved):
        cache.mkdir(parents=True, exist_ok=True)
    sessions = {graph: session_from_onnx(path, resolved, threads) for graph, path in paths.items()}
    for graph, session in sessions.items():
        check_signature(graph, session, bundle.config, bundle.topk, str(paths[graph]))
    runner = OnnxRunner(sessions, bundle.config, precision, tokenizer, bundle.canvas_lengths, sum(p.stat().st_size for p in paths.values()))
    if runner.topk != bundle.topk:
        raise DllmError(f"{paths[runner.graphs[0]].name} has a top-{runner.topk} head but the manifest says {bundle.topk}; re-export the bundle")
    runner.bundle = bundle
    runner.metrics = bundle.manifest.get("source", {}).get("metrics", {})  # the checkpoint's, at export
    return runner

"""Every table the `dllm` command prints (rich): one place for what a person reads and compares."""

from __future__ import annotations

from rich.table import Table

from jetson_dllm.bench_report import headline
from jetson_dllm.config import SIZES, ModelConfig
from jetson_dllm.families import engine_graphs_of, family_of
from jetson_dllm.precisions import WEIGHT_PRECISIONS
from jetson_dllm.profiler import ORIN_NANO_SYSTEM, ORIN_NANO_VISIBLE


def _table(title: str, columns, left: tuple[str, ...] = ()) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def configs_table(vocab_size: int, canvas_len: int) -> Table:
    """Model sizes tiny -> xxlarge: parameters and weight size per precision."""
    table = _table(f"model configs (vocabulary {vocab_size:,}, tied embedding)",
                   ("config", "d_model", "heads", "layers", "d_ff", "params", "non-embedding", *WEIGHT_PRECISIONS), left=("config",))
    for name in SIZES:
        cfg = ModelConfig.from_name(name, vocab_size=vocab_size, canvas_len=canvas_len)
        table.add_row(name, str(cfg.d_model), str(cfg.n_head), str(cfg.n_layer), str(cfg.d_ff),
                      f"{cfg.num_params() / 1e6:.2f} M", f"{cfg.num_params(include_embedding=False) / 1e6:.2f} M",
                      *(f"{cfg.weight_bytes(p) / 2**20:,.1f} MiB" for p in WEIGHT_PRECISIONS))
    return table


EVAL_LABELS = {"judge_val_nll": "judge's exact NLL on the same validation text", "gen_ppl": "generative perplexity (judge)",
               "repetition": "repetition (repeated word 4-grams)", "distinct1": "distinct-1", "distinct2": "distinct-2",
               "gen_ms": "generation time per batch of 8 (ms)"}


def eval_table(metrics: dict) -> Table:
    """`dllm eval`: NLL (a bound for diffusion, exact for AR), perplexity, accuracy, and the judged samples."""
    table = _table(f"{metrics['checkpoint']} on {metrics['scored']} ({metrics['val_tokens']:,} tokens)", ("metric", "value"), left=("metric",))
    if metrics["nll_kind"] == "exact":
        rows = [("NLL (nats/token, exact)", "val_nll", 4), ("perplexity", "val_ppl", 2), ("next-token accuracy", "val_acc", 4)]
    elif not metrics["nll_kind"] and "val_acc_hidden" in metrics:  # SDD: accuracy that copying inflates, beside two honest ones
        rows = [("denoising loss (nats/token; not an NLL: SDD has no bound)", "val_loss", 4),
                ("accuracy (inflated: the input ranks the truth first below t = 1)", "val_acc", 4),
                ("accuracy with the truth left out of the candidates", "val_acc_hidden", 4), ("accuracy at t = 1 (as sampling starts)", "val_acc_t1", 4)]
    elif not metrics["nll_kind"]:  # continuous diffusion: no likelihood here either
        rows = [("denoising loss (nats/token; not an NLL: no bound is computed)", "val_loss", 4),
                ("top-1 accuracy (stratified noise levels)", "val_acc", 4), ("accuracy at t = 1 (as sampling starts)", "val_acc_t1", 4)]
    else:
        rows = [("NLL bound (nats/token)", "val_nll", 4), ("perplexity bound", "val_ppl", 2),
                ("masked-token accuracy (ELBO noise levels)", "val_acc", 4)]
    for label, key, digits in rows:
        table.add_row(label, f"{metrics[key]:.{digits}f}")
    for key in sorted(k for k in metrics if k.startswith("val_acc@")):
        table.add_row(f"masked-token accuracy at mask ratio {key.split('@')[1]}", f"{metrics[key]:.4f}")
    for key, label in EVAL_LABELS.items():
        if key in metrics:
            table.add_row(label, f"{metrics[key]:.4f}" if key != "gen_ms" else f"{metrics[key]:.0f}")
    return table


def parity_table(manifest: dict) -> Table:
    """The export's parity with PyTorch, per precision and mask ratio (for block diffusion: its block graphs)."""
    for key, title in (("block_parity", "block graphs against the torch runner (a canvas of random blocks, half masked)"),
                       ("decode_parity", "AR graphs against the torch runner (random text over each one's cache; verify against decode: "
                                         "the same text in one pass and in passes of one)")):
        if "parity" not in manifest and key in manifest:  # the cached families' graphs: top-K heads only
            table = _table(title, ("graph (precision)", "calls", "max |log-prob diff| (top-K)", "top-1 agreement"))
            for precision, row in manifest[key].items():
                for graph, g in row.get("by_graph", {"all": row}).items():
                    calls = g.get("calls", g.get("blocks", g.get("tokens", 0)))  # older bundles counted blocks or tokens
                    table.add_row(f"{graph} ({precision})", str(calls), f"{g['max_abs_logprob_diff']:.2e}", f"{g['top1_agreement']:.4f}")
                if "verify_vs_decode" in row:
                    g = row["verify_vs_decode"]
                    table.add_row(f"verify vs decode ({precision})", str(g["positions"]), f"{g['max_abs_logprob_diff']:.2e}", f"{g['top1_agreement']:.4f}")
            return table
    parity = manifest["parity"]
    table = _table(f"parity with PyTorch on {parity['source']} (masked positions; CE: their cross-entropy, nats)",
                   ("precision", "mask ratio", "max |logit diff|", "top-1 agreement", "CE torch", "CE onnx", "masked acc"))
    for precision in manifest["precisions"]:
        for ratio, row in parity[precision]["by_mask_ratio"].items():
            table.add_row(precision, ratio, f"{row['max_abs_logit_diff']:.2e}", f"{row['top1_agreement']:.4f}",
                          f"{row['nll_ref']:.4f}", f"{row['nll']:.4f}", f"{row['accuracy']:.4f}")
    return table


def calibration_table(calibration: dict) -> Table:
    """The INT8 report: per noise level, accuracy and cross-entropy (CE: of the scored tokens under the head, nats; not
    a family's NLL, which SDD and continuous diffusion do not have) of FP32 / FP16 / INT8."""
    levels = calibration["report"]
    title = (f"INT8 ({calibration['method']}, {calibration['quantized']} of {calibration['quantizable']} matmuls, "
             f"{len(calibration['excluded'])} kept in FP32) on {calibration['eval_canvases']} held-out canvases: "
             f"accuracy drop {calibration['accuracy_drop_points']:.2f} points, budget {calibration['budget_points']:g}"
             + ("" if calibration["within_budget"] else "  [red]OVER BUDGET[/]"))
    table = _table(title, ("mask ratio", "acc fp32", "acc fp16", "acc int8", "int8 - fp32", "CE fp32", "CE fp16", "CE int8",
                           "top-1 agree int8/fp32"))
    def nll(row, key):  # the block graphs' report has top-K heads only: no cross-entropy
        return f"{row[key]:.4f}" if row and key in row else "-"

    for label in levels["int8"]:
        f32, f16, i8 = levels["int8"][label], levels.get("fp16", {}).get(label), levels["int8"][label]
        table.add_row(label, f"{f32['accuracy_ref']:.4f}", f"{f16['accuracy']:.4f}" if f16 else "-", f"{i8['accuracy']:.4f}",
                      f"{100 * (i8['accuracy'] - f32['accuracy_ref']):+.2f} pt", nll(f32, "nll_ref"), nll(f16, "nll"), nll(i8, "nll"),
                      f"{i8['top1_agreement']:.4f}")
    return table


def bundle_tables(report: dict) -> list:
    """`dllm inspect`: a headline, the files and their hashes, parity, calibration, the engines."""
    m, cfg = report, ModelConfig.from_dict(report["model"])
    embedding = cfg.num_params() - cfg.num_params(include_embedding=False)
    head = (f"[bold]{m['bundle']}[/]: {cfg.name} {family_of(cfg).title}{family_of(cfg).describe(cfg)} model, {cfg.num_params() / 1e6:.2f} M parameters "
            f"({embedding / 1e6:.2f} M of them the embedding of its vocabulary of {cfg.vocab_size:,}: a size's count moves with the "
            f"vocabulary), "
            f"canvas up to {cfg.canvas_len} (shapes {', '.join(map(str, m['canvas_lengths']))}), sampling head K={m['topk']}, "
            f"opset {m['opset']}, format v{m['version']}")
    files = _table("files", ("file", "bytes", "sha256"), left=("file", "bytes", "sha256"))
    for name, state in m["files"].items():
        size = m["sizes"][name]
        files.add_row(name, f"{size:,}" if size is not None else "-", "[green]ok[/]" if state == "ok" else f"[red]{state}[/]")
    out = [head, files]
    if m["parity"]:
        out.append(parity_table({"parity": m["parity"], "precisions": [p for p in m["precisions"] if p in m["parity"]]}))
    elif m.get("block_parity") or m.get("decode_parity"):
        out.append(parity_table({k: m[k] for k in ("block_parity", "decode_parity") if m.get(k)}))
    if m["calibration"]:
        out.append(calibration_table(m["calibration"]))
    engines = _table(f"engines in {m['engines_dir']}", ("engine", "precision", "batch x canvas", "built with", "fits this device"),
                     left=("engine", "precision", "batch x canvas", "built with", "fits this device"))
    for e in m["engines"]:
        engines.add_row(e["file"], e.get("precision", "?"), f"{e.get('batch', '?')} x {e.get('canvas', '?')}",
                        f"TensorRT {e.get('trt_version', '?')} on {e.get('name', '?')}", e["verdict"])
    out.append(engines if m["engines"] else "no engines yet: build them on the Jetson with `dllm build`")
    return out


def bench_tables(results: list, env: dict, repeats: int, judge: str | None) -> list[Table]:
    """`dllm bench`: latency vs steps (and quality vs steps when measured)."""
    header, rows = headline(results)
    latency = _table(f"latency vs steps (whole generation, median of {repeats}) on {env['cpu']}" + (f", {env['gpu']}" if env["gpu"] else ""),
                     header, left=("model", "backend", "precision", "strategy"))
    for row in rows:
        latency.add_row(*row)
    if all(r.repetition is None for r in results):
        return [latency]
    quality = _table("quality vs steps" + (f" (judge: {judge})" if judge else ""),
                     ("model", "backend", "precision", "strategy", "steps", "evaluations", "generation ms", "gen. perplexity", "repetition", "distinct-2"),
                     left=("model", "backend", "precision", "strategy"))
    for r in results:
        quality.add_row(r.model, r.backend, r.precision, r.strategy, str(r.steps), f"{r.evaluations:.0f}", f"{r.generation_ms:,.0f}",
                        "-" if r.gen_ppl is None else f"{r.gen_ppl:.1f}", f"{r.repetition:.3f}", f"{r.distinct2:.3f}")
    return [latency, quality]


def bench_summary(results: list, repeats: int, seconds: float, paths: dict) -> str:
    worst = max(results, key=lambda r: r.generation_ms_spread)
    spread = (f"largest spread between repeats {100 * worst.generation_ms_spread:.1f}% ({worst.model} {worst.backend} "
              f"{worst.precision}, {worst.steps} steps)" if repeats > 1 else "one repeat per point, so no spread measured")
    return f"{len(results)} points in {seconds:.0f}s; {spread}; wrote {', '.join(str(p) for p in paths.values())}"


def profile_table(rows: list[dict], batch: int, canvas: int) -> Table:
    """`dllm profile`: where memory goes (MiB) and the Orin Nano 8GB verdict."""
    measured = any("host_rss_measured" in r for r in rows)
    cached = any(r.get("kv_cache") for r in rows)  # block diffusion
    cols = ["config", "precision", "weights", "activations", *(["kv cache"] if cached else []), "runtime", "run total", "fits?",
            "headroom", "build peak", "builds?"]
    if measured:
        cols.insert(7 if cached else 6, "host RSS here (onnx)")
    usable = (ORIN_NANO_VISIBLE - ORIN_NANO_SYSTEM) >> 20
    table = _table(f"memory for batch {batch} x canvas {canvas} (MiB) and the Orin Nano 8GB verdict "
                   f"(usable ~{usable:,} MiB: {ORIN_NANO_VISIBLE >> 20} visible - {ORIN_NANO_SYSTEM >> 20} for a headless JetPack 6)",
                   cols, left=("config", "precision"))
    mib = lambda v: f"{v / 2**20:,.0f}"  # noqa: E731
    for r in rows:
        cells = [r["config"], r["precision"], mib(r["weights"]), mib(r["activations"]), *([mib(r["kv_cache"])] if cached else []),
                 mib(r["runtime"]), mib(r["run_total"]),
                 "[green]yes[/]" if r["fits"] else "[red]no[/]", mib(r["headroom"]), mib(r["build_total"]),
                 "-" if r["builds"] is None else "[green]yes[/]" if r["builds"] else "[red]no: add swap[/]"]
        if measured:
            cells.insert(7 if cached else 6, mib(r["host_rss_measured"]))
        table.add_row(*cells)
    return table


def export_summary(bundle, out_dir) -> str:
    """What `dllm export` wrote, and which engines of a replaced bundle were kept or dropped."""
    carried = "".join(f"; {k} {len(v)} engine(s) of the old bundle{': ' + ', '.join(v) if k == 'dropped' else ''}"
                      for k, v in bundle.engines_carried.items() if v)
    graphs = f"{', '.join(bundle.precisions)} {', '.join(bundle.graph_paths('fp32'))} graph(s)"
    where = (f"copy it to the Jetson and build: dllm build {out_dir} --precision fp16" if engine_graphs_of(bundle.config) else
             "TensorRT engines for it are not built yet")
    return f"wrote {out_dir} ({graphs}){carried}; run it here: dllm run {out_dir}; {where}"

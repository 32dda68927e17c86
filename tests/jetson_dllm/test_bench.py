import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FIXTURES

from jetson_dllm import bench, bench_report
from jetson_dllm.bundle import load_bundle
from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.profiler import PeakRSS, memory_plan, orin_nano_verdict, parse_tegrastats, read_meminfo, time_peak_rss


def fake_results():
    rows = []
    for model, gen in (("tiny", 10.0), ("small", 30.0)):
        for steps in (8, 16):
            rows.append(bench.Result(model=model, backend="onnx", precision="fp32", batch=1, canvas=128, steps=steps,
                                     strategy="confidence", evaluations=steps, step_ms_median=gen / 8, step_ms_p90=gen / 7,
                                     generation_ms=gen * steps / 8, generation_ms_spread=0.02, tokens_per_s=1000.0,
                                     sampler_share=0.03, peak_rss_mb=300.0, weights_mb=20.0, repeats=3))
    return rows


def test_writers_produce_csv_json_markdown_and_a_plot(tmp_path):
    results = fake_results()
    env = {"cpu": "Test CPU", "cores_physical": 2, "gpu": None, "date": "2026-11-23 12:00"}
    paths = bench_report.write_outputs(results, env, tmp_path)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 4 and rows[0]["model"] == "tiny" and float(rows[3]["generation_ms"]) == 60.0
    data = json.loads(paths["json"].read_text())
    assert data["environment"]["cpu"] == "Test CPU" and len(data["results"]) == 4
    md = paths["md"].read_text()
    assert "| tiny | onnx | fp32 | confidence | 1 x 128 | 1.2 | 1.00x | 10 ms | 20 ms |" in md  # the strategy column: eb and
    assert "| small | onnx | fp32 | confidence | 1 x 128 | 3.8 | 1.00x | 30 ms | 60 ms |" in md  # confidence rows differ
    assert paths["png"].stat().st_size > 5000
    header, table = bench_report.headline(results)
    assert header[-2:] == ["8 steps", "16 steps"] and len(table) == 2
    # speedup: against the first backend/precision of the same model and shape in the run
    slow_torch = [dataclasses.replace(r, backend="torch", step_ms_median=r.step_ms_median * 2) for r in results if r.model == "tiny"]
    _, table = bench_report.headline(slow_torch + results)
    assert [(row[0], row[1], row[6]) for row in table] == [("tiny", "torch", "1.00x"), ("tiny", "onnx", "2.00x"), ("small", "onnx", "1.00x")]


def test_environment_record():
    env = bench_report.environment()
    for key in ("cpu", "cores_physical", "cores_logical", "memory_gb", "python", "versions", "power_mode", "clocks_pinned", "l4t", "gpu"):
        assert key in env
    assert env["versions"]["numpy"] and env["versions"]["onnxruntime"] and env["cores_logical"] >= 1
    on_jetson = Path("/etc/nv_tegra_release").is_file()
    assert (env["l4t"] is not None) == on_jetson  # the L4T release is recorded exactly when this is a Jetson


def test_clocks_pinned(tmp_path):
    (tmp_path / "scaling_min_freq").write_text("1510400\n")
    (tmp_path / "scaling_max_freq").write_text("1510400\n")
    assert bench_report.clocks_pinned(str(tmp_path)) is True
    (tmp_path / "scaling_min_freq").write_text("729600\n")
    assert bench_report.clocks_pinned(str(tmp_path)) is False
    assert bench_report.clocks_pinned(str(tmp_path / "nope")) is None


def test_tegrastats_lines():
    lines = (FIXTURES / "jetson" / "tegrastats_orin_nano.txt").read_text().splitlines()
    idle, busy = parse_tegrastats(lines[0]), parse_tegrastats(lines[1])
    assert idle["ram_used_mb"] == 3645 and idle["ram_total_mb"] == 7620 and idle["swap_used_mb"] == 236
    assert idle["gpu_load"] == 0 and busy["gpu_load"] == 97
    assert idle["rails"] == {"VDD_IN": (2957, 2957), "VDD_CPU_GPU_CV": (486, 486), "VDD_SOC": (1012, 1012)}
    assert busy["power_mw"] == 7484  # VDD_IN is the module's total
    assert parse_tegrastats("RAM 100/200MB CPU [off] GR3D_FREQ 5%@[306] POM_5V_IN 1000mW/900mW POM_5V_GPU 200mW/100mW")["power_mw"] == 1200


def test_meminfo_and_the_orin_nano_verdict():
    info = read_meminfo(str(FIXTURES / "jetson" / "meminfo_orin_nano"))
    assert info["MemTotal"] == 7802644 * 1024 and info["SwapFree"] == 3865088 * 1024
    tiny = memory_plan(ModelConfig.from_name("tiny"), "fp16", 1, 256)
    big = memory_plan(ModelConfig.from_name("xxlarge"), "fp32", 8, 256)
    assert tiny["weights"] == ModelConfig.from_name("tiny").weight_bytes("fp16")
    assert orin_nano_verdict(tiny)["fits"] and orin_nano_verdict(tiny)["headroom"] > 4 << 30
    assert memory_plan(ModelConfig.from_name("xxlarge"), "int8", 1, 256)["weights"] < big["weights"] / 3
    huge = ModelConfig(d_model=4096, n_head=32, n_layer=32, vocab_size=32000, canvas_len=2048)
    verdict = orin_nano_verdict(memory_plan(huge, "fp16", 1, 2048))
    assert not verdict["fits"] and verdict["headroom"] < 0


def test_peak_rss_matches_gnu_time():
    if shutil.which("/usr/bin/time") is None:
        pytest.skip("/usr/bin/time is not installed")
    code = textwrap.dedent("""
        import json, numpy as np
        from jetson_dllm.profiler import PeakRSS
        with PeakRSS() as rss:
            block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
            block.sum()
            del block
        print(json.dumps(rss.peak))
    """)
    measured = time_peak_rss([sys.executable, "-c", code])
    import subprocess

    ours = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip())
    assert ours > 300 * 2**20  # saw the allocation
    assert abs(ours - measured) / measured < 0.10, (ours, measured)  # within 10 % of GNU time's count


def test_peak_rss_sees_a_short_spike():
    import numpy as np

    with PeakRSS(interval=0.001) as rss:
        start = rss.peak
        block = np.ones(100 * 2**20 // 8)
        block.sum()
        del block
    assert rss.peak - start > 80 * 2**20


def test_plan_validates_the_sweep(tmp_path):
    groups = bench.plan(["tiny", "small"], ["torch", "onnx"], ["fp32", "int8"], [8, 16], [128], [1], ["confidence"])
    assert [(g.model, g.backend, g.precision) for g in groups] == [
        ("tiny", "torch", "fp32"), ("tiny", "onnx", "fp32"), ("tiny", "onnx", "int8"),
        ("small", "torch", "fp32"), ("small", "onnx", "fp32"), ("small", "onnx", "int8")]
    assert len(groups[0].points) == 2
    for args, match in [((["huge"], ["onnx"], ["fp32"]), "unknown config"), ((["tiny"], ["tpu"], ["fp32"]), "unknown backend"),
                        ((["tiny"], ["torch"], ["int8"]), "no backend takes")]:
        with pytest.raises(DllmError, match=match):
            bench.plan(*args, [8], [128], [1], ["confidence"])
    with pytest.raises(DllmError, match="positive"):
        bench.plan(["tiny"], ["onnx"], ["fp32"], [0], [128], [1], ["confidence"])
    with pytest.raises(DllmError, match="unknown strategy"):
        bench.plan(["tiny"], ["onnx"], ["fp32"], [8], [128], [1], ["beam"])


def test_a_sweep_that_does_not_fit_is_refused_before_starting():
    groups = bench.plan(["xxlarge"], ["onnx"], ["fp32"], [8], [256], [1], ["confidence"])
    with pytest.raises(DllmError, match="xxlarge on onnx .* needs about"):
        bench.check_memory(groups, available=2 << 30)
    bench.check_memory(groups, available=64 << 30)


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DllmError, match="a-file is a file, not a folder"):
        bench_report.check_writable(tmp_path / "a-file" / "out")  # a folder inside a file: refused even for root


def test_config_groups_are_prepared_in_their_own_process_before_measuring(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd[2])  # the module each process runs
        out = "/cache/tiny-bundle\n" if cmd[2] == "train_host.bench_models" else "[]\n"
        return subprocess.CompletedProcess(cmd, 0, out, "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    groups = [bench.Group(model=m, backend="onnx", precision="fp32", canvas_len=128, points=[]) for m in ("tiny", "runs/my-bundle")]
    bench.run_groups(groups)
    assert calls == ["train_host.bench_models", "jetson_dllm.bench", "jetson_dllm.bench"]
    assert [g.path for g in groups] == ["/cache/tiny-bundle", "runs/my-bundle"]


def test_a_bundle_is_measured_without_torch(bundle_dir):
    """The measuring worker of an onnx group must not need torch (its RSS would count torch's): torch blocked."""
    group = bench.Group(model=str(bundle_dir), backend="onnx", precision="fp32", canvas_len=32, repeats=1, warmup=0,
                        points=[{"batch": 1, "canvas": 32, "steps": 2, "strategy": "confidence"}], path=str(bundle_dir))
    code = "import sys; sys.modules['torch'] = None\nfrom jetson_dllm.bench import _worker\n_worker()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(dataclasses.asdict(group)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result) == 1 and result[0]["evaluations"] == 2 and result[0]["peak_rss_mb"] > 0


def test_random_weight_bundles_are_made_once_and_cached(tmp_path):
    env = {**os.environ, "JETSON_DLLM_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "train_host.bench_models", "checkpoint", "tiny", "64", "fp32"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    path = first.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path)) and (Path(path) / "checkpoints").is_dir()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.stdout.strip().splitlines()[-1] == path
    bad = subprocess.run(cmd[:4] + ["huge", "64", "fp32"], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown config")


def test_bench_command_on_a_trained_bundle(bundle_dir, trained_run, tmp_path, capsys):
    from jetson_dllm.cli import main

    code = main(["bench", str(bundle_dir), "--backend", "onnx", "--precision", "fp32,int8-dynamic", "--steps", "2,4",
                 "--canvas", "32", "--repeats", "2", "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "b")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    results = data["results"]
    assert {(r["precision"], r["steps"]) for r in results} == {("fp32", 2), ("fp32", 4), ("int8-dynamic", 2), ("int8-dynamic", 4)}
    for r in results:
        assert r["evaluations"] == r["steps"]  # fixed length: every step runs the network
        assert r["step_ms_median"] > 0 and r["generation_ms"] > r["step_ms_median"] and 0 < r["sampler_share"] < 1
        assert r["peak_rss_mb"] > 50 and r["weights_mb"] > 0
    assert "latency vs steps" in captured.out and "largest spread" in captured.out
    code = main(["bench", "--config", "tiny", "--backend", "trt", "--precision", "fp16", "--out", str(tmp_path / "c")])
    assert code == 1 and "TensorRT is not installed" in capsys.readouterr().err


def test_profile_command(capsys, bundle_dir):
    from jetson_dllm.cli import main

    assert main(["profile", "--config", "all", "--canvas", "256", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 18 and {r["config"] for r in rows} == {"tiny", "small", "medium", "large", "xlarge", "xxlarge"}
    tiny = next(r for r in rows if r["config"] == "tiny" and r["precision"] == "fp16")
    assert tiny["fits"] and tiny["builds"]
    assert main(["profile", str(bundle_dir), "--canvas", "32", "--measure"]) == 0
    assert "host RSS here" in capsys.readouterr().out
    assert main(["profile", str(bundle_dir), "--canvas", "4096"]) == 1


@pytest.mark.parametrize("which", ["bd3", "ar"])
def test_profile_measures_a_cached_family_and_its_whole_cache(capsys, which, bd3_bundle, ar_bundle):
    """A cached family's measured run allocates its cache on the first call; the plan counts the whole context's
    cache whatever --canvas says; an AR bundle has no TensorRT engine to build (the builds column says so)."""
    from jetson_dllm.cli import main

    bundle = {"bd3": bd3_bundle, "ar": ar_bundle}[which]
    assert main(["profile", str(bundle), "--canvas", "16", "--measure", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    cfg = load_bundle(bundle).config
    assert rows[0]["kv_cache"] == 2 * cfg.n_layer * cfg.n_kv_head * cfg.canvas_len * cfg.head_dim * 4 and rows[0]["host_rss_measured"] > 0
    assert (rows[0]["builds"] is None) == (which == "ar")


def test_the_plan_of_a_block_diffusion_model_counts_its_cache():
    mdlm = memory_plan(ModelConfig.from_name("small", vocab_size=8192, canvas_len=256), "fp32", 1, 256)
    bd3 = memory_plan(ModelConfig.from_name("small", vocab_size=8192, canvas_len=256, family="bd3", block_size=16), "fp32", 1, 256)
    assert mdlm["kv_cache"] == 0 and bd3["kv_cache"] == 2 * 6 * 1 * 6 * 256 * 64 * 4  # keys and values, every layer, FP32
    assert bd3["activations"] < mdlm["activations"] / 4  # 16 positions per call, not 256
    ar = memory_plan(ModelConfig.from_name("small", vocab_size=8192, canvas_len=256, family="ar"), "fp32", 1, 256)
    assert ar["kv_cache"] == bd3["kv_cache"] and ar["activations"] < bd3["activations"]  # the baseline: its cache, 1 position


def test_bench_measures_a_block_diffusion_bundle(bd3_bundle, tmp_path):
    """`canvas` tokens block by block (16 per block), `steps` per block: the counts follow from the schedule; each
    finished block's commit rides on the next block's first step."""
    results, _, paths = bench.run_sweep([str(bd3_bundle)], ["onnx"], ["fp32"], steps=[2, 8], canvases=[64], batches=[1],
                                        strategies=["confidence"], repeats=2, warmup=0, out_dir=tmp_path / "b", isolate=False,
                                        quality=True, quality_samples=2, judge=lambda texts: 42.0 + len(texts))
    two, eight = results
    assert two.block_size == eight.block_size == 16 and (two.steps, eight.steps) == (2, 8)
    assert two.evaluations == 4 * 2 and eight.evaluations == 4 * 8  # four blocks of 16: the whole cache (quality samples
    assert two.cache_passes == 0 and two.folded_commits == eight.folded_commits == 3  # fit it after their prompt too)
    assert two.step_ms_median > 0 and two.tokens_per_s > 0  # step; the last block is never committed
    assert two.gen_ppl == 44.0 and two.repetition is not None and 0 <= two.distinct2 <= 1
    kept = json.loads(paths["json"].read_text())["results"][0]["extra"]["samples"]  # for another judge later
    assert len(kept) == 2 and all(isinstance(t, str) for t in kept)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert rows[0]["block_size"] == "16" and float(rows[1]["folded_commits"]) == 3.0
    with pytest.raises(DllmError, match="at most 64 tokens"):
        bench.run_sweep([str(bd3_bundle)], ["onnx"], ["fp32"], steps=[2], canvases=[128], batches=[1], strategies=["confidence"],
                        repeats=1, warmup=0, out_dir=tmp_path / "c", isolate=False)

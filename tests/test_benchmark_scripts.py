"""The scripts behind the tables in docs/ run (on tiny fixtures) and print their tables."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def script(name, *args):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_train_throughput():
    out = script("train_throughput.py", "--configs", "tiny", "--batch", "2", "--canvas", "32", "--steps", "1", "--warmup", "0", "--threads", "1")
    row = next(line for line in out.splitlines() if line.startswith("| tiny"))
    assert float(row.split("|")[4].replace(",", "")) > 0  # tokens/s


def test_sampler_quality(trained_run, data_dir, ar_run):
    out = script("sampler_quality.py", trained_run, "--data", data_dir, "--judge", ar_run, "--steps", "2,4",
                 "--strategies", "confidence,ancestral", "--samples", "1")
    table, grid = out.split("strategy x steps")
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header
    assert len(rows) == 5 and rows[0].startswith("| real stories")  # the reference row, then 2 x 2
    assert all(float(r.split("|")[7]) > 1 for r in rows)  # generative perplexity
    cells = [line.split("|")[2:4] for line in grid.splitlines() if line.startswith("| confidence") or line.startswith("| ancestral")]
    assert len(cells) == 2 and float(cells[0][0].split("/")[0]) == pytest.approx(float(rows[1].split("|")[7]), abs=0.051)  # same figures
    two = script("sampler_quality.py", trained_run, "--data", data_dir, "--judge", ar_run, "--judge", ar_run, "--steps", "2",
                 "--strategies", "confidence", "--samples", "1")  # two judges' columns on the same samples
    rows = [line.split("|") for line in two.split("strategy x steps")[0].splitlines() if line.startswith("| ")]
    assert rows[0][7].strip() == f"gen. perplexity ({ar_run.name})" and len(rows) == 3  # the header, the reference, 1 x 1
    assert all(float(r[7]) == float(r[8]) > 1 for r in rows[1:])


def test_quality_and_infilling(trained_run, ar_run, data_dir):
    out = script("quality.py", "--diffusion", trained_run, "--ar", ar_run, "--data", data_dir, "--steps", "2", "--stories", "2",
                 "--span", "4", "--infill-steps", "2")
    assert "| diffusion (bound) |" in out and "| autoregressive (exact) |" in out and "span tokens restored" in out
    assert "judged by itself" in out  # the default judge is the AR model that wrote the AR fills


def test_infilling_takes_several_judges(trained_run, ar_run, data_dir):
    """One column per --judge over the same fills: the run folder and its own best checkpoint score alike."""
    from train_host.checkpoint import resolve_checkpoint

    out = script("quality.py", "--diffusion", trained_run, "--ar", ar_run, "--data", data_dir, "--steps", "2", "--stories", "2",
                 "--span", "4", "--infill-steps", "2", "--judge", ar_run, "--judge", resolve_checkpoint(ar_run))
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| (the original") or line.startswith("| diffusion (2")]
    assert len(rows) == 2 and all(len(r) == 6 and float(r[2]) == float(r[3]) > 1 for r in rows)


def test_rejudge_scores_the_samples_a_bench_kept(ar_run, tmp_path):
    """benchmarks/rejudge.py reads bench.json's kept samples and scores them with each judge, as the judge would."""
    import json

    from train_host.judge import Judge

    texts = ["Once upon a time there was a cat.", "The dog ran to the park and played."]
    point = dict(model="runs/x-bundle", backend="onnx", precision="int8", steps=16, strategy="confidence", gen_ppl=99.0,
                 repetition=0.0, distinct2=0.9, extra={"samples": texts})
    (tmp_path / "bench.json").write_text(json.dumps({"results": [point, {**point, "extra": {}}]}))
    out = script("rejudge.py", tmp_path / "bench.json", "--judge", ar_run)
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| x-bundle")]
    assert len(rows) == 1 and rows[0][6].strip() == "2" and float(rows[0][7]) == 99.0  # the point without samples is left out
    assert float(rows[0][8]) == pytest.approx(Judge(ar_run).perplexity(texts), abs=0.051)
    (tmp_path / "none.json").write_text(json.dumps({"results": [{**point, "extra": {}}]}))
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rejudge.py"), str(tmp_path / "none.json"), "--judge", str(ar_run)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "kept no samples" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_bd3_compare_with_two_judges(trained_run, ar_run, data_dir, tmp_path):
    """benchmarks/bd3_compare.py: NLL, speed and one perplexity column per judge for the same stories."""
    from train_host.checkpoint import resolve_checkpoint

    out = script("bd3_compare.py", "--data", data_dir, "--judge", ar_run, "--judge", resolve_checkpoint(ar_run), "--out",
                 tmp_path / "cmp", "--tokens", "32", "--samples", "2", "--repeats", "1", "--threads", "1",
                 f"mdlm={trained_run}", f"ar={ar_run}")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| mdlm ") or line.startswith("| ar ")]
    assert len(rows) == 3 + 2 + 1  # MDLM: confidence at 8, 16 and 32 steps, then eb and threshold; AR: one
    assert all(float(r[11]) == float(r[12]) > 1 for r in rows)  # the same judge twice: the same perplexity
    assert rows[-1][2].strip() == "ar" and float(rows[-1][10]) == 1.0  # AR's speed is the unit


def test_topk_coverage(trained_run, data_dir):
    out = script("topk_coverage.py", trained_run, "--data", data_dir, "--canvases", "4", "--ks", "8,64")
    masses = [float(line.split("|")[2]) for line in out.splitlines() if line.startswith("| 8 ") or line.startswith("| 64 ")]
    assert len(masses) == 2 and 0 < masses[0] <= masses[1] <= 1


def test_import_parity():
    out = script("import_parity.py")
    table = [line for line in out.splitlines() if line.startswith("| ")][1:]  # after the header
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in table}
    assert rows["Hugging Face folder"] < 1e-4 and rows["GGUF F32"] < 1e-4 and 0 < rows["GGUF Q8_0"] < 0.05


@pytest.mark.slow
def test_adaptation_benchmark(data_dir, ar_run, tmp_path):
    """benchmarks/adapt.py end to end on a narrow model and a few steps: the parent, an adapted BD3 and MDLM from
    scratch trained, measured (NLL, calls per token, judged samples, onnxruntime speed) and tabled."""
    out = script("adapt.py", "--data", data_dir, "--judge", ar_run, "--out", tmp_path / "adapt", "--parent-steps", "4",
                 "--size", "--d-model 64 --n-layer 2 --n-head 2", "--canvas", "64", "--batch", "4", "--lanes", "1",
                 "--runs", "bd3-4-shift-comp,mdlm-scratch", "--samples", "2", "--tokens", "32", "--speed", "bd3-4-shift-comp")
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| ar | scratch") and any(r.startswith("| bd3-4-shift-comp | ar |") for r in rows)
    adapted = [r for r in rows if r.startswith("| bd3-4-shift-comp")][0]
    assert float(adapted.split("|")[7]) <= 1.0  # calls per token: at most one at one step per token
    assert "b=1 shifted" in out  # the zero-shot bounds


def test_judge_swap(trained_run, ar_run, data_dir):
    """benchmarks/judge_swap.py: every row's texts scored by each judge; the same judge twice gives ratio 1."""
    out = script("judge_swap.py", "--diffusion", trained_run, "--ar", ar_run, "--data", data_dir, "--judges", ar_run, ar_run,
                 "--samples", "1", "--tokens", "16")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and not line.startswith("| texts")]
    assert [r[1].strip() for r in rows][:2] == ["real held-out stories", "AR, temperature 0.8"] and len(rows) == 5
    assert all(float(r[2]) > 1 and float(r[2]) == float(r[3]) and float(r[4]) == 1.0 for r in rows)


def test_pretrained_adaptation_benchmark(data_dir, ar_run, tmp_path):
    """benchmarks/adapt_pretrained.py on the tiny AR parent: its exact NLL, the zero-shot child, two children (plain
    and distilled) trained side by side with their curves, and every decoding setting's calls per token."""
    import json
    import shutil

    out = tmp_path / "adapt"
    shutil.copytree(data_dir, out / "data")  # tokenized with the parent's tokenizer already
    table = script("adapt_pretrained.py", "--parent", ar_run, "--text", "unused.txt", "--out", out, "--canvas", "64", "--steps", "2",
                   "--eval-every", "1", "--batch-size", "2", "--distill", "0", "0.5", "--canvases", "4", "--n-t", "1",
                   "--samples", "1", "--length", "8", "--parent-ft")
    assert "| parent (AR, exact) |" in table and "| child: 2 steps of 2 canvases, distill 0 (bound) |" in table
    assert "| child-distill0.5: 2 steps of 2 canvases, distill 0.5 (bound) |" in table
    assert "| parent trained on as AR, 2 steps (exact, best checkpoint) |" in table
    results = json.loads((out / "results.json").read_text())
    assert set(results["children"]) == {"child", "child-distill0.5"} and results["parent_ft"]["exact_nll"] > 0
    for child in results["children"].values():
        assert [step for step, _ in child["curve"]] == [1, 2]
        assert child["samples"]["block steps"]["calls_per_token"] <= 1.0  # at most one call per token at b steps per block
        assert child["samples"]["half the steps"]["calls_per_token"] < child["samples"]["block steps"]["calls_per_token"]
    assert results["parent_samples"]["token by token"]["calls_per_token"] >= 1.0  # AR: a call per token (and one for its end)


@pytest.mark.slow
def test_serve_load_and_the_openai_client_on_a_cached_family(bd3_bundle, ar_bundle, tmp_path):
    """benchmarks/serve_load.py on a block-diffusion bundle (rows per call from the server's metrics) and
    benchmarks/serve_openai.py on the AR baseline (the openai client, streaming the same text, a clean SIGTERM)."""
    out = script("serve_load.py", bd3_bundle, "--clients", "1,4", "--requests", "2", "--max-tokens", "16", "--steps", "2", "--threads", "1",
                 "--out", tmp_path / "load.json")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| batched") or line.startswith("| unbatched")]
    assert len(rows) == 4 and all(float(r[6]) >= 1 for r in rows)  # rows per call
    assert float(next(r for r in rows if r[1].strip() == "batched" and r[2].strip() == "4")[6]) > 1  # shared calls
    assert all(float(r[6]) == 1 for r in rows if r[1].strip() == "unbatched")
    out = script("serve_openai.py", ar_bundle, "--max-tokens", "8", "--threads", "1")
    assert "(ar, context 64" in out and "the same text" in out and "exit status after SIGTERM 0" in out


def test_call_batching(bd3_bundle, ar_bundle):
    out = script("call_batching.py", bd3_bundle, ar_bundle, "--threads", "1", "--calls", "2")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| bd3") or line.startswith("| ar")]
    assert len(rows) == 2 + 6  # a per-call row per bundle, three pool rows each
    assert all(float(r[2].split()[0]) > 0 for r in rows[:2]) and all(r[5].strip().endswith("%") for r in rows[2:])


@pytest.mark.slow
def test_self_conditioning_benchmark(data_dir, ar_run, tmp_path):
    """benchmarks/self_cond.py end to end on a few steps: four MDLM runs (plain, self-conditioned, and both after the
    plain one), measured (NLL, judged samples at 8..64 steps, the per-call cost with and without soft inputs)."""
    out = script("self_cond.py", "--data", data_dir, "--judge", ar_run, "--out", tmp_path / "sc", "--steps", "2", "--post-steps", "1",
                 "--samples", "1", "--lanes", "1", "--calls", "6", "--size", "--d-model 64 --n-layer 2 --n-head 2")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| mdlm")]
    assert [r[1].strip() for r in rows] == ["mdlm", "mdlm-sc", "mdlm+", "mdlm+sc"]
    assert all(float(r[4]) > 0 for r in rows)  # a judged perplexity at 8 steps
    assert "self-conditioned, soft input" in out


@pytest.mark.slow
def test_sdd_benchmark(data_dir, ar_run, tmp_path):
    """benchmarks/sdd.py end to end on a few steps: AR and SDD trained the same way (the other runs are the same code),
    their table (no NLL for SDD) and SDD's four loops."""
    out = script("sdd.py", "--data", data_dir, "--judge", ar_run, "--out", tmp_path / "sdd", "--steps", "2", "--samples", "2", "--runs", "ar,sdd",
                 "--size", "--d-model 64 --n-layer 2 --n-head 2")
    rows = {}
    for line in out.splitlines():  # the first table's rows (the loops' table names the SDD model again)
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line.split("|"))
    assert {"ar", "sdd"} <= set(rows)
    assert "none (no bound)" in rows["sdd"][2] and "exact" in rows["ar"][2]
    assert "re-noised, T 0.8" in out and "deterministic, greedy" in out


@pytest.mark.slow
def test_guidance_benchmark(data_dir, trained_run, ar_run, tmp_path):
    """benchmarks/guidance.py end to end on two pairs: the pairs made from the data's sources, every row judged, the
    cost of a plain and a guided step measured (timed there, not compared here)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "mdlm").symlink_to(trained_run)
    (runs / "ar").symlink_to(ar_run)
    out = script("guidance.py", "--data", data_dir, "--runs", runs, "--judge", ar_run, "--out", tmp_path / "g", "--pairs", "2",
                 "--length", "8", "--cond", tmp_path / "none")
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert {"AR baseline", "MDLM, no prompt", "MDLM w 0", "MDLM w 4", "MDLM w 2 late"} <= set(rows)
    assert (tmp_path / "g" / "data" / "pairs.val.jsonl").is_file()
    assert float(rows["torch guided"][2]) > 0 and float(rows["torch plain"][2]) > 0


@pytest.mark.slow
def test_continuous_benchmark(data_dir, ar_run, tmp_path):
    """benchmarks/continuous.py end to end on a few steps: the three continuous runs, every sampler and step count."""
    out = script("continuous.py", "--data", data_dir, "--judge", ar_run, "--out", tmp_path / "c", "--steps", "2", "--samples", "2",
                 "--size", "--d-model 64 --n-layer 2 --n-head 2")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| continuous")]
    assert {r[2].strip() for r in rows} >= {"DDIM @ 16", "DDPM @ 256", "DDIM + clamp @ 64"} and {r[1].strip() for r in rows} == {"continuous", "continuous-sc", "continuous-shift4"}
    assert all(int(r[3]) == int(r[2].split("@")[1]) for r in rows)  # one network call per step
    assert "not an NLL" in out


@pytest.mark.slow
def test_threads_benchmark():
    """benchmarks/threads.py on one round beside one busy process: every setting, each in its own process."""
    out = script("threads.py", "--rounds", "1", "--settle", "0", "--busy", "1", "--cap", "1", "--config", "tiny", "--skip-idle")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 1 busy")]
    assert len(rows) == 5 and {r[2].replace("(capped)", "").strip() for r in rows} >= {"library defaults", "short spins", "dllm default"}
    assert all(float(r[4].split()[0]) > 0 for r in rows)

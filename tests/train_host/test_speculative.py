"""The verify graph and speculative decoding on real tiny models: k tokens in one verify call are k decode calls,
a rejected suffix leaves no trace, the prompt is read in one call, and an AR parent with an adapted block-diffusion
drafter writes the parent's own text (greedy: token for token; sampled: the same distribution)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from jetson_dllm.generate import complete, open_model
from jetson_dllm.sampler import SamplerConfig
from jetson_dllm.speculative import complete as speculate
from jetson_dllm.speculative import parent_distribution
from tests.jetson_dllm.test_speculative_rule import chi2, chi2_critical

GREEDY = SamplerConfig(temperature=0.0)


@pytest.fixture(scope="module")
def adapted_bundle(adapted_run, tmp_path_factory):
    from train_host.export import export_bundle

    return export_bundle(adapted_run, tmp_path_factory.mktemp("adapted-bundle") / "bundle").path


def top(runner, graph, tokens, at):
    got = runner.run(graph, {"tokens": np.asarray(tokens, np.int32), "valid_len": np.int32(at)})
    return got["topk_logprobs"].copy(), got["topk_ids"].copy()


@pytest.mark.parametrize("where", ["torch", "onnx"])
def test_verify_reads_k_tokens_as_k_decode_calls_and_a_rejected_suffix_leaves_no_trace(where, ar_run, ar_bundle):
    path = ar_run if where == "torch" else ar_bundle
    x = np.random.default_rng(1).integers(3, 500, (2, 20)).astype(np.int32)
    with open_model(path) as runner:
        assert "verify" in runner.graphs
        one = [top(runner, "decode", x[:, i : i + 1], i) for i in range(12)]
        lp1, ids1 = np.concatenate([o[0] for o in one], 1), np.concatenate([o[1] for o in one], 1)
        head = top(runner, "verify", x[:, :5], 0)
        tail = top(runner, "verify", x[:, 5:12], 5)
        assert np.abs(np.concatenate([head[0], tail[0]], 1) - lp1).max() < 1e-4
        assert (np.concatenate([head[1], tail[1]], 1)[..., 0] == ids1[..., 0]).all()
        # a draft of 6 tokens read at 5, of which 2 are kept: the next call at 8 sees none of the other 4
        wrong = np.random.default_rng(2).integers(3, 500, (2, 6)).astype(np.int32)
        top(runner, "verify", np.concatenate([x[:, 5:8], wrong], 1)[:, :6], 5)
        again = top(runner, "verify", x[:, 8:12], 8)
        assert np.abs(again[0] - lp1[:, 8:12]).max() < 1e-4 and (again[1][..., 0] == ids1[:, 8:12, 0]).all()
        # rows at different positions in one call (the server's): each row's own valid length
        per_row = runner.run("verify", {"tokens": x[:, 3:6], "valid_len": np.array([3, 3], np.int32)})["topk_logprobs"]
        assert np.abs(per_row - lp1[:, 3:6]).max() < 1e-4


def test_the_bundle_carries_verify_at_every_precision_with_its_parity(ar_bundle):
    from jetson_dllm.bundle import load_bundle

    m = load_bundle(ar_bundle).manifest
    for precision, entry in m["precisions"].items():
        assert entry["verify"] == f"verify.{precision}.onnx"
        parity = m["decode_parity"][precision]
        assert set(parity["by_graph"]) == {"decode", "verify"}
        assert parity["verify_vs_decode"]["top1_agreement"] > (0.999 if precision == "fp32" else 0.9)
    assert m["decode_parity"]["fp32"]["verify_vs_decode"]["max_abs_logprob_diff"] < 1e-3


def test_a_prompt_is_read_in_one_call(ar_run):
    with open_model(ar_run) as runner:
        r = complete(runner, "Once upon a time there was a little girl", length=4, sampler=GREEDY).result
    assert len(r.step_ms) == 1 + 3  # the start token and the prompt in one verify call, then a decode call per token but the first


@pytest.mark.parametrize("where", ["torch", "onnx"])
def test_greedy_speculative_decoding_writes_the_parents_greedy_text(where, ar_run, ar_bundle, adapted_run, adapted_bundle):
    parent, child = (ar_run, adapted_run) if where == "torch" else (ar_bundle, adapted_bundle)
    with open_model(parent) as verifier, open_model(child) as drafter:
        alone = complete(verifier, "Once upon a time", length=30, sampler=GREEDY)
        for steps in (1, 2, 4):
            gen = speculate(verifier, drafter, "Once upon a time", length=30, sampler=GREEDY, draft_steps=steps)
            r = gen.result
            assert r.tokens.tolist() == alone.result.tokens.tolist(), steps
            assert gen.texts == alone.texts
            assert r.rounds + r.accepted - r.new_tokens in (0, 1) and r.drafted >= r.accepted  # 1: ended on an accepted end-of-text
            assert r.drafter_calls >= r.rounds - 1  # a round without drafts only when there is no room left
        report = gen.to_json()
        assert report["calls_per_token"] == pytest.approx((r.rounds + r.drafter_calls) / r.new_tokens)


def exact_pairs(runner, prompt_ids, sampler):
    """The parent's own distribution over its next two tokens, end-of-text and padding banned: p(a) p(b | a), from its
    verify graph."""
    tok = runner.tokenizer
    banned = (tok.eot_id, tok.pad_id)
    lp, ids = top(runner, "verify", [[tok.bos_id, *prompt_ids]], 0)
    pa = parent_distribution(lp[0, -1], ids[0, -1], banned, sampler)
    table = {}
    for a, p in zip(ids[0, -1], pa):
        if p > 0:
            lp2, ids2 = top(runner, "verify", [[tok.bos_id, *prompt_ids, int(a)]], 0)
            for b, q in zip(ids2[0, -1], parent_distribution(lp2[0, -1], ids2[0, -1], banned, sampler)):
                if q > 0:
                    table[(int(a), int(b))] = p * q
    return table


def test_sampled_speculative_decoding_has_the_parents_distribution(ar_run, adapted_run):
    """Two tokens after a prompt, 1,500 times with the drafter and the exact rule: their joint distribution against
    the parent's own (chi-square at 0.1%); the drafts were both accepted and rejected; and the test can tell: the same
    counts are far from the parent's distribution at another temperature."""
    sampler = SamplerConfig(temperature=1.0, top_k=3)
    with open_model(ar_run) as verifier, open_model(adapted_run) as drafter:
        ids = verifier.tokenizer.encode("Once upon a time")
        exact = exact_pairs(verifier, ids, sampler)
        seen, accepted, drafted = {}, 0, 0
        for seed in range(1500):
            r = speculate(verifier, drafter, "Once upon a time", length=2, sampler=SamplerConfig(temperature=1.0, top_k=3, seed=seed),
                          stop_at_end=False).result
            pair = tuple(int(t) for t in r.tokens[0, len(ids) :])
            seen[pair] = seen.get(pair, 0) + 1
            accepted, drafted = accepted + r.accepted, drafted + r.drafted
        assert set(seen) <= set(exact)
        cells = sorted(exact)
        counts, probs = np.array([seen.get(c, 0) for c in cells]), np.array([exact[c] for c in cells])
        stat, df = chi2(counts, probs / probs.sum())
        assert stat < chi2_critical(df), (stat, df)
        assert 0 < accepted < drafted
        colder = exact_pairs(verifier, ids, SamplerConfig(temperature=0.3, top_k=3))
        cold = np.array([colder.get(c, 0.0) for c in cells])
        assert chi2(counts, cold / cold.sum())[0] > chi2_critical(df)


def dllm(*args):
    return subprocess.run([sys.executable, "-m", "jetson_dllm", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_dllm_run_with_a_drafter_prints_the_parents_text_and_what_it_cost(ar_run, adapted_run, trained_run, bd3_run):
    common = ("-p", "Once upon a time", "--temperature", "0", "--length", "16", "--json")
    alone = dllm("run", ar_run, *common)
    fast = dllm("run", ar_run, *common, "--draft", adapted_run, "--draft-steps", "2")
    assert alone.returncode == 0 and fast.returncode == 0, fast.stderr
    a, b = json.loads(alone.stdout), json.loads(fast.stdout)
    assert a["texts"] == b["texts"] and b["drafter"] and b["rounds"] + b["accepted"] - b["new_tokens"] in (0, 1)
    assert b["calls_per_token"] > 0 and b["verify_calls"] == b["rounds"]
    for extra, reason in (((("--draft", trained_run)), "cannot draft"),
                          (("--draft", adapted_run, "-n", "2"), "--num-samples"),
                          (("--draft", adapted_run, "--draft-steps", "9"), "--draft-steps must be in 1..4"),
                          (("--draft-steps", "2",), "give the drafter with --draft"),
                          (("--draft", adapted_run, "--steps", "4"), "--steps does not apply")):
        got = dllm("run", ar_run, "-p", "Once", *extra)
        assert got.returncode != 0 and reason in got.stderr and "Traceback" not in got.stderr, (extra, got.stderr)
    got = dllm("run", bd3_run, "-p", "Once", "--draft", adapted_run)
    assert got.returncode != 0 and "no verify graph" in got.stderr and "Traceback" not in got.stderr


def test_served_speculative_requests_share_each_models_calls_and_write_the_parents_text(ar_bundle, adapted_bundle):
    """Three greedy requests through one batcher with a drafter: each gets the parent's own greedy text, drafter calls
    stack with drafter calls and verify calls with verify calls, and every slot of both pools comes back."""
    import threading

    from jetson_dllm.families.ar import serve_calls as alone_calls
    from jetson_dllm.runners.calls import drive
    from jetson_dllm.serve.batcher import Batcher, Job
    from jetson_dllm.speculative import serve_calls

    prompts = ["Once upon a time", "Tom and Sue went to the park", "The cat"]
    with open_model(ar_bundle) as verifier, open_model(adapted_bundle) as drafter:
        want = [drive(verifier, alone_calls(verifier, p, None, 20, 1, GREEDY).calls).tokens.tolist() for p in prompts]
        calls, done, finished = [], {}, threading.Event()
        batcher = Batcher(verifier, max_batch=4, drafter=drafter, observe=lambda **kw: calls.append((kw["graph"], kw["batch_rows"])))

        def emit(i):
            def on(kind, value):
                done[i] = (kind, value)
                if kind in ("done", "error") and len([k for k, _ in done.values() if k in ("done", "error")]) == len(prompts):
                    finished.set()
            return on

        for i, p in enumerate(prompts):
            batcher.submit(Job(serve_calls(verifier, drafter, 2, p, 20, 1, GREEDY), 1, emit(i)))
        batcher.start()
        assert finished.wait(120)
        batcher.stop(drain_s=1)
        assert [done[i][0] for i in range(3)] == ["done"] * 3, done
        assert [done[i][1].tolist() for i in range(3)] == want
        assert batcher.slots_in_use() == 0
    graphs = {g for g, _ in calls}
    assert "verify" in graphs and any(g.startswith("draft.") for g in graphs)
    assert max(r for g, r in calls if g == "verify") > 1 and max(r for g, r in calls if g.startswith("draft.")) > 1


def test_a_speculative_server_answers_with_the_parents_text_and_refuses_what_it_cannot_do(ar_bundle, adapted_bundle):
    """`dllm serve PARENT --draft CHILD` as a real process: a greedy completion (and its stream) is the parent's own,
    n > 1 is an OpenAI 400 naming n; a bad --draft-steps or --draft-steps alone does not start."""
    import httpx

    from tests.conftest import Server

    with open_model(ar_bundle) as verifier:
        want = complete(verifier, "Once upon a time", length=16, sampler=GREEDY).texts[0][len("Once upon a time") :]
    server = Server(ar_bundle, "--draft", str(adapted_bundle), "--draft-steps", "2")
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, r.text
        info = httpx.get(f"{server.url}/v1/info", timeout=10).json()
        assert info["drafter"] and info["draft_steps"] == 2
        bad = httpx.post(f"{server.url}/v1/completions", json={**body, "n": 2}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n", bad.text
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert 'graph="verify"' in metrics and 'graph="draft.' in metrics
    finally:
        assert server.stop() == 0
    for extra, reason in ((("--draft", str(adapted_bundle), "--draft-steps", "9"), "--draft-steps must be in 1..4"),
                          (("--draft-steps", "2"), "give the drafter with --draft")):
        got = dllm("serve", ar_bundle, "--port", "1", *extra)
        assert got.returncode != 0 and reason in got.stderr and "Traceback" not in got.stderr, got.stderr


def test_the_verify_graph_is_one_tensorrt_10_parses_with_a_dynamic_width(ar_bundle):
    """The verify graph (FP32 and FP16) against TensorRT 10's ONNX parser rules, its tokens' width a dynamic axis
    (an engine profile gives it a range: 1 to the largest draft + 1, or a prefill's 64)."""
    import onnx

    from tests.train_host.test_export import graph_problems

    for precision in ("fp32", "fp16"):
        model = onnx.load(str(ar_bundle / f"verify.{precision}.onnx"))
        assert graph_problems(model) == [], precision
        tokens = next(i for i in model.graph.input if i.name == "tokens").type.tensor_type.shape.dim
        assert tokens[1].dim_param and not tokens[1].dim_value  # W: symbolic
        out = next(o for o in model.graph.output if o.name == "k_new").type.tensor_type.shape.dim
        assert out[3].dim_param == tokens[1].dim_param  # the new keys have the call's width


def test_profile_plans_both_models_in_one_process(ar_bundle, adapted_bundle):
    """`dllm profile PARENT --draft CHILD`: each model's rows and both together (weights and caches summed, one
    runtime, the larger activations), and the Orin Nano verdict on the sum."""
    from jetson_dllm.profiler import memory_rows

    parent, drafter, both = memory_rows(str(ar_bundle), precisions="fp32", canvas=32, draft=str(adapted_bundle))
    assert (parent["config"].startswith("parent"), drafter["config"].startswith("drafter"), both["config"]) == (True, True, "both (speculative)")
    assert both["weights"] == parent["weights"] + drafter["weights"] and both["kv_cache"] == parent["kv_cache"] + drafter["kv_cache"]
    assert both["runtime"] == parent["runtime"] and both["run_total"] < parent["run_total"] + drafter["run_total"]
    assert both["fits"] and both["headroom"] < min(parent["headroom"], drafter["headroom"])

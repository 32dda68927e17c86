"""Block diffusion's vectorised objective: its two limits are the existing objectives, and between them it equals
running every block on its own (the clean blocks before it, then the noised block)."""

import pytest
import torch
import torch.nn.functional as F

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from train_host.bd3 import bd3_loss, block_attention_mask, block_times, clip_candidates, clip_search
from train_host.diffusion import alpha, loss_weight, mdlm_loss
from train_host.model import Denoiser

L, MASK = 16, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Denoiser(ModelConfig(d_model=32, n_head=2, n_layer=2, vocab_size=64, canvas_len=L, mask_id=MASK)).eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randint(3, 64, (3, L))


def reference(model, x, block, t, noise):
    """Each block on its own: [clean blocks before it (block-causal), the noised block (bidirectional, sees them)]."""
    total = torch.zeros(())
    for b in range(L // block):
        s, e = b * block, (b + 1) * block
        tb = t[:, b : b + 1]
        masked = noise[:, s:e] < (1.0 - alpha(tb))
        z = torch.where(masked, torch.full_like(x[:, s:e], MASK), x[:, s:e])
        tokens = torch.cat([x[:, :s], z], dim=1)
        blk = torch.arange(e) // block
        allowed = blk[None, :] <= blk[:, None]  # clean prefix: block-causal; the noised block: itself and all before
        allowed[s:, s:] = True
        logits = model(tokens, attn_mask=allowed)[:, s:][masked]
        ce = F.cross_entropy(logits, x[:, s:e][masked], reduction="none")
        total = total + (loss_weight(tb.expand(-1, block)[masked]) * ce).sum()
    return total / x.numel()


@pytest.mark.parametrize("block", [1, 2, 4, 8, 16])
def test_the_vectorised_objective_equals_running_each_block(model, x, block):
    g = torch.Generator().manual_seed(block)
    t, noise = block_times(3, L // block, 0.3, 0.9, g), torch.rand(x.shape, generator=g)
    with torch.no_grad():
        loss, stats = bd3_loss(model, x, MASK, block, t=t, noise=noise)
        want = reference(model, x, block, t, noise)
    assert stats["masked"] > 0
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)


def test_block_size_canvas_is_mdlm(model, x):
    g = torch.Generator().manual_seed(3)
    t, noise = block_times(3, 1, generator=g), torch.rand(x.shape, generator=g)
    with torch.no_grad():
        bd3, _ = bd3_loss(model, x, MASK, L, t=t, noise=noise)
        mdlm, _ = mdlm_loss(model, x, t[:, 0], MASK, noise=noise)
    torch.testing.assert_close(bd3, mdlm, atol=1e-5, rtol=1e-5)


def test_block_size_one_is_autoregression(model, x):
    """At block 1 the expected loss is the causal model's next-token cross-entropy (reading a mask token at the
    predicted position): every position is masked with probability t and weighted 1/t."""
    with torch.no_grad():
        ar = 0.0
        for i in range(L):  # position i predicted from the clean tokens before it, causally
            tokens = torch.cat([x[:, :i], torch.full_like(x[:, :1], MASK)], dim=1)
            causal = torch.ones(i + 1, i + 1, dtype=torch.bool).tril()
            ar += F.cross_entropy(model(tokens, attn_mask=causal)[:, -1], x[:, i], reduction="sum")
        ar = ar / x.numel()
        g = torch.Generator().manual_seed(5)
        draws = [bd3_loss(model, x, MASK, 1, generator=g)[0] for _ in range(400)]
    assert float(torch.stack(draws).mean()) == pytest.approx(float(ar), rel=0.05)


def test_the_mask_is_what_the_paper_draws():
    m = block_attention_mask(4, 2)
    noised_to_noised, noised_to_clean, clean_to_noised, clean_to_clean = m[:4, :4], m[:4, 4:], m[4:, :4], m[4:, 4:]
    assert noised_to_noised.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert noised_to_clean.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert not clean_to_noised.any()
    assert clean_to_clean.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_block_times_are_antithetic_and_clipped():
    t = block_times(4, 8, 0.45, 0.95, torch.Generator().manual_seed(0))
    assert t.shape == (4, 8) and float(t.min()) >= 0.45 and float(t.max()) <= 0.95
    gaps = torch.diff(torch.sort(t.flatten()).values)
    assert float(gaps.max() - gaps.min()) < 1e-5  # evenly spaced over the batch's blocks


@pytest.mark.parametrize("block", [0, 3, 17])
def test_a_block_that_does_not_divide_the_canvas_is_refused(model, x, block):
    with pytest.raises(DllmError, match="must divide the canvas"):
        bd3_loss(model, x, MASK, block)


def test_the_clip_search_grid_is_the_reference_codes():
    ranges = clip_candidates()
    assert ranges[0] == (1e-3, 1.0) and len(ranges) == 21 and len(set(ranges)) == 21
    widths = {round(hi - max(lo, 0.0) if lo > 1e-3 else hi, 6) for lo, hi in ranges[1:]}
    assert widths == {0.5, 0.6, 0.7, 0.8, 0.9} and all(0 < lo < hi <= 1.0 for lo, hi in ranges)


def test_the_clip_search_picks_the_range_whose_loss_varies_least(model, x):
    """An untrained model's cross-entropy is about the same everywhere, so the weight 1/t sets the variance: the
    unclipped range (weights up to 1000) loses to the window furthest from t = 0."""
    batches = [x, x.flip(0)]
    best, table = clip_search(model, batches, MASK, block=4)
    again, _ = clip_search(model, batches, MASK, block=4)
    assert best == again == min(table, key=table.get)  # the same draws for every range, and for every call
    assert best == (0.5, 1.0) and table[best] < table[(1e-3, 1.0)] / 3


def test_a_bd3_run_searches_its_noise_range_and_resumes_on_it(data_dir, tmp_path):
    from conftest import assert_same, train_small, weights

    straight = train_small(data_dir, tmp_path / "straight", steps=8, eval_every=4, objective="bd3", block_size=8)
    assert (straight["t_min"], straight["t_max"]) in clip_candidates() and straight["t_min"] > 1e-3  # narrowed at step 4
    first = train_small(data_dir, tmp_path / "split", steps=8, eval_every=4, objective="bd3", block_size=8, pause_after=4)
    assert first["stop"] == "paused"
    train_small(data_dir, tmp_path / "split", steps=8, eval_every=4, objective="bd3", block_size=8, resume=True)
    assert_same(weights(tmp_path / "straight"), weights(tmp_path / "split"))  # steps 5-8 drew from the saved range


def test_train_and_eval_a_bd3_model_then_fine_tune_from_mdlm(data_dir, trained_run, tmp_path):
    from conftest import train_small

    from train_host.checkpoint import load_model
    from train_host.evaluate import evaluate_checkpoint

    result = train_small(data_dir, tmp_path / "bd3", steps=6, eval_every=3, objective="bd3", block_size=16, t_min=0.3, t_max=0.8)
    assert result["step"] == 6 and result["val_nll"] > 0 and 0 <= result["val_acc"] <= 1
    model, _, _ = load_model(tmp_path / "bd3")
    assert model.cfg.block_size == 16 and model.cfg.family == "bd3"
    metrics = evaluate_checkpoint(tmp_path / "bd3", data_dir, canvases=8, n_t=2)
    assert metrics["val_nll"] > 0 and not any(k.startswith("val_acc@") for k in metrics)  # BD3's own bound
    tuned = train_small(data_dir, tmp_path / "ft", steps=2, eval_every=100, objective="bd3", block_size=8, init=str(trained_run))
    assert tuned["step"] == 2
    with pytest.raises(DllmError, match="another shape"):
        train_small(data_dir, tmp_path / "bad", steps=2, objective="bd3", block_size=8, init=str(trained_run), d_model=32)
    with pytest.raises(DllmError, match="must divide the canvas"):
        train_small(data_dir, tmp_path / "bad2", steps=2, objective="bd3", block_size=24)
    from jetson_dllm.generate import complete, open_model
    from jetson_dllm.sampler import SamplerConfig
    from train_host.export import export_bundle

    with open_model(tmp_path / "bd3") as runner:
        gen = complete(runner, "Once upon a time", length=20, num_samples=2)
        assert len(gen.texts) == 2 and all(t.startswith("Once upon a time") for t in gen.texts)
        assert gen.to_json()["cache_passes"] >= 0 and gen.evaluations >= 1
        with pytest.raises(DllmError, match="writes left to right"):
            complete(runner, "Once ____ end.")
    bundle = export_bundle(tmp_path / "bd3", tmp_path / "bundle")  # the block-step and commit graphs, checked
    assert bundle.precisions == ["fp32", "fp16"] and bundle.manifest["block_parity"]["fp32"]["top1_agreement"] >= 0.999
    assert bundle.manifest["block_parity"]["fp16"]["max_abs_logprob_diff"] < 0.1  # the FP16 graphs, with their FP32 islands
    greedy = SamplerConfig(steps=4, temperature=0.0)
    with open_model(tmp_path / "bd3") as torch_runner, open_model(tmp_path / "bundle") as onnx_runner:
        on_torch = complete(torch_runner, "Once upon a time", length=40, num_samples=2, sampler=greedy)
        on_onnx = complete(onnx_runner, "Once upon a time", length=40, num_samples=2, sampler=greedy)
    assert "block_step" in onnx_runner.graphs and (on_onnx.tokens == on_torch.tokens).all()  # the same text, block by block
    assert on_onnx.commits == on_torch.commits and on_onnx.evaluations == on_torch.evaluations and on_onnx.folded > 0
    with open_model(tmp_path / "bundle") as unfolded_runner:
        unfolded_runner.graphs = ("block_step", "commit")  # a commit pass per block instead of the folded commit step
        unfolded = complete(unfolded_runner, "Once upon a time", length=40, num_samples=2, sampler=greedy)
    assert (unfolded.tokens == on_onnx.tokens).all() and unfolded.commits == on_onnx.commits + on_onnx.folded  # the same text
    assert bundle.manifest["block_parity"]["fp32"]["by_graph"]["commit_step"]["max_abs_logprob_diff"] < 1e-3
    with open_model(tmp_path / "bundle", precision="fp16") as fp16:
        half = complete(fp16, "Once upon a time", length=40, num_samples=2, sampler=greedy)
    assert (half.tokens != on_torch.tokens).mean() < 0.25  # FP16 mostly agrees, greedily


@pytest.fixture(scope="module")
def bd3_model():
    torch.manual_seed(2)
    return Denoiser(ModelConfig(d_model=32, n_head=2, n_layer=2, vocab_size=64, canvas_len=L, mask_id=MASK, family="bd3", block_size=4)).eval()


@pytest.mark.parametrize("j", [0, 1, 3])
def test_a_cached_block_step_is_exactly_the_training_forward(bd3_model, x, j):
    from train_host.cached_graphs import block_step, commit
    from train_host.model import KVCache, topk_logprobs

    b = 4
    z = x.clone()
    z[:, j * b : j * b + 3] = MASK  # block j partly masked
    with torch.no_grad():
        full = bd3_model(torch.cat([z, x], 1), attn_mask=block_attention_mask(L, b), rope_positions=torch.arange(L).repeat(2))
        want = topk_logprobs(full[:, j * b : (j + 1) * b], 8)
        cache = KVCache(bd3_model.cfg, x.shape[0], L, "cpu")
        for i in range(j):
            commit(bd3_model, cache, x[:, i * b : (i + 1) * b])
        got = block_step(bd3_model, cache, z[:, j * b : (j + 1) * b], 8)
        again = block_step(bd3_model, cache, z[:, j * b : (j + 1) * b], 8)  # a step writes nothing
    assert cache.len == j * b
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], want[1]) and torch.equal(again[0], got[0])


def test_generation_goes_block_by_block_and_keeps_the_prompt(bd3_model):
    from jetson_dllm.families.bd3 import BlockModel, block_calls
    from jetson_dllm.runners.calls import drive
    from jetson_dllm.runners.torch_runner import TorchRunner
    from jetson_dllm.sampler import SamplerConfig, SpecialIds

    special = SpecialIds(mask=MASK, eot=0, pad=1)
    prompt = [5, 6, 7, 8, 9, 10]  # one whole block and half of the next
    sampler = SamplerConfig(steps=2, temperature=0.0, allow_end=False)
    with TorchRunner(bd3_model, topk=8) as runner:  # the torch runner's cached graphs over its own KV cache
        model = BlockModel(special, 4, L, fold="commit_step" in runner.graphs)
        result = drive(runner, block_calls(prompt, 10, model, sampler, num_samples=2))
    assert result.tokens.shape == (2, 16) and (result.tokens[:, :6] == prompt).all()
    assert not (result.tokens == MASK).any() and result.new_tokens == 10
    assert result.evaluations <= 2 * 3 and result.commits == 1  # the prompt's block; every later full block but the last
    assert result.folded == 2  # is committed inside the next block's first step


def test_the_live_view_sees_the_text_grow_block_by_block(bd3_run):
    from jetson_dllm.generate import complete, open_model
    from jetson_dllm.sampler import SamplerConfig

    seen = []
    with open_model(bd3_run) as runner:
        n_prompt = len(runner.tokenizer.encode("Once upon a time"))
        gen = complete(runner, "Once upon a time", length=40, sampler=SamplerConfig(steps=4, allow_end=False),
                       on_step=lambda view, step: seen.append((view.copy(), step.committed.copy())))
    widths = [v.shape[1] for v, _ in seen]
    assert widths == sorted(widths) and widths[-1] == n_prompt + 40 and len(set(widths)) == -(-(n_prompt + 40) // 16)
    for view, new in seen:  # each step commits only inside the block being denoised
        block_start = (view.shape[1] - 1) // 16 * 16
        assert not new[:, :block_start].any() and new.any()
    assert (seen[-1][0] == gen.tokens).all() and gen.evaluations == len(seen)

"""The autoregressive baseline and the judge."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.textstats import distinct, doubled, repetition
from train_host.autoregressive import ar_generate, ar_loss, shift_right
from train_host.model import Denoiser, KVCache


def causal_model(seed=0):
    torch.manual_seed(seed)
    return Denoiser(ModelConfig(d_model=64, n_head=2, n_layer=2, vocab_size=100, canvas_len=32, family="ar")).eval()


def test_kv_cache_decoding_equals_the_full_forward():
    model = causal_model()
    x = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.cfg, 2, 12, "cpu")
        first = model.logits_from_hidden(model.hidden(x[:, :7], cache))
        steps = [model.logits_from_hidden(model.hidden(x[:, i : i + 1], cache))[:, 0] for i in range(7, 12)]
    torch.testing.assert_close(first, full[:, :7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], atol=1e-5, rtol=1e-5)


def test_ar_loss_is_next_token_ce_without_padding():
    model = causal_model()
    x = torch.randint(3, 100, (2, 10))
    x[1, 6:] = 0  # padding
    loss, stats = ar_loss(model, x, bos_id=1, pad_id=0)
    with torch.no_grad():
        logits = model(shift_right(x, 1))
    keep = x != 0
    expected = F.cross_entropy(logits[keep], x[keep], reduction="sum") / x.numel()
    torch.testing.assert_close(loss, expected)
    assert int(stats["masked"]) == 16


def test_generation_stops_at_end_of_text_and_is_seeded():
    model = causal_model()
    a = ar_generate(model, [5, 6, 7], 10, bos_id=1, eot_id=1, pad_id=0, num_samples=3, temperature=1.0, seed=4)
    b = ar_generate(model, [5, 6, 7], 10, bos_id=1, eot_id=1, pad_id=0, num_samples=3, temperature=1.0, seed=4)
    assert np.array_equal(a.tokens, b.tokens) and a.tokens.shape == (3, 13) and (a.tokens[:, :3] == [5, 6, 7]).all()
    for row in a.tokens:
        ends = np.flatnonzero(row == 1)
        if ends.size:
            assert (row[ends[0] + 1 :] == 0).all()
    greedy = ar_generate(model, [5, 6], 4, 1, 1, 0)
    with torch.no_grad():
        first = model(torch.tensor([[1, 5, 6]]))[0, -1]
    assert greedy.tokens[0, 2] == int(first.argmax())
    with pytest.raises(DllmError, match="diffusion model"):
        ar_generate(Denoiser(ModelConfig(d_model=64, n_head=2, n_layer=1, vocab_size=100, canvas_len=32)), [5], 3, 1, 1, 0)


def test_judge_perplexity_is_exp_of_the_mean_token_nll(ar_run, trained_run):
    from train_host.checkpoint import load_model
    from train_host.judge import Judge

    judge = Judge(ar_run)
    texts = ["Once upon a time there was a cat.", "Lily went to the park. She saw a dog."]
    model, tok, _ = load_model(ar_run)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # independently: one position at a time, prefix -> next token
            ids = [tok.eot_id] + tok.encode(text) + [tok.eot_id]
            for i in range(1, len(ids)):
                logits = model(torch.tensor([ids[:i]]))[0, -1]
                total -= float(torch.log_softmax(logits, -1)[ids[i]])
                count += 1
    assert judge.perplexity(texts) == pytest.approx(math.exp(total / count), rel=1e-4)
    with pytest.raises(DllmError, match="must be autoregressive"):
        Judge(trained_run)


def test_text_statistics():
    assert repetition("a b c d a b c d a b c d") == pytest.approx(5 / 9)
    assert repetition("one two three four five") == 0.0
    assert distinct(["a b", "a c"], 1) == pytest.approx(3 / 4) and distinct(["a b", "a b"], 2) == 0.5
    assert doubled('They play play. "The the dog," said Sam.') == pytest.approx(2 / 7)
    assert doubled("no doubles here") == 0.0 and doubled("one") == 0.0


def test_ar_train_eval_run_through_the_cli(capsys, ar_run, trained_run, data_dir):
    from jetson_dllm.cli import main

    assert main(["eval", str(ar_run), "--data", str(data_dir), "--canvases", "8", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["val_nll"] > 0 and "val_acc@0.5" not in metrics  # exact NLL, next-token accuracy
    assert main(["run", str(ar_run), "-p", "Once upon a time", "--json", "-n", "2", "--temperature", "0.8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["texts"]) == 2 and all(t.startswith("Once upon a time") for t in result["texts"])
    assert main(["run", str(ar_run), "-p", "Once ____ after."]) == 1
    assert "cannot fill gaps" in capsys.readouterr().err
    code = main(["eval", str(trained_run), "--data", str(data_dir), "--canvases", "8", "--generate", "--judge", str(ar_run),
                 "--samples", "4", "--steps", "8", "--json"])
    assert code == 0
    judged = json.loads(capsys.readouterr().out)
    assert judged["gen_ppl"] > 1 and 0 <= judged["repetition"] <= 1 and judged["judge_val_nll"] > 0
    assert main(["eval", str(trained_run), "--data", str(data_dir), "--judge", str(ar_run)]) == 1


def test_bench_quality_columns_only_with_quality(bundle_dir, ar_run, tmp_path, capsys):
    import csv

    from jetson_dllm.cli import main

    common = ["bench", str(bundle_dir), "--steps", "4", "--canvas", "32", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "q"), "--quality", "--judge", str(ar_run), "--quality-samples", "2"]) == 0
    capsys.readouterr()
    plain = next(csv.DictReader(open(tmp_path / "plain" / "bench.csv")))
    judged = next(csv.DictReader(open(tmp_path / "q" / "bench.csv")))
    assert "gen_ppl" not in plain and "repetition" not in plain
    assert float(judged["gen_ppl"]) > 1 and 0 <= float(judged["repetition"]) <= 1
    assert "gen_ppl" in (tmp_path / "q" / "bench.md").read_text() and "gen_ppl" not in (tmp_path / "plain" / "bench.md").read_text()
    assert main(common + ["--out", str(tmp_path / "x"), "--judge", str(ar_run)]) == 1


def test_an_undertrained_judge_is_named_not_trusted_silently(ar_run):
    """A judge whose validation NLL is not clearly below word frequencies alone (the 30-step fixture) comes with a
    warning for `dllm bench --quality --judge` to show; its scores still come back."""
    from train_host.judge import Judge, perplexity_fn

    warnings = []
    score = perplexity_fn(ar_run, warn=warnings.append)
    assert len(warnings) == 1 and "undertrained" in warnings[0] and str(ar_run) in warnings[0]
    assert score(["Once upon a time there was a girl."]) > 1
    assert Judge(ar_run).note == warnings[0]

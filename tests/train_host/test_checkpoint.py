import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from jetson_dllm.config import ModelConfig
from jetson_dllm.errors import DllmError
from jetson_dllm.files import atomic_write
from train_host import checkpoint as ck
from train_host.data import train_tokenizer
from train_host.model import Denoiser


@pytest.fixture(scope="module")
def tok():
    from train_host.corpus import stories

    return train_tokenizer(stories(100), vocab_size=300)


def model_for(tok, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_head=2, n_layer=1, vocab_size=tok.vocab_size, canvas_len=32, mask_id=tok.mask_id)
    return Denoiser(cfg), cfg


def test_save_and_load_round_trip(tmp_path, tok):
    model, cfg = model_for(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 50, (2, 8))).sum().backward()
    opt.step()
    meta = {"step": 7, "samples_seen": 14, "elapsed": 1.5}  # what training writes (load_trainer_state checks it)
    path = ck.save_checkpoint(tmp_path, 7, model, cfg, tok, {"val_nll": 2.5}, trainer_meta=meta, optimizer=opt,
                              trainer_tensors={"rng.torch": torch.get_rng_state()})
    assert path.name == "step_00000007"
    loaded, tok2, config = ck.load_model(tmp_path)
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(a, b)
    assert loaded.head.weight is loaded.tok_emb.weight  # tied again after loading
    assert config["step"] == 7 and tok2.sha256 == tok.sha256
    _, meta = ck.load_trainer_state(path)
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(meta["optimizer_state"])
    for pa in model.parameters():
        assert torch.equal(restored.state[pa]["exp_avg"], opt.state[pa]["exp_avg"])


def test_a_write_that_dies_midway_leaves_the_previous_checkpoint(tmp_path, tok, monkeypatch):
    model, cfg = model_for(tok)
    ck.save_checkpoint(tmp_path, 1, model, cfg, tok, {"val_nll": 3.0})
    real_save = ck.save_file

    def dying_save(tensors, filename):  # write half a file, then the process "dies"
        real_save(tensors, filename)
        data = open(filename, "rb").read()
        open(filename, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, model_for(tok, seed=1)[0], cfg, tok, {"val_nll": 1.0})
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000001"]
    loaded, _, config = ck.load_model(tmp_path, which="latest")
    assert config["step"] == 1
    ck.clean_partial(tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


def test_a_process_killed_while_saving_never_leaves_a_broken_checkpoint(tmp_path, tok):
    tok.save(tmp_path / "tok.json")
    script = textwrap.dedent(f"""
        import torch
        from jetson_dllm.config import ModelConfig
        from jetson_dllm.tokenizer import TextTokenizer
        from train_host.checkpoint import save_checkpoint
        from train_host.model import Denoiser
        tok = TextTokenizer.from_file({str(tmp_path / 'tok.json')!r})
        cfg = ModelConfig(d_model=256, n_head=4, n_layer=4, vocab_size=tok.vocab_size, canvas_len=64, mask_id=tok.mask_id)
        model = Denoiser(cfg)
        step = 0
        while True:
            step += 1
            save_checkpoint(__import__("pathlib").Path({str(tmp_path / 'run')!r}), step, model, cfg, tok, {{}})
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"  # one finished, more in flight
    time.sleep(0.35)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = ck.list_checkpoints(tmp_path / "run")
    assert ckpts
    for c in ckpts:  # every complete-looking checkpoint is complete
        ck.load_checkpoint(c)


def test_truncated_or_altered_files_are_refused(tmp_path, tok):
    model, cfg = model_for(tok)
    path = ck.save_checkpoint(tmp_path, 1, model, cfg, tok, {})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(DllmError, match="truncated or altered"):
        ck.load_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config)[:40])
    with pytest.raises(DllmError, match="truncated or corrupt"):
        ck.load_checkpoint(path)


def test_foreign_folders_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(DllmError, match="not a jetson-dllm checkpoint"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(DllmError, match="holds no checkpoints"):
        ck.resolve_checkpoint(tmp_path / "..")
    with pytest.raises(DllmError, match="not found"):
        ck.resolve_checkpoint(tmp_path / "nothing-here")


def test_newer_format_is_refused(tmp_path, tok):
    model, cfg = model_for(tok)
    path = ck.save_checkpoint(tmp_path, 1, model, cfg, tok, {})
    config = json.loads((path / "config.json").read_text())
    config["version"] = 99
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DllmError, match="newer jetson-dllm"):
        ck.load_checkpoint(path)


def test_weights_of_another_shape_are_refused(tmp_path, tok):
    model, cfg = model_for(tok)
    path = ck.save_checkpoint(tmp_path, 1, model, cfg, tok, {})
    config = json.loads((path / "config.json").read_text())
    config["model"]["d_model"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DllmError, match="shape"):
        ck.load_model(path)


def test_best_and_last_k_are_kept(tmp_path, tok):
    model, cfg = model_for(tok)
    for step, nll in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.2)]:
        ck.save_checkpoint(tmp_path, step, model, cfg, tok, {"val_nll": nll})
        ck.prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000005"]
    assert ck.resolve_checkpoint(tmp_path).name == "step_00000002"
    assert ck.resolve_checkpoint(tmp_path, which="latest").name == "step_00000005"


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "a.json"
    atomic_write(p, "old")
    atomic_write(p, "new")
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["a.json"]


def test_non_finite_weights_are_never_saved_and_never_loaded(tmp_path, tok):
    from safetensors.torch import save_file

    from jetson_dllm.files import sha256_file
    from jetson_dllm.manifests import seal

    model, cfg = model_for(tok)
    with torch.no_grad():
        model.tok_emb.weight[3, 0] = float("nan")
    with pytest.raises(DllmError, match="NaN or infinite"):
        ck.save_checkpoint(tmp_path / "nan", 1, model, cfg, tok, {})
    assert not ck.list_checkpoints(tmp_path / "nan")
    good, _ = model_for(tok)
    path = ck.save_checkpoint(tmp_path / "r", 1, good, cfg, tok, {})
    weights = ck.state_dict_for_save(good)
    weights["tok_emb.weight"] = weights["tok_emb.weight"].clone().fill_(float("inf"))
    save_file(weights, str(path / "model.safetensors"))  # a file that is whole, hashed and sealed, but holds infinities
    config = json.loads((path / "config.json").read_text())
    config["files"]["model.safetensors"] = sha256_file(path / "model.safetensors")
    (path / "config.json").write_bytes(seal(config))
    with pytest.raises(DllmError, match="tok_emb.weight holds NaN or infinite"):
        ck.load_model(tmp_path / "r")


def test_a_half_pruned_checkpoint_is_skipped_for_the_newest_complete_one(tmp_path, tok):
    model, cfg = model_for(tok)
    ck.save_checkpoint(tmp_path, 1, model, cfg, tok, {"val_nll": 3.0})
    newest = ck.save_checkpoint(tmp_path, 2, model, cfg, tok, {"val_nll": 2.0})
    (newest / "model.safetensors").unlink()  # what a pruning killed halfway leaves
    assert [c.name for c in ck.list_checkpoints(tmp_path)] == ["step_00000001"]
    _, _, config = ck.load_model(tmp_path)
    assert config["step"] == 1

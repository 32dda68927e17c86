import pytest
import torch

from jetson_dllm.config import ModelConfig
from train_host.model import MASK_LOGIT_BIAS, Denoiser, topk_logprobs


def small_model(**kw) -> Denoiser:
    torch.manual_seed(0)
    return Denoiser(ModelConfig(d_model=64, n_head=2, n_layer=2, vocab_size=100, canvas_len=32, mask_id=2, **kw)).eval()


@pytest.mark.parametrize("causal", [False, True])
def test_what_an_earlier_position_sees_of_a_later_token(causal):
    model = small_model(family="ar" if causal else "mdlm")
    x = torch.randint(3, 100, (1, 16))
    y = x.clone()
    y[0, 12] = (x[0, 12] + 1) % 97 + 3
    with torch.no_grad():
        a, b = model(x), model(y)
    # The denoiser is bidirectional: positions 0..11 see position 12. The AR baseline's causal mask hides it.
    assert torch.allclose(a[0, :12], b[0, :12]) == causal
    assert not torch.allclose(a[0, 12:], b[0, 12:])
    model.set_attention("math")  # the explicit-attention path (the exported one) masks the same way
    with torch.no_grad():
        torch.testing.assert_close(model(x), a, atol=1e-5, rtol=1e-5)


def test_mask_token_is_never_predicted():
    model = small_model()
    with torch.no_grad():
        logits = model(torch.full((2, 8), 2))
        values, ids = model.sample_head(torch.full((2, 8), 2), k=99)
    assert (logits.argmax(-1) != 2).all()
    assert (logits[..., 2] <= logits.max(-1).values + MASK_LOGIT_BIAS / 2).all()
    assert not (ids[..., :98] == 2).any()  # only the very last of all 99 can be the mask


def test_sdpa_and_explicit_attention_agree():
    model = small_model()
    x = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        a = model(x)
        model.set_attention("math")
        b = model(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sample_head_is_log_softmax_topk():
    logits = torch.randn(2, 5, 50)
    values, ids = topk_logprobs(logits, 7)
    ref_v, ref_i = torch.log_softmax(logits, -1).topk(7, dim=-1)
    torch.testing.assert_close(values, ref_v)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_i)
    assert (values[..., :-1] >= values[..., 1:]).all()


def test_selected_positions_match_full_logits():
    model = small_model()
    x = torch.randint(0, 100, (2, 10))
    sel = torch.rand(2, 10) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(x, sel), model(x)[sel])


def test_tied_head_shares_the_embedding():
    model = small_model()
    assert model.head.weight is model.tok_emb.weight
    assert small_model(tie_embeddings=False).head.weight is not small_model(tie_embeddings=False).tok_emb.weight


def test_int32_tokens_work():
    model = small_model()
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x.int()), model(x))

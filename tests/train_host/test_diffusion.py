import math

import pytest
import torch
import torch.nn.functional as F

from jetson_dllm.errors import DllmError
from train_host import diffusion
from train_host.diffusion import T_EPS, alpha, loss_weight, mask_tokens, mdlm_loss, nll_bound, sample_t

V, MASK = 50, 2


class FixedLogits(torch.nn.Module):
    """Logits that depend only on the target position index, and a record of what was asked."""

    def __init__(self, L):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(L, V))
        self.seen = []

    def forward(self, z, positions=None):
        B, L = z.shape
        logits = self.table.expand(B, L, V)
        self.seen.append(positions)
        return logits if positions is None else logits[positions]


class Uniform(torch.nn.Module):
    def forward(self, z, positions=None):
        logits = torch.zeros(*z.shape, V)
        logits[..., MASK] = -1e4  # the mask is never a prediction
        return logits if positions is None else logits[positions]


def test_mask_tokens_masks_where_noise_is_below_the_probability():
    x = torch.randint(3, V, (3, 8))
    noise = torch.rand(3, 8)
    p = torch.tensor([0.0, 0.5, 1.0])
    z, masked = mask_tokens(x, p, MASK, noise=noise)
    assert torch.equal(masked, noise < p[:, None])
    assert (z[masked] == MASK).all() and torch.equal(z[~masked], x[~masked])
    assert not masked[0].any() and masked[2].all()


def test_loss_is_the_weighted_ce_of_masked_positions_only():
    x = torch.randint(3, V, (4, 16))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    noise = torch.rand(4, 16)
    model = FixedLogits(16)
    loss, stats = mdlm_loss(model, x, t, MASK, noise=noise)
    masked = noise < t[:, None]
    assert torch.equal(model.seen[-1], masked)  # the head only ran on masked positions
    ce = F.cross_entropy(model.table.expand(4, 16, V)[masked], x[masked], reduction="none")
    expected = ((1 / t)[:, None].expand(4, 16)[masked] * ce).sum() / x.numel()
    torch.testing.assert_close(loss, expected)
    assert int(stats["masked"]) == int(masked.sum())
    # Targets at unmasked positions do not enter the loss.
    y = x.clone()
    y[~masked] = (y[~masked] + 1) % (V - 3) + 3
    loss_y, _ = mdlm_loss(model, y, t, MASK, noise=noise)
    torch.testing.assert_close(loss, loss_y)


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
@pytest.mark.parametrize("t", [T_EPS, 0.01, 0.5, 0.999, 1.0])
def test_loss_is_finite_at_the_ends(schedule, t):
    x = torch.randint(3, V, (8, 32))
    loss, _ = mdlm_loss(FixedLogits(32), x, torch.full((8,), t), MASK, schedule, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("schedule", diffusion.SCHEDULES)
def test_weight_is_minus_alpha_prime_over_one_minus_alpha(schedule):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    d_alpha = (alpha(t + h, schedule) - alpha(t - h, schedule)) / (2 * h)
    torch.testing.assert_close(loss_weight(t, schedule), -d_alpha / (1 - alpha(t, schedule)))
    assert alpha(torch.tensor(0.0), schedule) == 1.0 and abs(float(alpha(torch.tensor(1.0), schedule))) < 1e-6


def test_antithetic_times_cover_the_interval_evenly():
    t = sample_t(16, torch.Generator().manual_seed(3))
    assert t.min() >= T_EPS and t.max() <= 1.0
    gaps = torch.diff(torch.sort(t).values)
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - T_EPS) / 16), atol=1e-6, rtol=0)


def test_uniform_model_bound_is_log_vocab():
    # A model that knows nothing pays log(V - 1) nats per token (the mask is never a candidate).
    x = torch.randint(3, V, (64, 32))
    out = nll_bound(Uniform(), x, pad_id=0, mask_id=MASK, n_t=16, generator=torch.Generator().manual_seed(0))
    assert out["tokens"] == x.numel()
    assert math.isclose(out["nll"] / out["tokens"], math.log(V - 1), rel_tol=0.03)


def test_bound_is_near_zero_for_an_oracle():
    x = torch.randint(3, V, (8, 16))

    class Oracle(torch.nn.Module):
        def forward(self, z, positions=None):
            logits = F.one_hot(x, V).float() * 50
            return logits[positions]

    out = nll_bound(Oracle(), x, 0, MASK, n_t=4, generator=torch.Generator().manual_seed(0))
    assert out["nll"] / out["tokens"] < 1e-6 and out["correct"] == out["masked"]


def test_unknown_schedule_is_refused():
    with pytest.raises(DllmError, match="schedule"):
        alpha(torch.tensor(0.5), "sqrt")

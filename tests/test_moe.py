"""MoE layer against the per-expert loop oracle; dropless, idle-expert, balance and upcycling facts."""

import pytest
import torch
from diffusers.models.attention import FeedForward

from tagmoe_lit.moe import LinearRouter, MLPRouter, MoELayer, load_balancing_loss, upcycle_
from tagmoe_lit.moe.stats import RoutingStats


def _pair(top_k: int, router=LinearRouter, seed: int = 0) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(seed)
    fast = MoELayer(16, 32, num_experts=4, top_k=top_k, router=router, dispatch="sorted")
    oracle = MoELayer(16, 32, num_experts=4, top_k=top_k, router=router, dispatch="loop")
    oracle.load_state_dict(fast.state_dict())
    return fast, oracle


def _skew_(layer: MoELayer) -> None:
    """Skew the router so every token whose feature 0 is 1 picks expert 0 (probabilities ~0.9999/…)."""
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, 0] = torch.tensor([0.0, -10.0, -10.0, -10.0])


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("router", [LinearRouter, MLPRouter], ids=["linear", "mlp"])
def test_sorted_dispatch_equals_loop_oracle_in_outputs_and_gradients(top_k, router):
    fast, oracle = _pair(top_k, router)
    x = torch.randn(3, 20, 16)
    outs, grads = [], []
    for layer in (fast, oracle):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    router_grads = [p.grad for p in fast.router.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads), "the task loss must reach the router"


def test_no_token_dropped_under_skewed_router_and_idle_experts_get_gradients():
    fast, oracle = _pair(1)
    _skew_(fast), _skew_(oracle)
    x = torch.randn(4, 64, 16)
    x[..., 0] = 1.0
    y, y_ref = fast(x), oracle(x)
    torch.testing.assert_close(y, y_ref)
    counts = fast.last.counts_E
    assert counts.sum() == 4 * 64, "every token must be processed (dropless)"
    assert counts[0] == 4 * 64, "the skewed router sends everything to expert 0, leaving 1..3 idle"
    y.sum().backward()
    for p in fast.experts.parameters():
        assert p.grad is not None and p.grad.shape == p.shape
        assert p.grad[1:].abs().sum() == 0 and p.grad[0].abs().sum() > 0


def test_top1_keeps_raw_probability_scaling_and_upcycled_experts_equal_dense_ffn():
    torch.manual_seed(0)
    ffn = FeedForward(dim=16, dim_out=16, activation_fn="gelu-approximate")
    layer = MoELayer(16, 64, num_experts=4, top_k=1)
    upcycle_(layer.experts, ffn)
    torch.nn.init.zeros_(layer.router.gate.weight)  # uniform router: p = 1/4 for every expert
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(layer(x), 0.25 * ffn(x), rtol=1e-5, atol=1e-6)


def test_router_runs_in_fp32_under_bf16_autocast():
    layer = MoELayer(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs, scores, _ = layer.route(torch.randn(10, 16).bfloat16())
    assert probs.dtype == scores.dtype == torch.float32


def test_token_mask_limits_statistics_to_counted_tokens():
    layer = MoELayer(16, 32)
    x = torch.randn(2, 10, 16)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :3] = True
    layer.token_mask = mask
    layer(x)
    assert layer.last.counts_E.sum() == 6
    assert layer.last.top1_counts_BE.sum(1).tolist() == [3.0, 3.0]
    torch.testing.assert_close(layer.last.signature_BE.sum(1), torch.ones(2))


def test_load_balancing_loss_is_one_for_uniform_router_and_grows_with_imbalance():
    layer = MoELayer(16, 32)
    torch.nn.init.zeros_(layer.router.gate.weight)
    layer(torch.randn(2, 10, 16))
    assert load_balancing_loss(RoutingStats([layer.last])).item() == pytest.approx(1.0)
    _skew_(layer)
    x = torch.randn(2, 10, 16)
    x[..., 0] = 1.0
    layer(x)
    assert load_balancing_loss(RoutingStats([layer.last])).item() > 2.0


def test_round_robin_debug_routing_balances_exactly():
    layer = MoELayer(16, 32, debug_round_robin=True)
    layer(torch.randn(2, 8, 16))
    assert layer.last.counts_E.tolist() == [4.0, 4.0, 4.0, 4.0]


def test_bad_arguments_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        MoELayer(16, 32, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="dispatch='fast' is unknown"):
        MoELayer(16, 32, dispatch="fast")

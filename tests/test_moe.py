"""MoE layer against the per-expert loop oracle; dropless, idle-expert, balance and upcycling facts."""

import math
from functools import partial

import pytest
import torch
from diffusers.models.attention import FeedForward

from tagmoe_lit.moe import (
    AuxFreeBiasRouter,
    LinearRouter,
    MLPRouter,
    MoELayer,
    NoisyTopKRouter,
    StackedExperts,
    TagConditionedRouter,
    load_balancing_loss,
    router_z_loss,
    upcycle_,
)
from tagmoe_lit.moe.parameter_counts import parameter_counts
from tagmoe_lit.moe.expert_counts import end_step
from tagmoe_lit.protocols import Router
from tagmoe_lit.moe.stats import RoutingStats
from tagmoe_lit.moe.upcycle import downcycle_

ROUTERS = [LinearRouter, MLPRouter, NoisyTopKRouter, AuxFreeBiasRouter]


def _pair(top_k: int, router=LinearRouter, dispatch: str = "sorted", seed: int = 0) -> tuple[MoELayer, MoELayer]:
    torch.manual_seed(seed)
    fast = MoELayer(16, 32, num_experts=4, top_k=top_k, router=router, dispatch=dispatch)
    oracle = MoELayer(16, 32, num_experts=4, top_k=top_k, router=router, dispatch="loop")
    oracle.load_state_dict(fast.state_dict())
    if isinstance(fast.router, AuxFreeBiasRouter):  # a non-zero bias changes choices: test it too
        for layer in (fast, oracle):
            layer.router.expert_bias.copy_(torch.tensor([0.05, -0.05, 0.02, -0.02]))
    return fast, oracle


def _skew_(layer: MoELayer) -> None:
    """Skew the router so every token whose feature 0 is 1 picks expert 0 (probabilities ~0.9999/…)."""
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, 0] = torch.tensor([0.0, -10.0, -10.0, -10.0])


@pytest.mark.parametrize("dispatch", ["sorted", "grouped"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("router", ROUTERS, ids=[r.__name__ for r in ROUTERS])
def test_dispatch_backends_equal_loop_oracle_in_outputs_and_gradients(top_k, router, dispatch):
    fast, oracle = _pair(top_k, router, dispatch)
    x = torch.randn(3, 20, 16)
    outs, grads = [], []
    for layer in (fast, oracle):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the noisy router draws the same noise in both layers
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    router_grads = [p.grad for n, p in fast.router.named_parameters() if n != "noise.weight" or fast.training]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads), "the task loss must reach the router"


@pytest.mark.parametrize("frozen", ["experts", "first_matrix", "input"])
def test_sorted_backend_computes_only_the_gradients_autograd_asks_for(frozen):
    """Frozen experts (`trainable: moe_tail` freezes other parts) or a leaf input skip their
    GEMMs; every gradient that is asked for still equals the oracle's."""
    fast, oracle = _pair(1)
    x = torch.randn(2, 12, 16)
    grads = []
    for layer in (fast, oracle):
        if frozen == "experts":
            layer.experts.requires_grad_(False)
        if frozen == "first_matrix":
            layer.experts.w1_EDH.requires_grad_(False)
        xi = x.clone().requires_grad_(frozen != "input")
        layer(xi).pow(2).sum().backward()
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (grads[0][0] is None) == (frozen == "input")
    assert fast.router.gate.weight.grad is not None, "the router still learns"


def test_grouped_backend_in_bf16_matches_the_loop():
    fast, oracle = _pair(1, dispatch="grouped")
    fast, oracle = fast.bfloat16(), oracle.bfloat16()
    x = torch.randn(2, 32, 16).bfloat16()
    torch.testing.assert_close(fast(x).float(), oracle(x).float(), rtol=2e-2, atol=2e-2)


def test_grouped_experts_compute_in_the_autocast_dtype_from_fp32_tokens():
    """Under autocast the FFN's tokens can arrive in fp32 (CUDA: out of a norm) while `_grouped_mm`, on no
    autocast list, takes bf16 on CUDA: the grouped experts cast as autocast would, and match fp32 closely."""
    experts = StackedExperts(4, 16, 32)
    x_MD, counts_E = torch.randn(24, 16), torch.tensor([10, 0, 6, 8])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts.forward_grouped(x_MD, counts_E)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), experts.forward_grouped(x_MD, counts_E), rtol=3e-2, atol=3e-2)


def test_no_token_dropped_under_skewed_router_and_idle_experts_get_gradients():
    fast, oracle = _pair(1)
    _skew_(fast), _skew_(oracle)
    x = torch.randn(4, 64, 16)
    x[..., 0] = 1.0
    y, y_ref = fast(x), oracle(x)
    torch.testing.assert_close(y, y_ref)
    counts = fast.routing.counts_E
    assert counts.sum() == 4 * 64, "every token must be processed (dropless)"
    assert counts[0] == 4 * 64, "the skewed router sends everything to expert 0, leaving 1..3 idle"
    y.sum().backward()
    for p in fast.experts.parameters():
        assert p.grad is not None and p.grad.shape == p.shape
        assert p.grad[1:].abs().sum() == 0 and p.grad[0].abs().sum() > 0


def test_top1_keeps_raw_probability_scaling_and_upcycled_experts_equal_dense_ffn():
    torch.manual_seed(0)
    ffn = FeedForward(dim=16, dim_out=16, activation_fn="gelu-approximate")
    layer = MoELayer(16, 64, num_experts=4, top_k=1, expert_bias=True)  # biases: the dense FFN exactly
    upcycle_(layer.experts, ffn)
    torch.nn.init.zeros_(layer.router.gate.weight)  # uniform router: p = 1/4 for every expert
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(layer(x), 0.25 * ffn(x), rtol=1e-5, atol=1e-6)


def test_router_runs_in_fp32_under_bf16_autocast():
    layer = MoELayer(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probs, scores, _ = layer.route(torch.randn(10, 16).bfloat16())
    assert logits.dtype == probs.dtype == scores.dtype == torch.float32


def test_token_mask_limits_statistics_to_counted_tokens():
    layer = MoELayer(16, 32)
    x = torch.randn(2, 10, 16)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :3] = True
    layer.set_routing_inputs(mask)
    layer(x)
    assert layer.routing.counts_E.sum() == 6
    assert layer.routing.top1_counts_BE.sum(1).tolist() == [3.0, 3.0]
    torch.testing.assert_close(layer.routing.signature_BE.sum(1), torch.ones(2))


def test_load_balancing_loss_is_one_for_uniform_router_and_grows_with_imbalance():
    layer = MoELayer(16, 32).eval()  # eval: each forward's own counts (training sums the step's micro-batches)
    torch.nn.init.zeros_(layer.router.gate.weight)
    layer(torch.randn(2, 10, 16))
    assert load_balancing_loss(RoutingStats([layer.routing])).item() == pytest.approx(1.0)
    _skew_(layer)
    x = torch.randn(2, 10, 16)
    x[..., 0] = 1.0
    layer(x)
    assert load_balancing_loss(RoutingStats([layer.routing])).item() > 2.0


def test_round_robin_debug_routing_balances_exactly():
    layer = MoELayer(16, 32, debug_round_robin=True)
    layer(torch.randn(2, 8, 16))
    assert layer.routing.counts_E.tolist() == [4.0, 4.0, 4.0, 4.0]


def test_bad_arguments_are_rejected_with_clear_messages():
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4; dispatch='fast' is unknown"):
        MoELayer(16, 32, num_experts=4, top_k=5, dispatch="fast")


def _skewed_tokens(n: int = 512) -> torch.Tensor:
    """Tokens whose features favour expert e with shares 70/10/10/10 under an identity gate."""
    e = torch.multinomial(torch.tensor([0.7, 0.1, 0.1, 0.1]), n, replacement=True)
    x = torch.zeros(n, 16)
    x[:, :4] = torch.randn(n, 4)
    x[torch.arange(n), e] += 2.0
    return x[None]


def _load_cv(counts: torch.Tensor) -> float:
    load = counts / counts.sum()
    return (load.std(unbiased=False) / load.mean()).item()


def test_aux_free_bias_halves_load_imbalance_within_50_updates_and_survives_state_dict():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, router=partial(AuxFreeBiasRouter, update_rate=0.01))
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[:, :4] = torch.eye(4)
    cvs = []
    for _ in range(50):
        layer(_skewed_tokens())
        cvs.append(_load_cv(layer.counts.step_total()))
        end_step([layer])  # the optimizer-step hook: bias update from the step's counts, then reset
        assert not layer.counts.step_total().any()
    assert cvs[-1] <= 0.5 * cvs[0], f"load CV {cvs[0]:.3f} → {cvs[-1]:.3f}"
    bias = layer.router.expert_bias.clone()
    assert bias[0] < 0 and abs(bias.sum()) < 1e-6
    restored = MoELayer(16, 32, router=AuxFreeBiasRouter)
    restored.load_state_dict(layer.state_dict())
    assert torch.equal(restored.router.expert_bias, bias)


def test_aux_free_bias_changes_choices_but_weights_stay_raw_probabilities():
    layer = MoELayer(16, 32, router=AuxFreeBiasRouter)
    torch.nn.init.zeros_(layer.router.gate.weight)
    layer.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    _, probs, scores, idx = layer.route(torch.randn(5, 16))
    assert (idx == 2).all() and torch.allclose(scores, torch.full_like(scores, 0.25))


def test_noisy_router_is_noisy_only_in_training():
    layer = MoELayer(16, 32, router=NoisyTopKRouter)
    x = torch.randn(1, 64, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_tag_conditioned_router_uses_tags_and_says_so_when_they_are_missing():
    torch.manual_seed(0)
    layer = MoELayer(16, 32, router=partial(TagConditionedRouter, tag_dim=8))
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="needs each sample's tags at inference"):
        layer(x)
    layer.set_routing_inputs(context_BC=torch.randn(2, 8) * 100)  # a strong tag signal decides the expert per sample
    layer(x)
    top1 = layer.routing.top1_counts_BE
    assert (top1.max(1).values == 5).all(), "every token of a sample follows its tags"
    layer.set_routing_inputs(context_BC=torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"tag_dim=8\) got tag embeddings of size 3"):
        layer(x)


class HalfRouter(torch.nn.Module):
    """A user's router, defined outside the kit: logits from the first half of the features."""

    needs_context = False  # the Router protocol (tagmoe_lit.protocols)

    def __init__(self, dim: int, num_experts: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.proj = torch.nn.Linear(dim // 2, num_experts)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.scale * self.proj(x_ND[:, : x_ND.shape[1] // 2])


def test_a_user_router_works_by_class_path_alone(tmp_path):
    from helpers import BASE, smoke_args
    from tagmoe_lit.cli import TagMoECLI

    cli = TagMoECLI(args=["fit", "--config", str(BASE), *smoke_args(tmp_path),
                          "--model.backbone.init_args.moe.init_args.router", "test_moe.HalfRouter",
                          "--model.backbone.init_args.moe.init_args.router.init_args.scale", "2.0"])
    routers = [layer.router for layer in cli.model.backbone.moe_layers]
    assert all(type(r).__name__ == "HalfRouter" and r.scale == 2.0 for r in routers)
    assert all(isinstance(r, Router) for r in routers)
    assert cli.trainer.global_step == 2


def test_z_loss_of_a_zero_router_is_log_e_squared():
    layer = MoELayer(16, 32)
    torch.nn.init.zeros_(layer.router.gate.weight)
    layer(torch.randn(2, 6, 16))
    assert router_z_loss(RoutingStats([layer.routing])).item() == pytest.approx(math.log(4) ** 2)


def test_balance_counts_accumulate_over_micro_batches_in_training_only():
    layer = MoELayer(16, 32)
    x = torch.randn(2, 6, 16)
    layer(x)
    layer(x)
    assert layer.routing.step_counts_E.sum() == 24 and layer.routing.counts_E.sum() == 12
    layer.eval()
    layer(x)
    assert layer.counts.step_total().sum() == 24 and layer.routing.step_counts_E.sum() == 12


def test_partial_reinit_and_downcycling():
    torch.manual_seed(0)
    ffn = FeedForward(dim=16, dim_out=16, activation_fn="gelu-approximate")
    experts = StackedExperts(4, 16, 64)
    upcycle_(experts, ffn, reinit_fraction=0.25, generator=torch.Generator().manual_seed(0))
    changed = (experts.w1_EDH != ffn.net[0].proj.weight.T).any(1)  # [E, H]: re-drawn hidden units
    assert changed.sum(1).tolist() == [16, 16, 16, 16] and not torch.equal(changed[0], changed[1])
    again = StackedExperts(4, 16, 64)
    torch.manual_seed(123)  # another global RNG state: the re-drawn units depend on the generator only
    upcycle_(again, ffn, reinit_fraction=0.25, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), experts.parameters()))
    upcycle_(experts, ffn)
    dense = FeedForward(dim=16, dim_out=16, activation_fn="gelu-approximate")
    downcycle_(dense, experts)
    x = torch.randn(3, 16)
    torch.testing.assert_close(dense(x), ffn(x))
    with pytest.raises(ValueError, match=r"reinit_fraction=1.5 must be within \[0, 1\]"):
        upcycle_(experts, ffn, reinit_fraction=1.5)


def test_parameter_counts_total_and_active():
    layer = MoELayer(16, 64, num_experts=4, top_k=1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), layer)
    counts = parameter_counts(model)
    experts = 4 * (16 * 64 + 64 * 16)  # no expert biases (the release's experts have none)
    router = 16 * 4
    assert counts["layers"] == [{"name": "1", "total": experts + router, "active": experts // 4 + router}]
    assert counts["total"] == 16 * 16 + 16 + experts + router
    assert counts["active"] == counts["total"] - (experts - experts // 4)


def test_knocked_out_expert_is_never_chosen_and_its_tokens_take_the_next_best():
    layer = MoELayer(16, 32, num_experts=4)
    x = torch.randn(64, 16)
    _, probs, _, idx = layer.route(x)
    busiest = int(idx[:, 0].mode().values)
    layer.knockout([busiest])
    _, _, scores, knocked = layer.route(x)
    second_best = probs.index_fill(1, torch.tensor([busiest]), -1.0).argmax(1)
    assert (knocked[:, 0] != busiest).all() and torch.equal(knocked[:, 0], second_best)
    assert torch.equal(scores[:, 0], probs.gather(1, second_best[:, None])[:, 0])  # raw probability, not renormalized
    layer.knockout(())
    assert torch.equal(layer.route(x)[3], idx)
    with pytest.raises(ValueError, match=r"Cannot knock out experts \[0, 1, 2, 3\] of 4 with top_k=1"):
        layer.knockout([0, 1, 2, 3])


def test_dense_wide_backbone_holds_the_moe_tail_total_parameters():
    from tagmoe_lit.backbone import QwenImageBackbone

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sizes = dict(token_channels=48, patch=4, out_channels=3, text_dim=32, moe_blocks=2)
    moe = QwenImageBackbone(**sizes, moe=partial(MoELayer, num_experts=4))
    wide = QwenImageBackbone(**sizes, widen_tail=4)
    routers = sum(count(layer.router) for layer in moe.moe_layers)
    wide_biases = 2 * (4 * 512 + 128)  # the wide FFNs' biases; the experts have none (expert_bias: false)
    assert count(wide) == count(moe) - routers + wide_biases
    assert [b.img_mlp.net[0].proj.out_features for b in wide.blocks] == [512] * 4 + [2048] * 2
    with pytest.raises(ValueError, match="widen_tail=4 widens dense FFNs: it needs moe: null"):
        QwenImageBackbone(**sizes, widen_tail=4, moe=partial(MoELayer, num_experts=4))


def _tiny_moe_transformer(pretrained: bool = True, **moe):
    """A 2-block diffusers Qwen-Image transformer whose last block's image FFN is a `MoELayer`
    (`pretrained`: its experts upcycled from the FFN it replaces, as from a dense checkpoint)."""
    from diffusers import QwenImageTransformer2DModel

    from tagmoe_lit.backbone.surgery import install_moe

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                              axes_dims_rope=(4, 6, 6), in_channels=12, out_channels=3, joint_attention_dim=24)
    (layer,) = install_moe(transformer.transformer_blocks, 1, partial(MoELayer, **moe), pretrained=pretrained)
    return transformer, layer


def test_gradient_checkpointing_outside_the_lightning_module_counts_each_token_once():
    """diffusers' own gradient checkpointing re-runs the MoE forward inside backward (DESIGN.md pitfall 8);
    `ExpertCounts` ignores that recompute, so a plain training loop counts 2 × 8 tokens, not twice that."""
    transformer, layer = _tiny_moe_transformer()
    transformer.enable_gradient_checkpointing()
    transformer.train()
    out = transformer(hidden_states=torch.randn(2, 8, 12), encoder_hidden_states=torch.randn(2, 3, 24),
                      timestep=torch.rand(2), img_shapes=[[(1, 2, 4)]] * 2, return_dict=False)[0]
    assert layer.counts.step_total().sum() == 16
    out.pow(2).mean().backward()
    assert layer.counts.step_total().sum() == 16, "the recompute in backward was counted again"
    assert layer.router.gate.weight.grad is not None


@pytest.mark.parametrize("expert_init", ["independent", "tied"])
def test_from_scratch_experts_start_alike_in_eager_and_meta_builds(expert_init):
    """One init path per `expert_init`, eager and meta alike: independent draws (the default: experts differ
    at init), or tied copies of one dense FFN (the eager surgery copies the FFN it replaces; a meta build has
    none, so materialization's `MoELayer.reset_parameters` upcycles a fresh one)."""
    from tagmoe_lit.distributed import materialize_

    _, eager = _tiny_moe_transformer(pretrained=False, expert_init=expert_init)
    with torch.device("meta"):
        _, meta = _tiny_moe_transformer(pretrained=False, expert_init=expert_init)
    materialize_(meta, "cpu")
    for layer in (eager, meta):
        same = [torch.equal(t[e], t[0]) for t in (layer.experts.w1_EDH, layer.experts.w2_EHD) for e in range(1, 4)]
        assert all(same) if expert_init == "tied" else not any(same), f"{expert_init} experts: {same}"
        bound = 1 / math.sqrt(layer.experts.dim)  # nn.Linear's init, per expert or of the one dense FFN
        assert 0.5 * bound < layer.experts.w1_EDH.abs().max() <= bound
    assert not meta.counts.step_total().any()
    with pytest.raises(ValueError, match="expert_init='shared' is unknown; choose 'independent' or 'tied'"):
        MoELayer(16, 64, expert_init="shared")


def test_upcycling_noise_on_independent_experts_is_refused():
    from tagmoe_lit.backbone import QwenImageBackbone

    with pytest.raises(ValueError, match="upcycle_noise / upcycle_reinit perturb experts copied from a dense FFN"):
        QwenImageBackbone(48, 4, 3, 32, moe=MoELayer, upcycle_noise=0.05)
    tied = QwenImageBackbone(48, 4, 3, 32, moe=partial(MoELayer, expert_init="tied"), upcycle_noise=0.05)
    w1 = tied.moe_layers[0].experts.w1_EDH
    assert not torch.equal(w1[0], w1[1])  # noise on the copies


@pytest.mark.parametrize("routing_tokens", ["target", "image"])
def test_routing_tokens_count_target_or_every_real_image_token(routing_tokens):
    """g, the balance counts and routing statistics cover the target tokens, or (`image`, as the release's
    balance loss) the real reference tokens too; a blank reference frame (text-to-image) never counts."""
    from tagmoe_lit.backbone import QwenImageBackbone

    torch.manual_seed(0)
    backbone = QwenImageBackbone(12, 2, 3, 24, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                 axes_dims_rope=(4, 6, 6), moe=MoELayer, moe_blocks=1, routing_tokens=routing_tokens)
    T = 16
    reference = torch.randn(2, T, 12)
    reference[0] = 0.0  # sample 0: a text-to-image sample's blank frame
    backbone(torch.randn(2, T, 12), reference, (4, 4), torch.randn(2, 3, 24), None, torch.rand(2))
    routing = backbone.moe_layers[0].routing
    assert routing.counts_E.sum() == (2 * T + T if routing_tokens == "image" else 2 * T)
    assert routing.top1_counts_BE.sum(1).tolist() == ([T, 2 * T] if routing_tokens == "image" else [T, T])
    with pytest.raises(ValueError, match="routing_tokens='all' is unknown; choose 'target' or 'image'"):
        QwenImageBackbone(12, 2, 3, 24, moe=MoELayer, routing_tokens="all")


def test_auto_dispatch_is_grouped_only_where_its_cuda_kernel_runs():
    """`_grouped_mm`'s CUDA kernel takes bf16/fp16 only (its meta check, run here on fake CUDA tensors, mirrors
    it): fp32 on CUDA and everything on CPU take the sorted backend."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = MoELayer(16, 64)
    assert layer._backend(torch.empty(4, 16)) == "sorted"
    with FakeTensorMode():
        cuda = torch.empty(4, 16, device="cuda")
        assert layer._backend(cuda) == "sorted" and layer._backend(cuda.bfloat16()) == "grouped"
        with pytest.raises(RuntimeError, match="Expected mat_a to be BFloat16"):
            torch._grouped_mm(cuda, torch.empty(2, 16, 8, device="cuda"), offs=torch.tensor([2, 4], device="cuda", dtype=torch.int32))

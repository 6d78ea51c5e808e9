"""The alignment branch trains every router, and λ_align = 0 is exactly the branch-free model."""

import torch

from helpers import tiny_batch, tiny_module


def _grads(module, batch) -> dict[str, torch.Tensor]:
    B = batch["target"].shape[0]
    g = torch.Generator().manual_seed(1)
    sigma = torch.rand(B, generator=g)
    noise = torch.randn(B, 64, module.codec.token_channels, generator=g)
    off = torch.zeros(B, dtype=torch.bool)
    module.zero_grad()
    module.loss_terms(batch, sigma, noise, off, off)["loss"].backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_alignment_loss_reaches_the_router_of_every_moe_layer():
    module = tiny_module(lambda_align=1.0)
    batch = tiny_batch(module)
    B = batch["target"].shape[0]
    terms = module.loss_terms(batch, torch.full((B,), 0.5), torch.randn(B, 64, 12), torch.zeros(B, dtype=bool), torch.zeros(B, dtype=bool))
    terms["align"].backward()
    for i, layer in enumerate(module.backbone.moe_layers):
        grad = layer.router.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"L_align gives no gradient to MoE layer {i}'s router"


def test_lambda_align_zero_gives_bit_identical_gradients_to_a_model_without_the_branch():
    with_branch = tiny_module(lambda_align=0.0)
    without = tiny_module(align=False)
    assert with_branch.tag_embedder is not None and without.tag_embedder is None
    without.load_state_dict({k: v for k, v in with_branch.state_dict().items() if k in without.state_dict()})
    batch = tiny_batch(with_branch)
    ga, gb = _grads(with_branch, batch), _grads(without, batch)
    assert set(gb) <= set(ga)
    for name, grad in gb.items():
        assert torch.equal(ga[name], grad), f"{name} differs"
    assert any(n.startswith("head.") for n in ga), "the branch still joins backward (DDP safety)"


def test_samples_trained_without_their_instruction_are_not_aligned():
    """A text-dropped sample cannot infer its task, so it adds 0 to L_align (the mean stays over the
    batch: any split over ranks gives the same gradient); `align_dropped_text` restores the old loss."""
    batch = tiny_batch(tiny_module())
    B = batch["target"].shape[0]
    sigma, noise = torch.full((B,), 0.5), torch.randn(B, 64, 12, generator=torch.Generator().manual_seed(0))
    drop_text, off = torch.tensor([True, False, False, True]), torch.zeros(B, dtype=torch.bool)
    for align_dropped_text, keep in ((False, ~drop_text), (True, torch.ones(B, dtype=torch.bool))):
        module = tiny_module(align_dropped_text=align_dropped_text)
        terms = module.loss_terms(batch, sigma, noise, drop_text, off)
        per_sample = 1.0 - module.routing.align_cos_B
        torch.testing.assert_close(terms["align"].detach(), (per_sample * keep).mean())
    module = tiny_module()
    terms = module.loss_terms(batch, sigma, noise, torch.ones(B, dtype=torch.bool), off)
    assert terms["align"] == 0 and terms["align_shuffled"] == 0 and terms["align_constant"] == 0

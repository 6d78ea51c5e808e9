"""Two CPU processes (gloo) train exactly what one process trains on the same global batch.

Each multi-process run goes through the documented launcher, `torchrun` (`torch.distributed.run
--standalone --nproc_per_node 2 -m tagmoe_lit fit …`), on the tiny model, and is compared with an
in-process single-process run whose batch is both ranks' batches together. Equal losses need three
things: the data modules give rank r of W the global batch's slice r (`data/datamodule.py`), the
training noise of a sample depends on its position in the global batch and not on its rank
(`FlowObjective.training_draws`, called by `TagMoEModule.training_draws`), and the load-balancing loss takes expert counts over all ranks
(`moe/expert_counts.py` `global_counts`); the mean of the ranks' losses is then the single-process loss.

Process start-up costs ~15 s each (DESIGN.md pitfall 13), so these are `slow` (`make test-slow`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.moe import RoutingStats, load_balancing_loss
from tagmoe_lit.moe.expert_counts import global_counts
from tagmoe_lit.moe.stats import LayerRouting
from helpers import FSDP2, KNOCKOUT, PER_RANK, STEPS, assert_same_run, common, last_weights, losses, single, tiny_batch, tiny_module, torchrun



def _balance_worker(rank: int, store_path: str, out_path: str) -> None:
    """Rank r routes differently from rank 1 − r; both must see the global counts and lb loss."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    counts_LE = torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 5.0]]) * (rank + 1)
    layers = [LayerRouting(probs_mean_E=torch.full((4,), 0.25) + 0.1 * rank * torch.tensor([1.0, -1.0, 0.0, 0.0]),
                           counts_E=c, step_counts_E=c, signature_BE=torch.zeros(1, 4), top1_counts_BE=torch.zeros(1, 4),
                           entropy=torch.tensor(0.0), z_loss=torch.tensor(0.0)) for c in counts_LE]
    result = {"counts": global_counts(counts_LE).tolist(), "lb": load_balancing_loss(RoutingStats(layers)).item()}
    Path(out_path.format(rank)).write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_balance_statistics_are_reduced_over_ranks(tmp_path):
    """`global_counts` sums over ranks and the lb loss uses those counts with each rank's own P."""
    out = str(tmp_path / "rank{}.json")
    torch.multiprocessing.spawn(_balance_worker, args=(str(tmp_path / "store"), out), nprocs=2)
    results = [json.loads(Path(out.format(r)).read_text()) for r in range(2)]
    total_LE = torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 1.0, 5.0]]) * 3
    f_LE = total_LE / total_LE.sum(-1, keepdim=True)
    for rank, result in enumerate(results):
        assert result["counts"] == total_LE.tolist()
        P_E = torch.full((4,), 0.25) + 0.1 * rank * torch.tensor([1.0, -1.0, 0.0, 0.0])
        assert result["lb"] == pytest.approx((4 * (f_LE * P_E).sum(-1)).mean().item(), abs=1e-6)


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    single(tmp_path / "one")
    seconds = torchrun(tmp_path / "two", "--trainer.strategy", "ddp")
    diff = assert_same_run(tmp_path / "one", tmp_path / "two")
    print(f"\nDDP 2×{PER_RANK} vs 1×{2 * PER_RANK}: max loss difference {diff:.2e}, {seconds:.1f} s")


@pytest.mark.slow
def test_fsdp2_with_idle_experts_equals_one_process_and_consolidates_for_a_single_process(tmp_path):
    """ModelParallelStrategy (fully_shard per block + root, activation checkpointing) with three
    idle experts: no hang, same losses and weights, and the checkpoint directory, consolidated,
    validates in one process through the CLI (its `tagmoe` record intact)."""
    single(tmp_path / "one", *KNOCKOUT)
    seconds = torchrun(tmp_path / "two", *FSDP2, *KNOCKOUT)
    diff = assert_same_run(tmp_path / "one", tmp_path / "two")
    print(f"\nFSDP2 2×{PER_RANK} vs 1×{2 * PER_RANK} (3 idle experts): max loss difference {diff:.2e}, {seconds:.1f} s")
    consolidated = tmp_path / "two" / "consolidated.ckpt"
    assert torch.load(consolidated, weights_only=True)["global_step"] == STEPS
    cli = TagMoECLI(args=["validate", *common(tmp_path / "val", PER_RANK), "--trainer.limit_val_batches", "1",
                          "--data.val_samples", "4", "--ckpt_path", str(consolidated)])
    assert cli.trainer.ckpt_path == str(consolidated) and "val/flow_fixed" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_fsdp2_with_lora_and_dropout_equals_one_process(tmp_path):
    """Adapters inside FSDP2 units (frozen and trainable parameters mixed), their dropout drawn per
    sample: two ranks train exactly what one process trains on the global batch."""
    lora = ["--model.lora.rank", "4", "--model.lora.dropout", "0.1", "--model.lora.targets", "[attention, experts, router]"]
    single(tmp_path / "one", *lora)
    seconds = torchrun(tmp_path / "two", *FSDP2, *lora)
    diff = assert_same_run(tmp_path / "one", tmp_path / "two")
    print(f"\nFSDP2 + LoRA 2×{PER_RANK} vs 1×{2 * PER_RANK}: max loss difference {diff:.2e}, {seconds:.1f} s")


@pytest.mark.slow
def test_fsdp2_bf16_parameter_gather_trains_as_the_fp32_gather_does(tmp_path):
    """`param_dtype: bfloat16` gathers parameters in bf16 and reduces gradients in fp32, routers in
    fp32: the same run up to bf16 rounding, and the stored (sharded) parameters stay fp32."""
    torchrun(tmp_path / "fp32", *FSDP2)
    seconds = torchrun(tmp_path / "bf16", *FSDP2, "--trainer.strategy.init_args.param_dtype", "bfloat16")
    a, b = losses(tmp_path / "fp32", 2), losses(tmp_path / "bf16", 2)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert 0 < diff < 0.02 * max(a), (a, b)  # bf16 rounding, not another run
    weights = last_weights(tmp_path / "bf16")
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}
    print(f"\nFSDP2 bf16 vs fp32 parameter gather: losses {a} vs {b} (max difference {diff:.2e}), {seconds:.1f} s")


def test_meta_init_allocates_nothing_and_trains_after_per_module_materialization():
    """As FSDP1 materializes (each module `to_empty(recurse=False)`, which never reaches the backbone
    wrapper's own RoPE repair): the module rebuilds the RoPE tables at its first forward (pitfall 17)
    and zeroes the expert counts when training starts."""
    module = tiny_module(meta_init=True)
    parts = [module.backbone, module.tag_embedder, module.head]
    assert all(p.is_meta for part in parts for p in part.parameters())
    gen = torch.Generator().manual_seed(0)
    for part in parts:
        for m in part.modules():
            if any(t.is_meta for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))):
                m.to_empty(device="cpu", recurse=False)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    assert module.backbone.transformer.pos_embed.pos_freqs.is_meta
    module.on_train_start()  # zeroes the expert-count buffers, uninitialized after to_empty
    batch = tiny_batch(module)
    x0, _ = module.encode_images(batch)
    no = torch.zeros(4, dtype=torch.bool)
    loss = module.loss_terms(batch, torch.full((4,), 0.5), torch.randn_like(x0), no, no)["loss"]
    assert torch.isfinite(loss) and not module.backbone.transformer.pos_embed.pos_freqs.is_meta


def test_sharded_backbone_runs_forward_without_autocast_weight_cache():
    """Autocast keeps every cast weight until its region ends; FSDP2's gathered parameters are such
    weights, so `wrap_model` turns the cache off for the backbone's forward (and restores it after)."""
    from tagmoe_lit.distributed.wrap import without_autocast_cache

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_autocast_cache_enabled())
            return x

    probe = Probe()
    without_autocast_cache(probe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        probe(torch.ones(1))
        assert torch.is_autocast_cache_enabled()
    assert seen == [False]

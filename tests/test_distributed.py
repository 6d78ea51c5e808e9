"""Two CPU processes (gloo) train exactly what one process trains on the same global batch.

Each multi-process run goes through the documented launcher, `torchrun` (`torch.distributed.run
--standalone --nproc_per_node 2 -m tagmoe_lit fit …`), on the tiny model, and is compared with an
in-process single-process run whose batch is both ranks' batches together. Equal losses need three
things: the data modules give rank r of W the global batch's slice r (`data/datamodule.py`), the
training noise of a sample depends on its position in the global batch and not on its rank
(`TagMoEModule._training_draws`), and the load-balancing loss takes expert counts over all ranks
(`moe/losses.py` `global_counts`); the mean of the ranks' losses is then the single-process loss.

Process start-up costs ~15 s each (DESIGN.md pitfall 13), so these are `slow` (`make test-slow`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tagmoe_lit.cli import TagMoECLI
from tagmoe_lit.moe import RoutingStats, load_balancing_loss
from tagmoe_lit.moe.losses import global_counts
from tagmoe_lit.moe.stats import LayerRouting
from tagmoe_lit.parallel import consolidate_checkpoint
from test_configs import BASE, ROOT

STEPS, PER_RANK = 3, 4
TINY_MODEL = [  # base.yaml scaled down: 2 blocks (both MoE) × width 32 on 16 px images
    "--model.backbone.init_args.num_layers", "2",
    "--model.backbone.init_args.num_attention_heads", "2",
    "--model.backbone.init_args.attention_head_dim", "16",
    "--model.backbone.init_args.axes_dims_rope", "[4, 6, 6]",
    "--model.warmup_steps", "1",
    "--data.image_size", "16",
]
TINY = [
    *TINY_MODEL,
    "--trainer.max_steps", str(STEPS),
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.limit_val_batches", "0",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]
FSDP2 = ["--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}',
         "--model.activation_checkpointing", "true"]
KNOCKOUT = ["--trainer.callbacks+=test_distributed.Knockout"]  # experts 1-3 of the first MoE layer idle


class LossRecorder(L.Callback):
    """Writes each rank's per-step training loss and batch size to `<dir>/losses_rank<r>.json`."""

    def __init__(self, dir: str):
        self.dir, self.rows = Path(dir), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append({"step": trainer.global_step, "loss": outputs["loss"].item(), "batch": len(batch["index"])})

    def on_train_end(self, trainer, pl_module) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


class Knockout(L.Callback):
    """Experts 1-3 of the first MoE layer never receive a token: idle experts must not hang a rank."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.moe_layers[0].knockout((1, 2, 3))


def common(tmp: Path, batch: int) -> list[str]:
    return ["--config", str(BASE), *TINY, "--data.batch_size", str(batch),
            "--trainer.default_root_dir", str(tmp), "--trainer.logger.init_args.save_dir", str(tmp),
            "--trainer.callbacks+=test_distributed.LossRecorder", "--trainer.callbacks.dir", str(tmp / "losses")]


def single(tmp: Path, *extra: str) -> TagMoECLI:
    """One process, both ranks' samples in one batch."""
    return TagMoECLI(args=["fit", *common(tmp, 2 * PER_RANK), *extra])


def torchrun(tmp: Path, *extra: str) -> float:
    """Two processes via torchrun; returns the wall time in seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tagmoe_lit", "fit", *common(tmp, PER_RANK), "--trainer.devices", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return time.perf_counter() - start


def losses(tmp: Path, ranks: int) -> list[float]:
    """Per-step loss averaged over ranks (equal batch sizes: the global batch's mean)."""
    per_rank = [json.loads((tmp / "losses" / f"losses_rank{r}.json").read_text()) for r in range(ranks)]
    assert all(len(rows) == STEPS and {row["batch"] for row in rows} == {2 * PER_RANK // ranks} for rows in per_rank)
    return [sum(rows[i]["loss"] for rows in per_rank) / ranks for i in range(STEPS)]


def last_weights(tmp: Path) -> dict[str, torch.Tensor]:
    path = next(tmp.glob("**/checkpoints/last.ckpt"))
    if path.is_dir():
        path = consolidate_checkpoint(path, tmp / "consolidated.ckpt")
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def assert_same_run(one: Path, two: Path) -> float:
    """Same per-step losses (1e-5) and final weights; returns the largest loss difference."""
    a, b = losses(one, 1), losses(two, 2)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert diff < 1e-5, f"single {a} vs two ranks {b}"
    wa, wb = last_weights(one), last_weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    return diff


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


def test_meta_init_allocates_nothing_and_trains_after_per_module_materialization():
    """As FSDP1 materializes (each module `to_empty(recurse=False)`, which never reaches the backbone
    wrapper's own RoPE repair): the module rebuilds the RoPE tables at its first forward (pitfall 17)
    and zeroes the expert counts when training starts."""
    from conftest import tiny_batch, tiny_module

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

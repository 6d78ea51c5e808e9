"""`FSDP2Strategy`: Lightning's `ModelParallelStrategy` carrying how the kit shards the model.

FSDP1's options live in `trainer.strategy` (Lightning's `FSDPStrategy`); this keeps FSDP2's there
too, so a strategy overlay holds every parallelism setting and the model config holds none. Any
`ModelParallelStrategy` works: a plain one shards with the defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from lightning.pytorch.strategies import ModelParallelStrategy


@dataclass(frozen=True)
class FSDP2Options:
    """How `distributed.fsdp2.parallelize` wraps the model (see its docstring)."""

    activation_checkpointing: bool = False
    hybrid_shard: bool = False
    reshard_after_forward: bool = True
    param_dtype: str | None = None
    expert_parallel_size: int = 1


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard` per transformer block, then the root) with the kit's sharding options."""

    def __init__(
        self,
        activation_checkpointing: bool = False,
        hybrid_shard: bool = False,
        reshard_after_forward: bool = True,
        param_dtype: Literal["bfloat16"] | None = None,
        expert_parallel_size: int = 1,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(seconds=1800),
    ):
        """
        Args:
            activation_checkpointing: recompute each transformer block in backward (`checkpoint_wrapper`
                on every block before `fully_shard`).
            hybrid_shard: shard within a node and replicate across nodes (HSDP, over Lightning's
                nodes × devices mesh) instead of sharding over all ranks.
            reshard_after_forward: free gathered parameters after forward (ZeRO-3); false keeps them
                to backward (more memory, one all-gather less per block).
            param_dtype: bfloat16 gathers parameters in bf16 (half the all-gather traffic and gathered
                memory; gradients still reduced in fp32, routers gathered in fp32); null gathers the
                fp32 parameters as stored.
            expert_parallel_size: split every MoE layer's experts over this many consecutive ranks
                and send tokens to their expert's rank with all_to_all (`distributed.expert_parallel`);
                1: every rank holds (its FSDP shard of) all experts. Must divide the world size and E.
            data_parallel_size: Lightning's first mesh dim (default: the number of nodes).
            tensor_parallel_size: Lightning's second mesh dim (default: devices per node); TAG-MoE has no
                tensor parallelism, so every rank is a data-parallel rank.
            save_distributed_checkpoint: save a sharded directory (consolidate it with
                `python -m tagmoe_lit consolidate`); false gathers one full file on rank 0.
            process_group_backend: nccl on GPU, gloo on CPU by default.
            timeout: collective timeout.
        """
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend, timeout)
        self.fsdp2 = FSDP2Options(activation_checkpointing, hybrid_shard, reshard_after_forward, param_dtype,
                                   expert_parallel_size)

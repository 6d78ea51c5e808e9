"""Everything distributed, kept out of the model and the LightningModule (torchtitan's split).

- `fsdp2.py`       — `parallelize`: activation checkpointing, then `fully_shard` per block, then the root.
- `materialize.py` — meta-device builds allocated where the strategy placed them, with declared inits.
- `weights.py`     — starting weights (`model.init_weights`) loaded into a built, possibly sharded model:
                     rank 0 reads and checks, every rank receives its shards.
- `wrap.py`        — the one place where features that wrap the model from outside are applied.
- `checkpoint.py`  — one `.ckpt` file from a sharded checkpoint directory (`python -m tagmoe_lit consolidate`).
"""

from tagmoe_lit.distributed.checkpoint import consolidate_checkpoint
from tagmoe_lit.distributed.fsdp2 import parallelize, shard_mesh
from tagmoe_lit.distributed.materialize import INITS, materialize_, uninitializable
from tagmoe_lit.distributed.strategy import FSDP2Options, FSDP2Strategy

__all__ = ["FSDP2Options", "FSDP2Strategy", "INITS", "consolidate_checkpoint", "materialize_", "parallelize", "shard_mesh", "uninitializable"]

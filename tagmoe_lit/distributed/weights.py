"""Starting weights (`model.init_weights`) for a built, possibly meta-built and sharded, module.

Loaded once, at the first loop start: Lightning has materialized, sharded and (with `--ckpt_path`)
restored the module by then under every strategy (FSDP ones restore after `on_fit_start`), so a
checkpoint wins and no step or validation sees other weights.

Unsharded (one device, DDP) every rank reads the files and loads them with `load_state_dict`.
Under FSDP2 `set_model_state_dict` writes the full tensors into the shards: only rank 0 reads and
checks (its verdict is shared, so every rank raises the same error) and each tensor is broadcast in
turn. FSDP1 is refused: `set_model_state_dict` fills keys the source lacks (VAE, routers, head)
with FSDP1's flat local shards, which its full-state-dict load then rejects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from tagmoe_lit.convert.load import pretrained_tensors
from tagmoe_lit.identity import COMPONENTS

if TYPE_CHECKING:
    from tagmoe_lit.module import TagMoEModule
    from tagmoe_lit.protocols import Backbone


class StartingWeights:
    """The module's `init_weights`: checked early, loaded once, never over a restored checkpoint."""

    def __init__(self, path: str | None):
        self.path = path
        self.settled = False  # considered (loaded, or skipped for a checkpoint)
        self.full_shapes: dict[str, torch.Tensor] = {}  # component keys → meta tensors of the unsharded shapes

    def check_exists(self) -> None:
        if self.path is not None and not Path(self.path).exists():
            raise FileNotFoundError(f"model.init_weights {self.path} does not exist; point it at a local Qwen-Image "
                                    "folder or a `convert` directory, or set it to null.")

    def refuse_dropped(self, backbone: Backbone) -> None:
        """A meta build without `init_weights` has no FFN weights to read or to add upcycling noise to."""
        if self.path is not None:
            return
        if backbone.pretrained_path is not None:
            raise ValueError(f"model.meta_init builds the backbone without weights, so backbone pretrained_path "
                             f"{backbone.pretrained_path} would be ignored; set model.init_weights to the same folder "
                             "to load it after materializing.")
        if backbone.moe_layers and (backbone.upcycling.noise or backbone.upcycling.reinit):
            raise ValueError("model.meta_init from scratch has no dense FFN weights, so upcycle_noise / upcycle_reinit "
                             "would be ignored; set model.init_weights to the dense release to upcycle, or set them to 0.")

    def record_shapes(self, module: nn.Module) -> None:
        """The unsharded keys and shapes, for checking the files once the parameters are sharded."""
        self.full_shapes = {k: torch.empty_like(t, device="meta") for k, t in module.state_dict().items()
                            if k.split(".", 1)[0] in COMPONENTS}

    def settle(self, module: TagMoEModule) -> None:
        """Load at the first loop start, unless the trainer restores a checkpoint (then say so)."""
        if self.path is None or self.settled:
            return
        self.settled = True
        ckpt_path = module.trainer.ckpt_path
        if ckpt_path is not None:
            rank_zero_info(f"model.init_weights {self.path} is not loaded: the run restores {ckpt_path}.")
            return
        left = self.load(module, module.trainer.model)
        rank_zero_info(f"Loaded model.init_weights {self.path}" + (f"; kept as initialized: {', '.join(left)}." if left else "."))

    def load(self, module: TagMoEModule, root: nn.Module) -> list[str]:
        """Load into the built (materialized) `module`, whose wrapped form is `root`; every key checked.
        Returns the parts left as built (e.g. routers when the source is a dense release)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.tensor import DTensor

        if self.path is None:
            raise ValueError("load_init_weights needs model.init_weights; set it to a Qwen-Image folder or a `convert` directory.")
        self.check_exists()
        if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            raise ValueError("load_init_weights needs materialized weights but the model is on the meta device; run it under "
                             "a Trainer, or call tagmoe_lit.distributed.materialize_ on each component first.")
        if isinstance(root, FullyShardedDataParallel):
            raise ValueError("model.init_weights is not supported under FSDPStrategy (FSDP1); start from released weights "
                             "with FSDP2 (experiments/strategy/fsdp2.yaml), then resume FSDP1 from its checkpoint.")
        fsdp2 = any(isinstance(p, DTensor) for p in module.parameters())
        broadcast = fsdp2 and dist.is_initialized() and dist.get_world_size() > 1
        tensors, left, error = {}, [], None
        if not broadcast or dist.get_rank() == 0:
            try:
                tensors, left = pretrained_tensors(module, self.path, self.full_shapes, module.backbone.upcycling)
            except Exception as e:  # any failure (corrupt safetensors, OOM, …) is raised on every rank below:
                error = e           # a rank that raised alone would leave the others waiting in the broadcast
        if broadcast:
            verdict = [left, error]
            dist.broadcast_object_list(verdict, src=0)
            left, error = verdict
        if error is not None:
            raise error
        if fsdp2:
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=False)  # keys checked above
            set_model_state_dict(root, tensors, options=options)
        else:
            module.load_state_dict(tensors, strict=False)
        return left

"""LoRA (Hu et al. 2021) on the MM-DiT, experts included, applied from outside the model.

`apply_lora(backbone, lora)` attaches low-rank adapters to the targets of a frozen backbone (with
`trainable: moe_tail`, of its frozen dense part while the MoE tail trains whole):

- `attention`: every block's q/k/v/out projections of both streams;
- `ffn`: the dense FFN Linears (text stream everywhere, image stream outside the MoE blocks);
- `router`: the MoE routers' gate Linears;
- `experts`: one low-rank pair per expert on each of w1 [E, D, H] and w2 [E, H, D].

A Linear keeps its weight and its name; its adapter is a child module `lora` (A [r, in],
B [out, r], peft's layout) whose output a forward hook adds: y = W x + (α/r)·B A dropout(x). An
expert adapter (`ExpertLoRA`) is a child of `StackedExperts`, which asks it for its weights
(`StackedExperts.weights`): w + (α/r)·A_e B_e per expert, one [E, D, H] tensor per forward, so every
dispatch backend runs LoRA unchanged (input dropout does not apply to merged weights: expert
adapters have none). So base weight names stay those of the model without LoRA (`init_weights`,
`convert` and the shape checks read them), and adapters are extra keys (`….lora.A`, `….lora.B`).

B starts at zero (`reset_parameters`, also what meta-device materialization runs), so a fresh
adapter changes nothing. Dropout draws from generators seeded per step, sample and adapter
(`seed_dropout`), never from the global RNG: a resumed run draws the same masks, an activation
checkpoint's recompute draws the forward's, and a sample's mask does not depend on which rank holds it. `merge_lora_` folds adapters into the weights and
removes them; `adapter_state` / `save_adapter` / `load_adapter` write and read adapter-only
checkpoints in peft's format (Linear adapters under peft's names, expert adapters under the kit's).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tagmoe_lit.moe.experts import StackedExperts
from tagmoe_lit.moe.layer import MoELayer

TARGETS = ("attention", "ffn", "router", "experts")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class LoRA:
    """LoRA settings (`model.lora`); part of the checkpoint identity."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank={self.rank} must be at least 1")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            problems.append(f"targets {list(self.targets)} must be a non-empty list of {list(TARGETS)}")
        if problems:
            raise ValueError("model.lora: " + "; ".join(problems) + ".")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LinearLoRA(nn.Module):
    """The adapter of one Linear: Δy = (α/r)·B A dropout(x)."""

    def __init__(self, linear: nn.Linear, lora: LoRA, index: int):
        super().__init__()
        dtype = linear.weight.dtype if linear.weight.is_floating_point() else torch.float32  # QLoRA: bnb's packed weight
        kw = {"device": linear.weight.device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(lora.rank, linear.in_features, **kw))
        self.B = nn.Parameter(torch.empty(linear.out_features, lora.rank, **kw))
        self.scale, self.dropout, self.index = lora.scale, lora.dropout, index
        self.seeds: list[int] | None = None  # one per sample of the batch, set each step by `seed_dropout`
        self.hook = None  # the Linear's forward hook that adds this adapter (removed by `merge_lora_`)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """peft's init: A as nn.Linear's weight, B zero (a fresh adapter is the identity)."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            x = x * self._keep(x) / (1 - self.dropout)
        return nn.functional.linear(nn.functional.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """The dropout mask, drawn per sample from the sample's step seed: the same whichever rank or
        micro-batch holds the sample, and again in an activation checkpoint's recompute. Every input
        here is batch-major ([B, …], or [B·T, D] for the routers), so sample b owns the b-th slice."""
        if self.seeds is None or x.shape[0] % len(self.seeds):
            raise RuntimeError("LoRA dropout needs the batch's per-sample seeds (lora.seed_dropout) before a training forward.")
        per_sample = x.numel() // len(self.seeds)
        masks = [torch.rand(per_sample, generator=torch.Generator(device=x.device).manual_seed(
                 (seed + self.index * 0x9E3779B97F4A7C15) % 2**63), device=x.device) for seed in self.seeds]
        return (torch.stack(masks) >= self.dropout).view_as(x)

    def delta(self) -> torch.Tensor:
        """ΔW [out, in] = (α/r)·B A."""
        return (self.B @ self.A) * self.scale


class ExpertLoRA(nn.Module):
    """Per-expert low-rank updates: w1_e + (α/r)·A1_e B1_e, w2_e + (α/r)·A2_e B2_e."""

    def __init__(self, experts: StackedExperts, lora: LoRA):
        super().__init__()
        E, D, H, r = experts.num_experts, experts.dim, experts.hidden, lora.rank
        kw = {"device": experts.w1_EDH.device, "dtype": experts.w1_EDH.dtype}
        self.A1_EDR, self.B1_ERH = nn.Parameter(torch.empty(E, D, r, **kw)), nn.Parameter(torch.empty(E, r, H, **kw))
        self.A2_EHR, self.B2_ERD = nn.Parameter(torch.empty(E, H, r, **kw)), nn.Parameter(torch.empty(E, r, D, **kw))
        self.scale = lora.scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A as a Linear's weight per expert (fan-in D, resp. H), B zero."""
        for a, fan_in in ((self.A1_EDR, self.A1_EDR.shape[1]), (self.A2_EHR, self.A2_EHR.shape[1])):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(a, -bound, bound)
        nn.init.zeros_(self.B1_ERH)
        nn.init.zeros_(self.B2_ERD)

    def deltas(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.bmm(self.A1_EDR, self.B1_ERH) * self.scale, torch.bmm(self.A2_EHR, self.B2_ERD) * self.scale

    def merged(self, w1_EDH: torch.Tensor, w2_EHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d1, d2 = self.deltas()
        return w1_EDH + d1.to(w1_EDH.dtype), w2_EHD + d2.to(w2_EHD.dtype)


def _add_lora(linear: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + linear.lora(args[0]).to(out.dtype)


def _targets(backbone: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear or StackedExperts the targets name, in module order."""
    found = []
    for name, module in backbone.named_modules():
        if isinstance(module, StackedExperts):
            if "experts" in targets:
                found.append((name, module))
            continue
        if not isinstance(module, nn.Linear) or "transformer_blocks." not in name:
            continue
        tail = name.split(".attn.", 1)[1] if ".attn." in name else None
        in_router = ".router." in name
        in_ffn = (".img_mlp.net." in name or ".txt_mlp.net." in name) and not in_router
        if (("attention" in targets and tail in ATTENTION) or ("router" in targets and in_router)
                or ("ffn" in targets and in_ffn)):
            found.append((name, module))
    return found


def apply_lora(backbone: nn.Module, lora: LoRA) -> list[nn.Module]:
    """Attach adapters to the targets (what else learns is `trainable.settle_parameters`' call: the
    whole backbone frozen, or all but its MoE tail); returns the adapters in module order."""
    found = _targets(backbone, list(lora.targets))
    if "experts" in lora.targets and not any(isinstance(m, StackedExperts) for _, m in found):
        raise ValueError("model.lora targets experts, but the backbone has no MoE layers; drop 'experts' from targets.")
    if "router" in lora.targets and not any(isinstance(m, MoELayer) for m in backbone.modules()):
        raise ValueError("model.lora targets router, but the backbone has no MoE layers; drop 'router' from targets.")
    adapters = []
    for index, (_, module) in enumerate(found):
        if isinstance(module, StackedExperts):
            module.lora = ExpertLoRA(module, lora)
        else:
            module.lora = LinearLoRA(module, lora, index)
            module.lora.hook = module.register_forward_hook(_add_lora)
        adapters.append(module.lora)
    return adapters


def adapters(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if isinstance(m, (LinearLoRA, ExpertLoRA))]


def seed_dropout(root: nn.Module, sample_seeds: list[int]) -> None:
    """Give every Linear adapter the batch's dropout seeds, one per sample, from the samples' step
    seeds (`Draws.seeds`; each adapter mixes in its index)."""
    from tagmoe_lit.objective import step_seed

    linear = [a for a in adapters(root) if isinstance(a, LinearLoRA) and a.dropout > 0]
    seeds = [step_seed(seed, "lora") for seed in sample_seeds] if linear else []
    for adapter in linear:
        adapter.seeds = seeds


@torch.no_grad()
def merge_lora_(root: nn.Module) -> int:
    """Fold every adapter into its weights and remove it (the forward is unchanged); returns how many."""
    merged = 0
    for module in list(root.modules()):
        adapter = getattr(module, "lora", None)
        if isinstance(adapter, ExpertLoRA):
            d1, d2 = adapter.deltas()
            module.w1_EDH += d1.to(module.w1_EDH.dtype)
            module.w2_EHD += d2.to(module.w2_EHD.dtype)
        elif isinstance(adapter, LinearLoRA):
            if not module.weight.is_floating_point():
                raise ValueError("LoRA adapters cannot be merged into 8/4-bit weights (QLoRA); load the model without "
                                 "quantize_frozen (--model.quantize_frozen null) to merge them.")
            module.weight += adapter.delta().to(module.weight.dtype)
            adapter.hook.remove()
        else:
            continue
        module.lora = None
        merged += 1
    return merged


# -- adapter-only checkpoints in peft's format ----------------------------------------------------
PEFT_PREFIX = "base_model.model."


def adapter_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor under peft's names (`…to_q.lora_A.weight`; expert adapters keep the kit's
    `…experts.lora.A1_EDR`), keys relative to `root` (the transformer)."""
    return {k: v.detach().contiguous() for k, v in _adapter_parameters(root).items()}


def save_adapter(root: nn.Module, lora: LoRA, dst: str | Path, base: str | None = None) -> list[str]:
    """Write `adapter_model.safetensors` and `adapter_config.json` (peft's LoraConfig fields) atomically."""
    from safetensors.torch import save_file

    from tagmoe_lit.convert.files import staged_dir

    state = adapter_state(root)
    linear = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in state if ".lora_A." in k})
    config = {
        "peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
        "target_modules": linear, "base_model_name_or_path": base, "task_type": None, "init_lora_weights": True,
        "tagmoe": asdict(lora),  # the kit's record: which targets, expert adapters included
    }
    with staged_dir(dst, overwrite=True) as tmp:
        save_file(state, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return [ADAPTER_WEIGHTS, ADAPTER_CONFIG]


@torch.no_grad()
def load_adapter(root: nn.Module, lora: LoRA, src: str | Path) -> None:
    """Load an adapter directory into `root`'s adapters, every key checked and the settings compared."""
    from safetensors.torch import load_file

    from tagmoe_lit.convert.files import key_problems
    from tagmoe_lit.identity import CheckpointMismatchError

    src = Path(src)
    if not (src / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{src} has no {ADAPTER_CONFIG}: it is not an adapter directory (`convert export --adapter_only`).")
    saved = json.loads((src / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("tagmoe")
    if saved != asdict(lora):
        raise CheckpointMismatchError(f"{src} holds adapters made with model.lora {saved}, but this model has {asdict(lora)}; "
                                      "set model.lora as the adapter was trained.")
    tensors, mine = load_file(src / ADAPTER_WEIGHTS), adapter_state(root)
    problems = key_problems("adapter", tensors, mine)
    if problems:
        raise CheckpointMismatchError(f"{src} does not fit this model: " + "; ".join(problems) + ".")
    for key, target in _adapter_parameters(root).items():
        target.copy_(tensors[key])


def _adapter_parameters(root: nn.Module) -> dict[str, torch.Tensor]:
    """The live adapter parameters under `adapter_state`'s names."""
    out = {}
    for name, module in root.named_modules():
        adapter = getattr(module, "lora", None)
        if isinstance(adapter, LinearLoRA):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"], out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = adapter.A, adapter.B
        elif isinstance(adapter, ExpertLoRA):
            out.update({f"{PEFT_PREFIX}{name}.lora.{k}": v for k, v in adapter.named_parameters()})
    return out

"""The official TAG-MoE release (ICTMCG/TAG-MoE) ↔ this kit's state dict: one key map, both ways.

Legend: E experts, D model dim, H expert hidden (4D), S tag-embedding size (512).

The release's transformer is diffusers' `QwenImageTransformer2DModel` whose `img_mlp` in its last
blocks (50–59 of 60) is a MegaBlocks `dMoE`. Per MoE block `transformer_blocks.{i}.img_mlp.`:

    release (dMoE)              shape      kit (MoELayer)         shape      rule
    router.layer.weight         [E, D]     router.gate.weight     [E, D]     copy
    experts.mlp.w1              [E·H, D]   experts.w1_EDH         [E, D, H]  view(E, H, D), transpose(1, 2)
    experts.mlp.w2              [E·H, D]   experts.w2_EHD         [E, H, D]  view(E, H, D)
    experts.bias                [D]        —                                 dropped

    tag_embedding.weight        [18, S]    tag_embedder.table.weight          copy   (optional)
    router_head.net.{0,2,4}.*              head.net.{0,2,4}.*                 copy   (optional)

Expert e uses rows e·H … (e+1)·H of w1 and w2 and computes `gelu_tanh(x @ w1_eᵀ) @ w2_e`, which is
`StackedExperts`' `gelu_tanh(x @ w1_EDH[e]) @ w2_EHD[e]`. dMoE is built with `bias=True`, so it
returns `(out, bias)`; the release's block keeps element 0 only, so `experts.bias` never reaches
the output: dropping it changes nothing, and `OfficialInfo.dropped` says what was dropped. Every
other key (the dense diffusers keys) passes through unchanged. Kit keys here are those of a
`TagMoEModule` with the `backbone.transformer.` prefix removed from the transformer's keys (the
layout of `tagmoe_lit.convert.files`). Pure functions: no files, no models.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

from tagmoe_lit.tags import TagSchema

SCHEMA = "official18"  # the release's 18-tag vocabulary
_BLOCK_FFN = re.compile(r"^transformer_blocks\.(\d+)\.img_mlp\.(.+)$")
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
# (release name, kit name) under `transformer_blocks.{i}.img_mlp.`
ROUTER = ("router.layer.weight", "router.gate.weight")
W1 = ("experts.mlp.w1", "experts.w1_EDH")
W2 = ("experts.mlp.w2", "experts.w2_EHD")
EXPERT_BIAS = "experts.bias"  # release only; discarded by the release's own forward
TAG = ("tag_embedding.weight", "tag_embedder.table.weight")
HEAD = ("router_head.", "head.")
HEAD_PARAMS = tuple(f"net.{j}.{p}" for j in (0, 2, 4) for p in ("weight", "bias"))


@dataclass
class OfficialInfo:
    """What a release state dict holds (written to `tagmoe_config.json` by `convert official`)."""

    num_layers: int
    moe_blocks: list[int]
    num_experts: int
    dim: int
    hidden: int
    tag_embedding: bool
    head: bool
    dropped: list[str] = field(default_factory=list)  # release keys with no kit counterpart
    dropped_max_abs: float = 0.0  # largest |value| among them: what the release's forward ignored
    from_base: int = 0  # dense keys taken from `base`

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _check(problems: list[str], key: str, t: torch.Tensor, want: list[int], rule: str) -> None:
    if _shape(t) != want:
        problems.append(f"{key} has shape {_shape(t)} but {rule} requires {want}")


def _moe_parts(state_dict: dict[str, torch.Tensor], names: set[str]) -> dict[int, dict[str, str]]:
    """{block: {suffix under img_mlp: full key}} for blocks whose img_mlp holds any of `names`."""
    parts: dict[int, dict[str, str]] = {}
    for key in state_dict:
        m = _BLOCK_FFN.match(key)
        if m:
            parts.setdefault(int(m[1]), {})[m[2]] = key
    return {i: p for i, p in sorted(parts.items()) if names & set(p)}


def _head_problems(state_dict: dict, prefix: str, E: int, S: int | None, problems: list[str]) -> bool:
    """Check an optional prediction head Linear(E→h)–GELU–Linear(h→h)–GELU–Linear(h→S); True if present."""
    keys = {k[len(prefix) :] for k in state_dict if k.startswith(prefix)}
    if not keys:
        return False
    problems += [f"{prefix}{k} is missing (the head has net.0, net.2, net.4 weights and biases)" for k in HEAD_PARAMS if k not in keys]
    problems += [f"{prefix}{k} is not part of the prediction head" for k in sorted(keys - set(HEAD_PARAMS))]
    if problems or f"{prefix}net.0.weight" not in state_dict:
        return True
    h = state_dict[f"{prefix}net.0.weight"].shape[0]
    S = S if S is not None else state_dict[f"{prefix}net.4.weight"].shape[0]
    want = {"net.0.weight": [h, E], "net.0.bias": [h], "net.2.weight": [h, h], "net.2.bias": [h], "net.4.weight": [S, h], "net.4.bias": [S]}
    for k, shape in want.items():
        _check(problems, prefix + k, state_dict[prefix + k], shape, f"a head from E={E} experts to S={S}")
    return True


def from_official(
    state_dict: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], OfficialInfo]:
    """Release state dict → (kit state dict, what was found).

    `base` (a dense Qwen-Image transformer state dict) fills the dense keys the release does not
    hold, for a release that ships only its fine-tuned or MoE weights; the base's dense `img_mlp`
    of the MoE blocks is left out. Raises one ValueError listing every missing key and wrong shape.
    """
    release_names = {ROUTER[0], W1[0], W2[0], EXPERT_BIAS}
    blocks = _moe_parts(state_dict, release_names)
    if not blocks:
        raise ValueError(
            f"No MegaBlocks dMoE image FFN found: expected keys such as transformer_blocks.50.img_mlp.{ROUTER[0]}; "
            "point --src at the TAG-MoE release's transformer weights."
        )
    problems: list[str] = []
    # E and D from the first 2-D router, H from the first 2-D w1; every block is checked against them
    routers = [state_dict[p[ROUTER[0]]] for p in blocks.values() if ROUTER[0] in p and state_dict[p[ROUTER[0]]].dim() == 2]
    w1s = [state_dict[p[W1[0]]] for p in blocks.values() if W1[0] in p and state_dict[p[W1[0]]].dim() == 2]
    E, D = _shape(routers[0]) if routers else (0, 0)
    H = w1s[0].shape[0] // E if E and w1s else 0
    if not E:
        problems.append(f"no block has a 2-D {ROUTER[0]} [E, D], so the expert count is unknown")
    for i, parts in blocks.items():
        pre = f"transformer_blocks.{i}.img_mlp."
        problems += [f"{pre}{name} is missing" for name in (ROUTER[0], W1[0], W2[0]) if name not in parts]
        problems += [f"{pre}{name} is not part of a dMoE layer" for name in sorted(set(parts) - release_names)]
        if not E:
            continue
        rules = {ROUTER[0]: [E, D], W1[0]: [E * H, D], W2[0]: [E * H, D], EXPERT_BIAS: [D]}
        for name, want in rules.items():
            if name in parts:
                _check(problems, pre + name, state_dict[pre + name], want, f"E={E} experts of {D}→{H}")
    S = None
    if TAG[0] in state_dict:
        S = state_dict[TAG[0]].shape[-1]
        num_tags = TagSchema.load(SCHEMA).num_tags
        _check(problems, TAG[0], state_dict[TAG[0]], [num_tags, S], f"the {SCHEMA} schema's {num_tags} tags")
    problems += [f"{k} is not part of the tag embedding" for k in state_dict if k.startswith("tag_embedding.") and k != TAG[0]]
    has_head = _head_problems(state_dict, HEAD[0], E, S, problems)
    if problems:
        raise ValueError("The state dict does not match the TAG-MoE release layout: " + "; ".join(problems) + ".")

    moe_ffn = {f"transformer_blocks.{i}.img_mlp." for i in blocks}
    dense_from_base = {k: v for k, v in (base or {}).items() if k not in state_dict and not any(k.startswith(p) for p in moe_ffn)}
    out: dict[str, torch.Tensor] = dict(dense_from_base)
    dropped: list[str] = []
    for key, t in state_dict.items():
        m = _BLOCK_FFN.match(key)
        name = m[2] if m and int(m[1]) in blocks else None
        if name == ROUTER[0]:
            out[key.replace(ROUTER[0], ROUTER[1])] = t
        elif name == W1[0]:
            out[key.replace(W1[0], W1[1])] = t.view(E, H, D).transpose(1, 2).contiguous()  # (E·H, D) → (E, D, H)
        elif name == W2[0]:
            out[key.replace(W2[0], W2[1])] = t.view(E, H, D)  # (E·H, D) → (E, H, D)
        elif name == EXPERT_BIAS:
            dropped.append(key)
        elif key == TAG[0]:
            out[TAG[1]] = t
        elif key.startswith(HEAD[0]):
            out[HEAD[1] + key[len(HEAD[0]) :]] = t
        else:
            out[key] = t
    layers = [int(m[1]) for k in out if (m := _BLOCK.match(k))]
    info = OfficialInfo(
        num_layers=max(layers) + 1,
        moe_blocks=list(blocks),
        num_experts=E,
        dim=D,
        hidden=H,
        tag_embedding=S is not None,
        head=has_head,
        dropped=dropped,
        dropped_max_abs=max((state_dict[k].abs().max().item() for k in dropped), default=0.0),
        from_base=len(dense_from_base),
    )
    return out, info


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kit state dict → release layout (the inverse of `from_official`; `experts.bias` written as zeros).

    Only what a dMoE holds can be written: a `LinearRouter` gate and bias-free experts, a
    `SumTagEmbedder` table and an `MLPHead`. Raises one ValueError listing everything else.
    """
    kit_names = {ROUTER[1], W1[1], W2[1]}
    blocks = _moe_parts(state_dict, kit_names)
    problems = []
    for i, parts in blocks.items():
        pre = f"transformer_blocks.{i}.img_mlp."
        problems += [f"{pre}{name} has no dMoE counterpart" for name in sorted(set(parts) - kit_names)]
        problems += [f"{pre}{name} is missing" for name in sorted(kit_names - set(parts))]
    problems += [f"{k} has no release counterpart (the release's tag embedding is one table)" for k in state_dict if k.startswith("tag_embedder.") and k != TAG[1]]
    problems += [f"{k} has no release counterpart (the release's head is MLPHead's net)" for k in state_dict if k.startswith(HEAD[1]) and k[len(HEAD[1]) :] not in HEAD_PARAMS]
    if problems:
        raise ValueError(
            "The model cannot be written in the release's dMoE layout (it needs a LinearRouter, expert_bias: false, "
            "SumTagEmbedder and MLPHead): " + "; ".join(problems) + "; export with --layout kit instead."
        )
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        m = _BLOCK_FFN.match(key)
        name = m[2] if m and int(m[1]) in blocks else None
        if name == ROUTER[1]:
            out[key.replace(ROUTER[1], ROUTER[0])] = t
        elif name == W1[1]:
            E, D, H = t.shape
            out[key.replace(W1[1], W1[0])] = t.transpose(1, 2).reshape(E * H, D)
            out[key.replace(W1[1], EXPERT_BIAS)] = t.new_zeros(D)
        elif name == W2[1]:
            out[key.replace(W2[1], W2[0])] = t.reshape(-1, t.shape[-1])
        elif key == TAG[1]:
            out[TAG[0]] = t
        elif key.startswith(HEAD[1]):
            out[HEAD[0] + key[len(HEAD[1]) :]] = t
        else:
            out[key] = t
    return out

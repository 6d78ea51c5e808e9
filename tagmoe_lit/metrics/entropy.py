"""Shannon entropy (nats) of probability vectors: the one formula the MoE layer, the callbacks and
the specialization metric share.

Plain PyTorch, no Lightning: `tagmoe_lit/moe/` imports it.
"""

from __future__ import annotations

import torch


def entropy(p: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """-Σ p·log p along `dim` (nats), in `p`'s dtype; `p` has `dim` removed.

    Inside the log `p` is clamped to at least `eps`, so a zero probability adds 0 (0·log eps)
    instead of NaN (0·log 0). `eps=0` takes the log of `p` itself: then `p` must hold no zeros
    (drop them first, as `specialization.nmi` does), and tiny probabilities keep their exact
    p·log p instead of p·log eps.
    """
    return -(p * p.clamp_min(eps).log()).sum(dim)

"""Task alignment: tag embeddings s, routing signature g, head H, and L_align = 1 − cos(H(g), s)."""

from tagmoe_lit.align.heads import MLPHead
from tagmoe_lit.align.losses import alignment_baselines, alignment_loss
from tagmoe_lit.align.signature import routing_signature
from tagmoe_lit.align.tag_embedder import SumTagEmbedder

__all__ = ["MLPHead", "SumTagEmbedder", "alignment_baselines", "alignment_loss", "routing_signature"]

"""tagmoe_lit: a PyTorch Lightning experiment kit for TAG-MoE (task-aware gating for generative MoE)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`from tagmoe_lit import TagMoEQwenImageTransformer2DModel`, imported on first use (the CLI's
    start stays fast)."""
    if name == "TagMoEQwenImageTransformer2DModel":
        from tagmoe_lit.convert.transformer import TagMoEQwenImageTransformer2DModel

        return TagMoEQwenImageTransformer2DModel
    raise AttributeError(f"module 'tagmoe_lit' has no attribute {name!r}")

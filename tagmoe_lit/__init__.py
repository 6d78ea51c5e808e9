"""tagmoe_lit: a PyTorch Lightning experiment kit for TAG-MoE (task-aware gating for generative MoE)."""

__version__ = "0.1.0"

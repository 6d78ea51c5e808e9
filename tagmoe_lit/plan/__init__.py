"""`python -m tagmoe_lit plan`: a training step's per-rank memory, FLOPs, collectives and time, without a GPU."""

"""Task–expert specialization: normalized mutual information of a task × expert count table.

Counts are tokens: entry (t, e) = number of task-t tokens whose top-1 expert is e. NMI normalizes
I(task; expert) by the arithmetic mean of the two entropies (scikit-learn's default), so 0 means
routing ignores the task and 1 means the task fixes the expert and vice versa. A baseline with
the samples' task labels shuffled shows what the same table size gives by chance.
"""

from __future__ import annotations

import torch

from tagmoe_lit.metrics.entropy import entropy


def nmi(table_TE: torch.Tensor) -> float:
    """NMI of a non-negative contingency table (rows: tasks, columns: experts)."""
    p = table_TE.double() / table_TE.sum().clamp_min(1e-12)
    pt, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    mi = (p[nz] * (p[nz] / (pt @ pe)[nz]).log()).sum()
    # marginals without their empty rows / columns, exact logs (eps=0): 0 log 0 = 0 by omission
    denom = 0.5 * (entropy(pt[pt > 0], eps=0.0) + entropy(pe[pe > 0], eps=0.0))
    return float(mi / denom) if denom > 0 else 0.0


def task_expert_table(task_B: torch.Tensor, top1_counts_BE: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """Sum per-sample top-1 token counts [B, E] into a [num_tasks, E] table."""
    table = torch.zeros(num_tasks, top1_counts_BE.shape[1], dtype=torch.float64)
    return table.index_add_(0, task_B.cpu(), top1_counts_BE.cpu().double())


def shuffled_nmi(task_B: torch.Tensor, top1_counts_BE: torch.Tensor, num_tasks: int, seed: int = 0) -> float:
    """NMI after a seeded permutation of the samples' task labels: the chance level."""
    perm = torch.randperm(task_B.numel(), generator=torch.Generator().manual_seed(seed))
    return nmi(task_expert_table(task_B[perm.to(task_B.device)], top1_counts_BE, num_tasks))

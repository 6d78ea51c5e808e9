"""The step `plan` fakes, run for real on CPU processes: rank 0's memory from the allocator.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tagmoe_lit.plan.real OUT.json [config args]
    python -m tagmoe_lit.plan.real OUT.json [config args]          # one process, no sharding

Each rank builds the module exactly as `plan` does (`tagmoe_lit.plan.step.setup`: the config chain,
stub encoders), shards it with the kit's `wrap_model` over a real gloo process group when there
are several ranks, allocates it for real (`materialize_`), and runs one step: bf16 autocast,
`grouped` experts, loss + backward + optimizer step. Rank 0 writes its parameter bytes and the peak
bytes the step allocated on top of them, read from torch.profiler's memory timeline (the CPU
allocator's own events, not `plan`'s tracker). `tests/test_plan.py` compares the two (docs/plan.md).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile


def allocator_peak(prof: profile) -> int:
    """The most bytes allocated at once during the profile, above what was allocated when it began: the
    running total the CPU allocator reports with each allocation event (`total_allocated`)."""
    from torch._C._profiler import _EventType

    totals, first = [], None
    for event in prof.profiler.kineto_results.experimental_event_tree():
        stack = [event]
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                totals.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
    totals.sort()
    if not totals:
        return 0
    start = totals[0][1] - totals[0][2]  # the total just before the first allocation
    return max(t for _, t, _ in totals) - start


def step_bytes(config_args: list[str]) -> dict[str, int]:
    """Rank 0's parameter bytes and the peak bytes one real step adds (every rank runs this)."""
    from tagmoe_lit.distributed.materialize import materialize_
    from tagmoe_lit.distributed.wrap import wrap_model
    from tagmoe_lit.plan.step import _autocast, _batch, _Step, cuda_step_draws, setup

    world = int(os.environ.get("WORLD_SIZE", "1"))
    s = setup(config_args, world, None, None, 256)
    m = s.module
    m.configure_model()
    parts = [p for p in (m.backbone, m.tag_embedder, m.head) if p is not None]
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        wrap_model(m.backbone, parts[1:], init_device_mesh("cpu", (world,)), s.strategy, meta=False)
    for part in parts:
        materialize_(part, "cpu")
    draws = cuda_step_draws(s)
    batch, optimizer = _batch(s), m.optimizer_factory([p for p in m.parameters() if p.requires_grad])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        with _autocast(s.precision):
            terms = _Step(m)(batch, draws)
        terms["loss"].backward()
        optimizer.step()
    peak = allocator_peak(prof)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in m.backbone.parameters())
    return {"world_size": world, "backbone_parameter_bytes": local, "step_peak_bytes": peak}


def main(argv: list[str]) -> None:
    out, config_args = Path(argv[0]), argv[1:]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    result = step_bytes(config_args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.write_text(json.dumps(result, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

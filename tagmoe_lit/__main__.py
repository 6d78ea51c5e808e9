"""`python -m tagmoe_lit {fit,validate,test,predict,annotate,cache,params,knockout,study,convert} …`.

LightningCLI looks every subcommand up on the Trainer, so the kit's own subcommands are dispatched
here first and the rest go to `TagMoECLI`:

- `annotate`: tag a JSONL manifest (rules or a local Qwen2.5-VL), or compare two annotations
  (`tagmoe_lit/tags/annotators/run.py`);
- `cache`: fill the text-embedding and latent caches for a manifest config ahead of training
  (`tagmoe_lit/data/build_cache.py`);
- `params`: total vs active parameters, full Qwen-Image or a config's backbone (`tagmoe_lit/params.py`);
- `knockout`: `test` with each expert removed from every MoE layer in turn (`tagmoe_lit/knockout.py`);
- `study`: the ablation study — train, test and compare every run of a preset, resumably
  (`tagmoe_lit/study/`);
- `convert`: the official release's weights into the kit (`convert official`) and a checkpoint out
  to a diffusers-style transformer directory (`convert export`) (`tagmoe_lit/convert/`).
"""

import sys


def run(argv: list[str] | None = None) -> object:
    """Dispatch `argv` (default: the command line) to the kit's subcommands or to LightningCLI."""
    given = argv is not None
    argv = argv if given else sys.argv[1:]
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command == "annotate":
        from tagmoe_lit.tags.annotators.run import main as annotate

        return annotate(rest)
    if command == "cache":
        from tagmoe_lit.data.build_cache import main as cache

        return cache(rest)
    if command == "params":
        from tagmoe_lit.params import main as params

        return params(rest)
    if command == "knockout":
        from tagmoe_lit.knockout import main as knockout

        return knockout(rest)
    if command == "study":
        from tagmoe_lit.study.runner import main as study

        return study(rest)
    if command == "convert":
        from tagmoe_lit.convert.cli import main as convert

        return convert(rest)
    from tagmoe_lit.cli import main

    return main(argv if given else None)  # None: LightningCLI reads sys.argv itself (and does not warn)


if __name__ == "__main__":
    try:
        run()
    finally:
        import torch.distributed as dist

        # gloo/NCCL threads that outlive a process group nobody destroyed can abort the interpreter at
        # exit ("terminate called without an active exception") after a run that succeeded
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

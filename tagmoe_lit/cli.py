"""`TagMoECLI`: LightningCLI with omegaconf interpolation and the links between data and model.

`data.schema` is linked into `model.schema`, so the tag vocabulary is named once. Swappable
components (`model.backbone`, `model.backbone.moe`, `model.backbone.moe.router`,
`model.tag_embedder`, `model.head`, `model.text_encoder`, `model.codec`, `model.timesteps`) are
chosen by `class_path`; `--help` and `--print_config` list their arguments.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from tagmoe_lit.data import SynthTAGDataModule
from tagmoe_lit.module import TagMoEModule


class TagMoECLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(TagMoEModule, SynthTAGDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.schema", "model.schema")

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero:
            ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
            print(f"\nTensorBoard: tensorboard --logdir {trainer.log_dir}")
            if ckpt:
                print(f"Checkpoint:  {ckpt}")


def main(args: list[str] | None = None) -> TagMoECLI:
    return TagMoECLI(args=args)

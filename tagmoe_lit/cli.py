"""`TagMoECLI`: LightningCLI with omegaconf interpolation and the links between data and model.

The data module is chosen by `class_path` (`data: {class_path: tagmoe_lit.data.ManifestDataModule,
init_args: {...}}`); a `data:` section without one configures the default,
`tagmoe_lit.data.SynthTAGDataModule`, so `data: {image_size: 32}` keeps working. Any data module
that takes a `schema` argument and has `schema` and `task_names` attributes works.

`data.schema` is linked into `model.schema`, so the tag vocabulary is named once. Swappable
components (`model.backbone`, `model.backbone.moe`, `model.backbone.moe.router`,
`model.tag_embedder`, `model.head`, `model.text_encoder`, `model.codec`, `model.timesteps`) are
chosen by `class_path`; `--help` and `--print_config` list their arguments.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from tagmoe_lit.module import TagMoEModule

DEFAULT_DATA = "tagmoe_lit.data.SynthTAGDataModule"
DATA_HELP = (
    f"The data module: a class_path (default {DEFAULT_DATA}; real data: tagmoe_lit.data.ManifestDataModule) "
    "and its init_args. Options of the chosen module are set as --data.batch_size, --data.schema, ...; "
    "`--data.help CLASS` lists a module's options."
)


class TagMoECLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(TagMoEModule, L.LightningDataModule, *args, subclass_mode_data=True, **kwargs)

    def add_core_arguments_to_parser(self, parser) -> None:
        """As LightningCLI's, with a data module of any class (SynthTAG by default) and a help that says so."""
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_subclass_arguments(L.LightningDataModule, "data", fail_untyped=False, required=True, help=DATA_HELP)
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.schema", "model.schema")

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must ask
        if trainer.is_global_zero:
            ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
            print(f"\nTensorBoard: tensorboard --logdir {log_dir}")
            if ckpt:
                print(f"Checkpoint:  {ckpt}")


def main(args: list[str] | None = None) -> TagMoECLI:
    return TagMoECLI(args=args)


class _ParseOnly(TagMoECLI):
    def instantiate_classes(self) -> None:
        """Nothing is built: the config is only parsed and checked."""


def resolved_config(args: list[str]) -> str:
    """The YAML of every option after composing `args` (configs and overrides), nothing instantiated."""
    cli = _ParseOnly(args=args, run=False)
    return cli.parser.dump(cli.config, skip_none=False)

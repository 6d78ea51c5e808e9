"""`TagMoECLI`: LightningCLI with omegaconf interpolation and the links between data and model.

The data module is chosen by `class_path` (`data: {class_path: tagmoe_lit.data.ManifestDataModule,
init_args: {...}}`); a `data:` section without one configures the default,
`tagmoe_lit.data.SynthTAGDataModule`, so `data: {image_size: 32}` keeps working. Any data module
that takes a `schema` argument and has `schema` and `task_names` attributes works.

`data.schema` is linked into `model.schema`, so the tag vocabulary is named once. Swappable
components (`model.backbone`, `model.backbone.moe`, `model.backbone.moe.router`,
`model.tag_embedder`, `model.head`, `model.text_encoder`, `model.codec`, `model.timesteps`) are
chosen by `class_path`; `--help` and `--print_config` list their arguments.

Logs follow `trainer.default_root_dir`: a logger whose `save_dir` the config leaves unset (as
`experiments/base.yaml`'s TensorBoard logger does) writes under `trainer.default_root_dir`, so an
overlay, or `--trainer.default_root_dir X` alone, moves the logs with the run. This is done here,
after all `--config` files and overrides are merged, because omegaconf interpolates within one file
only (`${trainer.default_root_dir}` in base.yaml would keep base.yaml's value under an overlay).

Bad input fails before anything is built or written, in one sentence naming the file or option
(`tagmoe_lit/errors.py`): every `--config` file must parse, `--ckpt_path` must be a readable
tagmoe_lit checkpoint, `trainer.default_root_dir` must be writable, and a bad option ends in one
line naming it instead of the full usage. A run that fails before its first batch removes the
directories it created (`tagmoe_lit/failed_run.py`); a checkpoint refused for another model is
reported with its path.
"""

from __future__ import annotations

import inspect

import sys

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from tagmoe_lit.errors import check_checkpoint_file, check_config_files, check_output_dir, parse_error_summary
from tagmoe_lit.failed_run import FirstBatch, not_yet_there, remove_created
from tagmoe_lit.identity import CheckpointMismatchError
from tagmoe_lit.module import TagMoEModule

RUN_COMMANDS = ("fit", "validate", "test", "predict")

DEFAULT_DATA = "tagmoe_lit.data.SynthTAGDataModule"
DATA_HELP = (
    f"The data module: a class_path (default {DEFAULT_DATA}; real data: tagmoe_lit.data.ManifestDataModule) "
    "and its init_args. Options of the chosen module are set as --data.batch_size, --data.schema, ...; "
    "`--data.help CLASS` lists a module's options."
)


class KitArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose usage errors end in one line naming the option, not 70 lines of usage."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse catches these itself
            return super().error(message, ex)
        command = next((w for w in reversed(self.prog.split()) if w in RUN_COMMANDS), "")
        sys.stderr.write(f"{message.rstrip()}\nerror: {parse_error_summary(message, command)}\n")
        raise SystemExit(2)


FIT_ONLY = set(inspect.signature(L.Trainer.fit).parameters) - {"self", "model", "train_dataloaders", "val_dataloaders", "datamodule"}


class TagMoECLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("parser_class", KitArgumentParser)
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

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """As LightningCLI's, and a logger's unset `save_dir` is filled before the config is validated
        (`TensorBoardLogger` requires one): see `logs_follow_root_dir`. Unlike Lightning's it does not warn
        about `args` given beside `sys.argv`: the command table and the study hand them over on purpose."""
        if isinstance(args, (dict, Namespace)):
            config = parser.parse_object(args, _skip_validation=True)
        else:
            check_config_files(list(sys.argv[1:] if args is None else args))
            config = parser.parse_args(args, _skip_validation=True)
        chosen = config[config.subcommand] if config.get("subcommand") else config
        if not config.get("subcommand"):  # `convert export`, `edit`: a run's saved config.yaml also holds fit's own
            for key in FIT_ONLY & set(config.keys()):  # arguments (ckpt_path, …); these commands take theirs as flags
                del config[key]
        logs_follow_root_dir(chosen)
        parser.validate(config)
        if config.get("subcommand") in RUN_COMMANDS:
            check_output_dir((chosen.get("trainer") or Namespace()).get("default_root_dir"))
            check_checkpoint_file(chosen.get("ckpt_path"))
        self.config = config

    def _run_subcommand(self, subcommand: str) -> None:
        """As LightningCLI's; a run that fails before its first batch removes the directories it created,
        and a checkpoint refused for another model is named."""
        trainer, first = self.trainer, FirstBatch()
        created = not_yet_there(trainer)
        ckpt = self._prepare_subcommand_kwargs(subcommand).get("ckpt_path")
        trainer.callbacks.append(first)
        try:
            super()._run_subcommand(subcommand)
        except BaseException as e:
            if not first.started and trainer.is_global_zero:
                remove_created(created)
            if isinstance(e, CheckpointMismatchError) and ckpt:
                raise CheckpointMismatchError(f"{ckpt}: {e}") from None
            raise
        finally:
            if first in trainer.callbacks:
                trainer.callbacks.remove(first)

    def after_fit(self) -> None:
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective call under DDP: every rank must ask
        if trainer.is_global_zero:
            ckpt = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path if trainer.checkpoint_callback else None
            if trainer.loggers:
                print(f"\nTensorBoard: tensorboard --logdir {log_dir}")
            if ckpt:
                print(f"Checkpoint:  {ckpt}")


def main(args: list[str] | None = None) -> TagMoECLI:
    return TagMoECLI(args=args)


def one_cpu_cli(args: list[str]) -> TagMoECLI:
    """The config's model and data built for one CPU process, whatever its trainer (GPUs, nodes,
    FSDP) says: for commands that load a checkpoint and use it (`convert export`, `edit`)."""
    one_cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto"]
    return TagMoECLI(args=[*args, "--trainer.logger", "false", *one_cpu], run=False)


def logs_follow_root_dir(config: Namespace) -> None:
    """Every logger of `config` (one subcommand's) whose `save_dir` is unset writes under
    `trainer.default_root_dir` (the working directory when that is unset too, as Lightning's)."""
    trainer = config.get("trainer") or Namespace()
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if isinstance(init, Namespace) and "save_dir" in init and init.save_dir is None:
            init.save_dir = trainer.get("default_root_dir") or "."


class ParseOnly(TagMoECLI):
    """Parse and validate a config without building anything (a GPU Trainer cannot exist on CPU);
    `cli.config` holds the result, `cli.parser.instantiate_classes(cli.config)` builds it."""

    def instantiate_classes(self) -> None:
        """Nothing is built: the config is only parsed and checked."""


def resolved_config(args: list[str], leave_out: dict[str, object] | None = None) -> str:
    """The YAML of every option after composing `args` (configs and overrides), nothing instantiated;
    an option of `leave_out` (dotted key → value) is left out while it has that value."""
    cli = ParseOnly(args=args, run=False)
    for key, value in (leave_out or {}).items():
        if key in cli.config and cli.config[key] == value:
            del cli.config[key]
    return cli.parser.dump(cli.config, skip_none=False)

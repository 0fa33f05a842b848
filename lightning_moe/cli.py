"""The ``lightning-moe`` command: a LightningCLI over ``MoELanguageModel`` and ``TextDataModule``.

    lightning-moe fit --config cli_configs/tiny.yaml
    lightning-moe fit --config cli_configs/tiny.yaml --model.moe.router.top_k 1 --model.moe.dispatcher loop

and ``lightning-moe-hf``, the same over ``HFMoEFineTune`` (a Hugging Face MoE causal LM, with our
routers if asked):

    lightning-moe-hf fit --config cli_configs/hf/qwen2_moe_routers.yaml
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_moe.data.datamodule import TextDataModule
from lightning_moe.models.transformer import MOVED_TO_MOE
from lightning_moe.module import MoELanguageModel


def _config_files(args: list[str]) -> Iterator[str]:
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            yield args[i + 1]
        elif arg.startswith("--config="):
            yield arg.split("=", 1)[1]


def moved_keys(args: list[str]) -> list[str]:
    """Old flat MoE keys (``--model.num_experts``, ``model: {router: ...}`` in a config file) in
    ``args``, each as ``where: old -> new``."""
    found = []
    for arg in args:
        name = arg.split("=", 1)[0]
        key = name.removeprefix("--model.")
        if name.startswith("--model.") and key.split(".", 1)[0] in MOVED_TO_MOE:
            found.append(f"{name} -> --model.moe.{key}")
    for path in _config_files(args):
        try:
            config: Any = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue  # the parser reports unreadable files itself
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict):
            found += [f"{path}: model.{key} -> model.moe.{key}" for key in model if key in MOVED_TO_MOE]
    return found


class _UsageErrorCLI(LightningCLI):
    #: Our components check their arguments when built and raise these naming the parameter; on
    #: the command line that is a usage error, not a traceback.
    usage_errors: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, ImportError)

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - LightningArgumentParser, args as Lightning's
        given = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        moved = moved_keys(given)
        if moved:
            parser.error("The MoE settings moved under `model.moe` (one MoEConfig): " + "; ".join(moved))
        super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except self.usage_errors as err:
            self.parser.error(str(err))


class MoECLI(_UsageErrorCLI):
    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        # One sequence length for model and data; the vocabulary comes from the tokenizer.
        parser.link_arguments("model.max_seq_len", "data.seq_len")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


class HFCLI(_UsageErrorCLI):
    pass  # peft missing for train=lora is an ImportError: a usage error too


def _offline() -> None:
    # Never reach for a hub unless the user asks: local files and the built-in corpus need none.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(args: list[str] | None = None, run: bool = True) -> MoECLI:
    """Run the CLI on ``args`` (default: ``sys.argv``) and return it, for scripts and tests.

    With ``run=False`` there is no subcommand: the config is parsed and the trainer, model and
    data module are built, nothing more.
    """
    _offline()
    return MoECLI(MoELanguageModel, TextDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


def _close_process_group() -> None:
    # Lightning leaves the process group open at the end of a run; gloo's threads torn down at interpreter
    # exit can then abort the process ("terminate called without an active exception") after the work is
    # done, which launchers report as a failure.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    """The ``lightning-moe`` console script."""
    run_cli()
    _close_process_group()


def run_hf_cli(args: list[str] | None = None, run: bool = True) -> HFCLI:
    """Run ``lightning-moe-hf`` on ``args``: :class:`~lightning_moe.hf_module.HFMoEFineTune` with
    :class:`TextDataModule` (give ``data.tokenizer`` the model's tokenizer for a pre-trained model)."""
    from lightning_moe.hf_module import HFMoEFineTune

    _offline()
    return HFCLI(HFMoEFineTune, TextDataModule, args=args, run=run, save_config_kwargs={"overwrite": True})


def main_hf() -> None:
    """The ``lightning-moe-hf`` console script."""
    run_hf_cli()
    _close_process_group()


if __name__ == "__main__":
    main()

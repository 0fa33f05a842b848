"""The ``lightning-moe`` command: a LightningCLI over ``MoELanguageModel`` and ``TextDataModule``.

    lightning-moe fit --config cli_configs/tiny.yaml
    lightning-moe fit --config cli_configs/tiny.yaml --model.moe.router.top_k 1 --model.moe.dispatcher loop

and ``lightning-moe-hf``, the same over ``HFMoEFineTune`` (a Hugging Face MoE causal LM, with our
routers if asked):

    lightning-moe-hf fit --config cli_configs/hf/qwen2_moe_routers.yaml
"""

from __future__ import annotations

import copy
import difflib
import importlib
import math
import os
import re
import signal
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_moe._validate import UsageError
from lightning_moe._warnings import filter_known_warnings
from lightning_moe.callbacks.checkpoint import find_last_checkpoint, incomplete_reason, newest_complete_sibling
from lightning_moe.callbacks.stops import Preempted, TrainingStopped
from lightning_moe.data.datamodule import TextDataModule
from lightning_moe.models.transformer import MOVED_TO_MOE
from lightning_moe.module import MoELanguageModel
from lightning_moe.parallel.ddp_strategy import MoEDDPStrategy  # noqa: F401 - registers `--trainer.strategy moe_ddp`

#: The collective timeout the command gives DDP and DeepSpeed unless the strategy sets ``timeout``:
#: a rank that hangs makes the others fail after this long instead of torch's 30 minutes.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=10)
_TORCH_DEFAULT_TIMEOUT = timedelta(minutes=30)


def _config_files(args: list[str]) -> Iterator[str]:
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            yield args[i + 1]
        elif arg.startswith("--config="):
            yield arg.split("=", 1)[1]


def _model_sections(args: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, model section)`` of each ``--config`` file in ``args`` that has a ``model:`` mapping (unreadable
    files are skipped: the parser reports them itself)."""
    for path in _config_files(args):
        try:
            config: Any = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            continue
        model = config.get("model") if isinstance(config, dict) else None
        if isinstance(model, dict):
            yield path, model


def _model_flags(args: list[str]) -> Iterator[tuple[str, str]]:
    """``(flag, key)`` of each ``--model.<key>`` flag in ``args``."""
    for arg in args:
        name = arg.split("=", 1)[0]
        if name.startswith("--model."):
            yield name, name.removeprefix("--model.")


def moved_keys(args: list[str]) -> list[str]:
    """Old flat MoE keys (``--model.num_experts``, ``model: {router: ...}`` in a config file) in
    ``args``, each as ``where: old -> new``."""
    found = [f"{name} -> --model.moe.{key}" for name, key in _model_flags(args)
             if key.split(".", 1)[0] in MOVED_TO_MOE]
    for path, model in _model_sections(args):
        found += [f"{path}: model.{key} -> model.moe.{key}" for key in model if key in MOVED_TO_MOE]
    return found


def _say(message: str) -> None:
    """Print ``message`` to stderr once per job (from the first process only)."""
    if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def usage_exit(message: str) -> None:
    """Exit with status 2 and ``message`` alone (a usage error: the flag, value or file, and what to do)."""
    print(f"{Path(sys.argv[0]).name or 'lightning-moe'}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested dicts and Namespaces (lists are leaves; ``_private`` keys skipped)."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not str(key).startswith("_"):
                out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    tree[leaf] = value


def _get(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, (dict, Namespace)) else None
    return tree


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b or (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b))


def _without_init_args(key: str) -> str:
    return ".".join(part for part in key.split(".") if part != "init_args")


def explicit_model_keys(args: list[str]) -> set[str]:
    """The model settings ``args`` set: ``--model.*`` flags and the ``model:`` keys of ``--config`` files,
    dotted, without ``init_args`` (``optimizer.lr`` for ``--model.optimizer.init_args.lr``)."""
    keys = {_without_init_args(key) for _, key in _model_flags(args)}
    for _, model in _model_sections(args):
        keys |= {_without_init_args(key) for key in _flat(model)}
    return keys


def _is_explicit(key: str, explicit: set[str]) -> bool:
    key = _without_init_args(key)
    return any(key == given or key.startswith(given + ".") for given in explicit)


def _inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` is ``root`` or below it (as written: a saved config already placed under the root)."""
    path, root = os.path.normpath(path), os.path.normpath(root)
    return path == root or path.startswith(root + os.sep)


def _checkpoint_dirpaths(trainer: Namespace) -> list[Path]:
    """The ``dirpath`` of each checkpoint callback in the config that sets one."""
    callbacks = trainer.get("callbacks")
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return [Path(c.init_args.dirpath) for c in callbacks if isinstance(c, Namespace)
            and isinstance(c.get("init_args"), Namespace) and c.init_args.get("dirpath")]


def _loggers(trainer: Namespace) -> list[Namespace]:
    logger = trainer.get("logger")
    loggers = logger if isinstance(logger, list) else [logger]
    return [x for x in loggers if isinstance(x, Namespace) and isinstance(x.get("init_args"), Namespace)]


_UNKNOWN = re.compile(r"unrecognized arguments: (.*)", re.S)
_NOT_ACCEPTED = re.compile(r'Parser key "(?P<key>[^"]+)":.*?(?:Callable\[\[(?P<given>[^\]]*)\].*?)?'
                           r"Option '(?P<option>[^']+)' is not accepted\. "
                           r"Got value: Namespace\(class_path='(?P<cls>[^']+)'", re.S)
_BAD_VALUE = re.compile(r'Parser key "(?P<key>[^"]+)":\s*(?P<why>.*)', re.S)
_NOT_IN_FILE = re.compile(r"does not accept option '(?P<key>[^']+)'")


def _closest(name: str, options: list[str], prefix: str = "") -> str:
    """`` (did you mean `X`?)`` for the option closest to ``name``, or nothing when none is close."""
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
    if not close:  # a typo in the last part of a long dotted name: compare that part among siblings
        head, _, tail = name.rpartition(".")
        siblings = {o.rpartition(".")[2]: o for o in options if o.rpartition(".")[0] == head}
        close = [siblings[x] for x in difflib.get_close_matches(tail, list(siblings), n=1, cutoff=0.6)]
    return f" (did you mean `{prefix}{close[0]}`?)" if close else ""


def _class_options(class_path: str, given: int) -> list[str]:
    """The init options of ``class_path`` a user can set (without the ``given`` leading ones a callable
    type fills in itself, e.g. ``d_model, num_experts`` of a router)."""
    from jsonargparse._parameter_resolvers import get_signature_parameters

    module, _, name = class_path.rpartition(".")
    try:
        params = get_signature_parameters(getattr(importlib.import_module(module), name), None)
    except Exception:  # noqa: BLE001 - the message is still right without the list
        return []
    return [p.name for p in params][given:]


def friendly_parse_error(message: str, options: list[str]) -> str:
    """The parser's ``message`` in the user's terms: the unknown option with the closest valid ones, the
    class a nested option does not belong to with the options it accepts, a bad value under its flag."""
    unknown = _UNKNOWN.search(message)
    if unknown:
        names = [a.split("=", 1)[0].removesuffix("+") for a in unknown.group(1).split() if a.startswith("--")]
        if names:
            return "; ".join(f"unknown option `{n}`{_closest(n, options)}" for n in names) + "."
    nested = _NOT_ACCEPTED.search(message)
    if nested:
        key, option, cls = nested.group("key"), nested.group("option"), nested.group("cls")
        given = len([x for x in (nested.group("given") or "").split(",") if x.strip()])
        accepted = _class_options(cls, given)
        hint = _closest(option, accepted, prefix=f"--{key}.")
        listed = f"; it accepts {', '.join(accepted)}" if accepted else ""
        return f"`--{key}.{option}`: {cls} has no option `{option}`{listed}{hint}."
    in_file = _NOT_IN_FILE.search(message)
    if in_file:  # a key of a config file, compared with the options' keys
        key = in_file.group("key")
        return f"unknown option `{key}` (in a config file){_closest(key, [o[2:] for o in options])}."
    bad = _BAD_VALUE.search(message)
    if bad:
        outer = bad.group("key")
        keys = re.findall(r'Parser key "([^"]+)"', message)
        inner = keys[-1] if len(keys) > 1 else None  # a value inside a nested class's options
        why = message.rsplit(f'Parser key "{keys[-1]}":', 1)[1] if inner else bad.group("why")
        why = re.sub(r"\.? ?Got value: Namespace\(.*", "", " ".join(why.split()), flags=re.S)
        why = re.sub(r"Type [^:]*? expects [^:]*?: ", "", why)
        why = re.sub(r"Expected an? <class '([\w.]+)'>", r"expected \1", why)
        return f"`--{outer}.{inner}`: {why}" if inner else f"`--{outer}`: {why}"
    return message


class _Parser(LightningArgumentParser):
    """Lightning's parser without prefix abbreviations (``--model.moe.num_expert`` is not taken for
    ``num_experts``), whose errors are one short message in the user's terms instead of the whole usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> Any:  # noqa: D102 - argparse's
        from jsonargparse._common import debug_mode_active  # noqa: PLC0415 - jsonargparse internals, one use

        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        options = [o for o in parser._option_string_actions
                   if o.startswith("--") and not o.endswith((".help", "+"))]
        print(f"{prog}: error: {friendly_parse_error(message, options)}\n({prog} --help lists every option.)",
              file=sys.stderr, flush=True)
        raise SystemExit(2)


class _UsageErrorCLI(LightningCLI):
    """What both commands add to LightningCLI: usage errors without tracebacks, a run's output under
    ``--trainer.default_root_dir``, ``--ckpt_path last`` that finds the run's newest checkpoint, resumes
    that check the command against the checkpoint, and exit statuses that say why a run stopped
    (:mod:`lightning_moe.callbacks.stops`)."""

    #: Our components check their arguments when built and raise these naming the parameter; on
    #: the command line that is a usage error, not a traceback.
    usage_errors: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, ImportError)
    #: ``predict`` prints and saves the texts the model generates (``GeneratedTextWriter``).
    writes_generated_text = False
    _resume_state: dict[str, Any] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", _Parser)
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - LightningArgumentParser, args as Lightning's
        given = [str(a) for a in (sys.argv[1:] if args is None else args)] if not isinstance(args, dict) else []
        self._given_args = given
        moved = moved_keys(given)
        if moved:
            parser.error("The MoE settings moved under `model.moe` (one MoEConfig): " + "; ".join(moved))
        super().parse_arguments(parser, args)
        self._prepare_run()  # here, not in Lightning's _parse_ckpt_path hook, which Lightning < 2.5.5 lacks

    def _parse_ckpt_path(self) -> None:
        """Lightning's merge of the checkpoint's hyperparameters: done by :meth:`_prepare_run` instead."""

    # ----------------------------------------------------------------- where a run writes, and resuming

    @staticmethod
    def _logger_run_dirs(config: Namespace) -> list[tuple[Namespace, Path]]:
        """Each configured logger with the folder that holds its version folders, ``<save_dir>/<name>``."""
        pairs = []
        for logger in _loggers(config.trainer):
            init = logger.init_args
            save_dir = init.get("save_dir") or init.get("root_dir")
            if save_dir is not None:
                name = init.get("name", "lightning_logs")
                pairs.append((logger, Path(save_dir) / name if name else Path(save_dir)))
        return pairs

    def _run_dirs(self, config: Namespace) -> list[Path]:
        """The folders that hold this run's version folders (Lightning's default logger's without one)."""
        trainer = config.trainer
        if not _loggers(trainer):
            if trainer.get("logger") is False:
                return []
            return [Path(trainer.get("default_root_dir") or os.getcwd()) / "lightning_logs"]
        return [run_dir for _, run_dir in self._logger_run_dirs(config)]

    def _place_output(self, config: Namespace) -> None:
        """A relative logger ``save_dir`` is under ``trainer.default_root_dir`` when that is given, so the
        shipped configs (``save_dir: runs``) write everything under it."""
        root = config.trainer.get("default_root_dir")
        if root is None:
            return
        for logger in _loggers(config.trainer):
            for key in ("save_dir", "root_dir"):
                value = logger.init_args.get(key)
                if isinstance(value, (str, Path)) and not os.path.isabs(value) and not _inside(value, root):
                    logger.init_args[key] = os.path.join(root, value)

    def _resolve_last(self, config: Namespace) -> None:
        """``ckpt_path: last`` is the newest ``last.ckpt`` of this run (the logger's ``<save_dir>/<name>``), or
        no checkpoint (a fresh start) when the run has none yet, so a job can always pass it."""
        if config.get("ckpt_path") != "last":
            return
        run_dirs = self._run_dirs(config)
        links = [d / "last.ckpt" for d in _checkpoint_dirpaths(config.trainer)]
        if not run_dirs and config.trainer.get("logger") is False:
            links.append(Path(config.trainer.get("default_root_dir") or os.getcwd()) / "checkpoints" / "last.ckpt")
        links += [p for d in run_dirs for p in d.glob("*/checkpoints/last.ckpt")]
        for link in links:
            if link.is_symlink() and not link.exists():
                previous = newest_complete_sibling(link)
                hint = f"; the newest complete checkpoint beside it is {previous}" if previous else ""
                usage_exit(f"--ckpt_path last: {link} points at {os.readlink(link)}, which is missing{hint}. "
                           "Give --ckpt_path a file.")
        found = find_last_checkpoint(links)
        if found is None:
            where = ", ".join(str(d) for d in run_dirs) or "the run"
            if self.config.get("subcommand") not in (None, "fit"):  # an untrained model would pass silently
                usage_exit(f"--ckpt_path last: no checkpoint of this run in {where}; `{self.config.subcommand}` "
                           "needs a trained model: fit first, or give --ckpt_path a file.")
            _say(f"--ckpt_path last: no checkpoint of this run in {where} yet; starting from scratch.")
            config.ckpt_path = None
        else:
            config.ckpt_path = str(found)
            _say(f"--ckpt_path last: {found}")

    def _continue_in_run_folder(self, config: Namespace, ckpt: Path) -> None:
        """A checkpoint in ``<run dir>/<version>/checkpoints/`` continues that version folder: its logs and
        checkpoints, one TensorBoard curve."""
        ckpt = ckpt.absolute()
        if ckpt.parent.name != "checkpoints":
            return
        version_dir = ckpt.parent.parent
        for logger, run_dir in self._logger_run_dirs(config):
            if version_dir.parent == run_dir.absolute() and logger.init_args.get("version") is None:
                logger.init_args["version"] = version_dir.name

    def _check_values(self, config: Namespace) -> None:
        lr = _get(config, "model.optimizer.init_args.lr")
        if isinstance(lr, (int, float)) and not lr >= 0:
            usage_exit(f"`model.optimizer.init_args.lr` (--model.optimizer.init_args.lr) must be >= 0, got {lr!r}.")

    def _prepare_run(self) -> None:
        """Resolve ``--ckpt_path last``; refuse an incomplete checkpoint naming it; take the checkpoint's
        model settings except those the command sets (a ``--model.*`` flag or a ``model:`` key of a config
        file), which are checked against the checkpoint's shapes once the model is built."""
        self._resume_state: dict[str, Any] | None = None
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        self._place_output(config)
        self._check_values(config)
        if not subcommand:
            return
        self._resolve_last(config)
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        reason = incomplete_reason(ckpt_path)
        if reason is not None:
            previous = newest_complete_sibling(ckpt_path) if Path(ckpt_path).parent.is_dir() else None
            hint = f" The newest complete checkpoint beside it is {previous}: resume with --ckpt_path {previous}." \
                if previous else ""
            usage_exit(f"`ckpt_path` {ckpt_path}: {reason}.{hint}")
        self._continue_in_run_folder(config, Path(ckpt_path))
        if not Path(ckpt_path).is_file():
            return  # a DeepSpeed checkpoint directory: its hyperparameters are not read
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        except Exception as err:  # noqa: BLE001 - a damaged file: say which
            usage_exit(f"`ckpt_path` {ckpt_path} does not load ({type(err).__name__}: {err}); it is damaged.")
        hparams = copy.deepcopy(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        self._resume_state = {"path": ckpt_path, "step": ckpt.get("global_step"), "applied": {}, "shapes": {
            k: tuple(v.shape) for k, v in (ckpt.get("state_dict") or {}).items() if isinstance(v, torch.Tensor)}}
        if not hparams:
            return
        if "_class_path" in hparams:  # a model chosen by class path: Lightning's merge, unchanged
            if hasattr(LightningCLI, "_parse_ckpt_path"):
                LightningCLI._parse_ckpt_path(self)
            return
        explicit = explicit_model_keys(getattr(self, "_given_args", []))
        given = {k: v for k, v in _flat(config.get("model")).items() if _is_explicit(k, explicit)}
        saved = _flat(hparams)
        merged = copy.deepcopy(hparams)
        applied: dict[str, tuple[Any, Any]] = {}
        # A class chosen here that differs from the checkpoint's brings its own arguments, whole.
        replaced = [k[: -len("class_path")] for k, v in given.items()
                    if k.endswith("class_path") and k in saved and not _same(v, saved[k])]
        for prefix in replaced:
            chosen = _get(config.model, prefix[:-1])
            _set(merged, prefix[:-1], chosen.as_dict() if isinstance(chosen, Namespace) else copy.deepcopy(chosen))
            applied[f"{prefix}class_path"] = (given[f"{prefix}class_path"], saved[f"{prefix}class_path"])
        for key, value in given.items():
            if any(key.startswith(prefix) for prefix in replaced) or key not in saved:
                continue
            if not _same(value, saved[key]):
                _set(merged, key, value)
                applied[key] = (value, saved[key])
        self._resume_state["applied"] = applied
        try:
            self.config = self.parser.parse_object({subcommand: {"model": merged}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing the hyperparameters of {ckpt_path} failed.\n")
            raise

    def _check_resumed_shapes(self) -> None:
        """Refuse settings that change the model's shapes from the checkpoint's, naming them; report the
        settings of this command that replace the checkpoint's."""
        state = self._resume_state
        if not state or not state["shapes"] or getattr(self, "model", None) is None:
            return
        mine = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        saved = state["shapes"]
        wrong = [f"{k} is {list(saved[k])} in the checkpoint, {list(mine[k])} here" for k in saved
                 if k in mine and saved[k] != mine[k]]
        missing, extra = sorted(saved.keys() - mine.keys()), sorted(mine.keys() - saved.keys())
        if missing:
            wrong.append(f"{len(missing)} tensors of the checkpoint are not in this model (e.g. {missing[0]})")
        if extra:
            wrong.append(f"{len(extra)} tensors of this model are not in the checkpoint (e.g. {extra[0]})")
        if "tie_embeddings" in state["applied"]:  # same tensors either way, but not the same model
            wrong.append("the output head is tied to the embedding in one and not in the other")
        flags = "; ".join(f"model.{k} = {new!r} here, {old!r} in the checkpoint"
                          for k, (new, old) in state["applied"].items())
        if wrong:
            cause = f"These settings differ from the checkpoint's: {flags}. " if flags else ""
            usage_exit(f"`ckpt_path` {state['path']} was saved by a model of another shape: {cause}"
                       f"{'; '.join(wrong[:3])}. A resumed run keeps its model's shape: drop those flags, or start a "
                       "new run (upcycle_from turns a dense checkpoint into an MoE).")
        if flags:
            verb = "Resuming" if self.config.get("subcommand") == "fit" else "Loading"
            _say(f"{verb} {state['path']} (step {state['step']}) with this command's {flags}; every other model "
                 "setting from the checkpoint; trainer settings (max_steps, callbacks...) from this command.")

    def instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand not in (None, "fit"):  # validate/test/predict beside a run keep its fit config.yaml
            self.save_config_kwargs = {**self.save_config_kwargs, "config_filename": f"{subcommand}_config.yaml"}
        try:
            super().instantiate_classes()
        except self.usage_errors as err:
            usage_exit(str(err))
        self._check_resumed_shapes()
        strategy = self.trainer.strategy
        if getattr(strategy, "_timeout", None) == _TORCH_DEFAULT_TIMEOUT:
            strategy._timeout = DEFAULT_COLLECTIVE_TIMEOUT
        _quiet_trainer(self.trainer)
        if subcommand == "predict" and self.writes_generated_text:
            from lightning_moe.callbacks.text_writer import GeneratedTextWriter

            if not any(isinstance(c, GeneratedTextWriter) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(GeneratedTextWriter())

    def _run_folder(self) -> Path | None:
        """Where this run writes its logs (and, by default, its checkpoints): the first logger's folder."""
        trainer = self.trainer
        return Path(trainer.log_dir) if trainer.loggers and trainer.log_dir else None

    def _checkpoint_folders(self) -> list[str]:
        from lightning.pytorch.callbacks import ModelCheckpoint

        folder = self._run_folder()
        default = str(folder / "checkpoints") if folder else os.path.join(self.trainer.default_root_dir, "checkpoints")
        return [str(c.dirpath or default) for c in self.trainer.callbacks if isinstance(c, ModelCheckpoint)]

    # ----------------------------------------------------------------- how a run ends

    def _run_subcommand(self, subcommand: str) -> None:
        folder = self._run_folder()
        if folder is not None:
            saved = self._checkpoint_folders() if subcommand == "fit" else []
            _say(f"Run folder: {folder}" + (f" (checkpoints in {', '.join(saved)})" if saved else "")
                 + f"; TensorBoard: tensorboard --logdir {folder.parent}")
        try:
            super()._run_subcommand(subcommand)
            if subcommand == "fit" and folder is not None:
                _say(f"Run folder: {folder}. Resume with --ckpt_path last; an overview of its routing: "
                     f"lightning-moe report {folder}")
        except TrainingStopped as stop:
            _say(f"{type(stop).__name__}: {stop}")
            raise SystemExit(self._exit_code(stop)) from None
        except SIGTERMException:  # before training started (Preemption is not listening yet): nothing saved
            _say("Stopped by SIGTERM before training started; nothing to save (exit status 143: requeue).")
            raise SystemExit(128 + signal.SIGTERM) from None
        except UsageError as err:
            self._kill_children()
            usage_exit(str(err))
        except Exception as err:
            if not _is_timeout(err, self.trainer.world_size):
                raise
            self._kill_children()
            timeout = getattr(self.trainer.strategy, "_timeout", None)
            first_line = str(err).splitlines()[0] if str(err) else ""
            print(f"A collective operation did not complete within the collective timeout ({timeout}; set it with "
                  "--trainer.strategy.init_args.timeout): another rank hung, died or did not start in time. "
                  f"{type(err).__name__}: {first_line}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def _exit_code(self, stop: TrainingStopped) -> int:
        from lightning.fabric.plugins.environments import LightningEnvironment

        # The processes Lightning started for the other ranks exit 0: its watcher kills the main process when
        # a child fails, and the main process, which stops at the same step, reports the status.
        environment = getattr(self.trainer.strategy, "cluster_environment", None)
        if self.trainer.local_rank > 0 and type(environment) is LightningEnvironment:
            return 0
        if not isinstance(stop, Preempted):
            self._kill_children()  # a rank waiting for this one (at a checkpoint barrier) would wait for the timeout
        return stop.exit_code

    def _kill_children(self) -> None:
        """Stop the processes Lightning started for the other ranks (a rank that hangs would outlive us)."""
        for process in getattr(getattr(self.trainer.strategy, "launcher", None), "procs", None) or []:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)


def _quiet_trainer(trainer: Any) -> None:
    """No ``hp_metric = -1`` scalar in TensorBoard, and ``Epoch N`` (not ``Epoch N/-2``) in the progress bar of a
    run bounded by steps."""
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger._default_hp_metric = False
    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar) and hasattr(bar, "_get_train_description"):
        def train_description(current_epoch: int) -> str:
            last = (trainer.max_epochs or 0) - 1
            return f"Epoch {current_epoch}" + (f"/{last}" if last >= 0 else "")

        bar._get_train_description = train_description


def _is_timeout(err: BaseException, processes: int) -> bool:
    """Whether ``err`` is a collective's timeout (gloo words it several ways: "Timed out waiting ... for recv",
    "Application timeout caused pair closure", a store's "Timed out after N seconds")."""
    text = f"{type(err).__name__} {err}".lower()
    distributed = processes > 1 or type(err).__module__.startswith("torch") or "gloo" in text or "nccl" in text
    return distributed and ("timed out" in text or "timeout" in text)


class MoECLI(_UsageErrorCLI):
    writes_generated_text = True

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        # One sequence length for model and data; the vocabulary comes from the tokenizer.
        parser.link_arguments("model.max_seq_len", "data.seq_len")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


class HFCLI(_UsageErrorCLI):
    pass  # peft missing for train=lora is an ImportError: a usage error too


def _offline() -> None:
    # Never reach for a hub unless the user asks: local files and the built-in corpus need none.
    filter_known_warnings()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(args: list[str] | None = None, run: bool = True) -> MoECLI:
    """Run the CLI on ``args`` (default: ``sys.argv``) and return it, for scripts and tests.

    With ``run=False`` there is no subcommand: the config is parsed and the trainer, model and
    data module are built, nothing more.
    """
    _offline()
    return MoECLI(MoELanguageModel, TextDataModule, args=args, run=run, save_config_kwargs={"overwrite": True},
                  parser_kwargs={"description": "Train, validate, test and generate with an MoE language model "
                                                "(lightning_moe). Also: `lightning-moe report RUN_DIR` draws a run's "
                                                "losses and routing from its TensorBoard logs."})


def _close_process_group() -> None:
    # Lightning leaves the process group open at the end of a run; gloo's threads torn down at interpreter
    # exit can then abort the process ("terminate called without an active exception") after the work is
    # done, which launchers report as a failure.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    """The ``lightning-moe`` console script; ``lightning-moe report RUN_DIR`` summarises a run
    (:mod:`lightning_moe.report`)."""
    if sys.argv[1:2] == ["report"]:
        from lightning_moe.report import main as report

        raise SystemExit(report(sys.argv[2:]))
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

"""``lightning-moe-bench-learning``: does the MoE learn better than dense at equal active parameters?

Matched training runs through the real CLI: every run is its own process running
``lightning-moe fit --config cli_configs/tiny.yaml <row args> ...`` (the demo recipe, 600 steps by
default, on the data module's default corpus unless ``--data-args`` says otherwise), one per row and
seed. Their TensorBoard events are read back and the benchmark writes, into ``--out`` (default
``runs/learning``):

- ``learning.md``: one line per row (also printed): seeds, final ``val/loss`` mean ± sample std over
  seeds, Δ vs dense (mean ± sample std of the per-seed differences ``row - dense`` over the seeds both
  ran), ``params_active`` and ``params_total`` (``model/params_*`` that the run logged), dead-expert
  layers, ``min_share``, ``max_share`` and minutes per run. A ``†`` marks rows whose active parameters
  differ from dense's by more than 2% (learned scorers add a hidden layer per router).
- ``learning.csv``: one line per run: row, seed, final val/loss, every val/loss point as
  ``step:value`` pairs separated by ``;``, params_active, params_total, dead-expert layers, MoE layers,
  min_share, max_share, wall seconds.
- ``learning.png``: val/loss against optimizer steps, the mean over seeds per row with the min-max
  band shaded, dense drawn as a black dashed reference.

Launchers (``--launcher``): ``subprocess``, the default, starts every run as a fresh
``python -m lightning_moe.cli fit ...``; ``fork`` keeps one process per ``--jobs`` slot that imported
the CLI once and forks a fresh child per run calling the same ``lightning_moe.cli.main()`` on the same
arguments (the same results to the last digit: checked on tiny runs), which saves the imports that
dominate short runs (``--tiny``: ~4 s a run instead of ~20 s on a busy 2-core machine). Every run's
command line is the first line of its log, ``<out>/logs/<run>.log``.

Run records live under ``<out>/runs/<row>_s<seed>/`` (TensorBoard, ``config.yaml``, checkpoints),
the CLI's output under ``<out>/logs/``. A run whose events already hold the validation at its last
step is reused, so an interrupted benchmark continues where it stopped (an incomplete run is deleted
and started again; every run is deterministic for its seed, so neither this nor ``--jobs`` changes
the results).

Columns, exactly:

- ``dead-expert layers``: ``RoutingEntropyLogger`` (added to every MoE run) logs per training batch
  each MoE layer's smallest expert share of the kept assignments, ``routing/layer{i}/min_share``. The
  column counts the layers whose value at the last logged training batch is 0, i.e. layers in which at
  least one expert received no token in that batch, averaged over seeds, out of the MoE layers (``x/4``).
  One batch is a snapshot, not a verdict: an expert idle for one batch counts, one that is merely rare
  need not. ``-`` for dense.
- ``min_share`` / ``max_share``: the overall ``routing/min_share`` (minimum over layers) and
  ``routing/max_share`` (maximum over layers) at the last logged training batch, averaged over seeds;
  ``1/E`` both when balanced (E = routed experts after the fine-grained split).
- ``minutes``: wall time of one run, averaged over seeds; upcycled counts both of its phases. With
  ``--launcher subprocess`` (the default) it includes the CLI's start-up (imports, 5-15 s), with
  ``--launcher fork`` it does not. Runs in parallel (``--jobs``) slow each other down.

Rows (``ROWS``), all at tiny.yaml's active parameters (a routed width of 512 per token, equal to dense's
FFN) unless said. ``model/params_active`` as logged, vs dense's 1,082,496: demo, fine_grained_shared,
aux_free_bias, no_balancing and moe_top2_e32 1,098,880 (+1.5%: the routers' 4 x 32 x 128 weights);
moe_top2_e8, top1, uncentred and upcycled 1,086,592 (+0.4%); moe_top2_e16 1,090,688 (+0.8%); hash
1,082,496 (no router weights); attention 1,123,456 (+3.8%), hybrid 1,139,848 (+5.3%), mlp 1,165,056
(+7.6%), mlp_hadamard 1,230,592 (+13.7%), self_supervised 1,140,352 (+5.3%): the learned scorers' own
weights, flagged ``†`` in the table;
deepseek_v3 and deepseek_v3_no_mtp 1,144,320 (+5.7%: the shared expert, 64 wide, and the untied output
head, less latent attention's smaller projections; the MTP module's 899,808 parameters only train and
are not counted).

``upcycled`` spends the same total steps as the others: a dense run of ``steps / 2``
(``dense_baseline.yaml``, same seed, run name ``dense_half_s<seed>``), then
``upcycle_from_dense.yaml`` upcycled from its ``last.ckpt`` for ``steps / 2`` more, split
fine-grained (``--model.moe.num_experts 2 --model.moe.granularity 4 --model.moe.router.top_k 1``: 8 experts of
width 128, 4 active, the dense width 512) so its active parameters equal moe_top2_e8's (that YAML's own
default, whole copies of width 512 with top-2, would double them). Its curve is the dense half's
points followed by the upcycled run's, shifted by ``steps / 2``; its final val/loss is at total step
``steps`` like every other row's. Note that upcycle_from_dense.yaml keeps its own optimiser recipe (lr
1e-3, 20 warm-up steps), and the dense half's cosine schedule ends at ``steps / 2``.

    lightning-moe-bench-learning                                   # every row, seed 0, 600 steps
    lightning-moe-bench-learning --rows dense,demo --seeds 0,1,2 --jobs 2 --threads 1
    lightning-moe-bench-learning --data-args='--data.corpus pydoc'  # (with '=': the value starts with --)
    lightning-moe-bench-learning --tiny --rows dense,demo           # a smoke test: 4 steps, seconds

``--tiny``: 4 steps, validation every 2 steps on 1 batch, ``--model.max_seq_len 32 --data.batch_size 2
--data.corpus pydoc --trainer.log_every_n_steps 1 --trainer.num_sanity_val_steps 0`` on every run (the
upcycled row: 2 + 2 steps); explicit ``--steps``/``--val-every``/``--limit-val-batches`` still win.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROWS: dict[str, list[str]] = {
    # Dense SwiGLU FFNs of width 512 = top_k * expert_d_ff: the reference every row is compared with.
    "dense": ["--config", "cli_configs/dense_baseline.yaml"],
    # The demo as shipped (tiny.yaml): 32 fine-grained experts of width 64, 8 per token, routed by a
    # learned table per token id (TokenScorer). Rows that set no scorer keep that table.
    "demo": [],
    # The demo's fine-grained experts routed by the centred linear scorer of the hidden states instead.
    "linear": ["--config", "cli_configs/routers/linear.yaml"],
    # Without the fine-grained split: 8 experts of width 256, softmax top-2.
    "moe_top2_e8": ["--model.moe.granularity", "1"],
    # Twice the experts, same width and top-k: more total parameters, the same active ones.
    "moe_top2_e16": ["--model.moe.granularity", "1", "--model.moe.num_experts", "16"],
    # Four times the experts, same width and top-k.
    "moe_top2_e32": ["--model.moe.granularity", "1", "--model.moe.num_experts", "32"],
    # DeepSeekMoE: 32 experts of width 64, top-4 routed (256) + 4 shared of width 64 (256) = 512 active.
    "fine_grained_shared": ["--model.moe.router.top_k", "1", "--model.moe.num_shared_experts", "4"],
    # Switch-style top-1 (gate = the softmax probability) with experts twice as wide: same active params.
    "top1": ["--model.moe.granularity", "1", "--model.moe.router.top_k", "1", "--model.moe.router.renormalize", "false",
             "--model.moe.expert_d_ff", "512"],
    # The router before this work: a linear scorer without input centring (8 experts of width 256, top-2).
    "uncentred": ["--model.moe.granularity", "1", "--model.moe.router.init_args.scorer",
                  "{class_path: lightning_moe.routing.LinearScorer, init_args: {center_input: false}}"],
    # Auxiliary-loss-free balancing: sigmoid scores, a selection bias moved by BiasOffsetUpdater, z-loss only
    # (instead of the Switch loss).
    "aux_free_bias": ["--config", "cli_configs/routers/sigmoid_bias.yaml",
                      "--trainer.callbacks+=cli_configs/callbacks/bias_offset_updater.yaml"],
    # No balancing loss at all (no Switch loss, no z-loss): how far does routing collapse?
    "no_balancing": ["--model.moe.balancers", "[]"],
    # Hash routing, two of 8 (so 8 of 32) experts per token: a fixed token-id table, no router weights.
    "hash": ["--config", "cli_configs/routers/hash.yaml"],
    # Learned scorers of the router study, top-2: cosine attention against expert keys.
    "attention": ["--config", "cli_configs/routers/attention.yaml"],
    # An MLP scorer (one GELU hidden layer of 128).
    "mlp": ["--config", "cli_configs/routers/mlp.yaml"],
    # Linear and attention logits mixed with learned weights.
    "hybrid": ["--config", "cli_configs/routers/hybrid.yaml"],
    # MLP features times a projection of the input, then a linear map to logits.
    "mlp_hadamard": ["--config", "cli_configs/routers/mlp_hadamard.yaml"],
    # The router study's self-supervised router: a 2-layer extractor trained by an InfoNCE pretext loss (dropout
    # views, the router's own auxiliary loss, weight 0.01) together with the model, and a linear routing head.
    "self_supervised": ["--config", "cli_configs/routers/self_supervised.yaml"],
    # A tiny DeepSeek-V3 (cli_configs/architectures/deepseek_v3.yaml): multi-head latent attention, the first layer
    # dense, 32 fine-grained experts (8 per token) + 1 shared, sigmoid group-limited routing with bias updates, a
    # sequence-wise balance loss, one multi-token-prediction module (λ = 0.3, training only).
    "deepseek_v3": ["--config", "cli_configs/architectures/deepseek_v3.yaml"],
    # The same without multi-token prediction, at equal steps.
    "deepseek_v3_no_mtp": ["--config", "cli_configs/architectures/deepseek_v3.yaml", "--model.mtp_depth", "0"],
    # Dense for steps/2, then upcycled into 8 fine-grained experts of width 128 (4 active) for steps/2.
    "upcycled": ["--config", "cli_configs/upcycle_from_dense.yaml", "--model.moe.num_experts", "2",
                 "--model.moe.granularity", "4", "--model.moe.router.top_k", "1"],
}

DENSE = "dense"
UPCYCLED = "upcycled"
BASE_CONFIG = "cli_configs/tiny.yaml"
TINY_ARGS = ["--model.max_seq_len", "32", "--data.batch_size", "2", "--data.corpus", "pydoc",
             "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0"]
FULL = {"steps": 600, "val_every": 100, "limit_val_batches": 32}
TINY = {"steps": 4, "val_every": 2, "limit_val_batches": 1}
ACTIVE_TOLERANCE = 0.02  # rows whose params_active differ from dense's by more get a footnote
RECORD = "learning_run.json"  # written into a run's directory when it finished
VAL = "val/loss"


# ---------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Settings:
    out: Path
    steps: int
    val_every: int
    limit_val_batches: int
    threads: int
    extra: list[str]  # --tiny args, then --data-args


@dataclass(frozen=True)
class RunSpec:
    """One ``lightning-moe fit`` invocation."""

    name: str  # TensorBoard run name, e.g. dense_s0
    row: str
    seed: int
    steps: int
    argv: list[str]  # everything after ``fit``


@dataclass
class RunOutcome:
    spec: RunSpec
    scalars: dict[str, list[tuple[int, float]]]
    wall_seconds: float
    reused: bool

    @property
    def curve(self) -> list[tuple[int, float]]:
        """``(optimizer steps taken, val/loss)``: Lightning logs a validation after k steps at step k - 1."""
        return [(step + 1, value) for step, value in self.scalars.get(VAL, [])]

    def last(self, tag: str) -> float | None:
        points = self.scalars.get(tag)
        return points[-1][1] if points else None


@dataclass
class RunResult:
    """One row and seed: what the CSV holds (upcycled: both phases together)."""

    row: str
    seed: int
    curve: list[tuple[int, float]]
    params_active: int
    params_total: int
    dead_layers: int | None
    moe_layers: int | None
    min_share: float | None
    max_share: float | None
    wall_seconds: float
    reused: list[bool] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.curve[-1][1]


def config_dir() -> Path:
    """The repository's ``cli_configs`` (next to the package; else under the working directory)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "cli_configs" / "tiny.yaml").is_file():
            return root / "cli_configs"
    raise SystemExit("lightning-moe-bench-learning: cli_configs/ not found next to the package nor in the working "
                     "directory; run it from the repository root.")


def resolve_configs(args: Sequence[str], configs: Path) -> list[str]:
    """``cli_configs/...`` (alone or after ``=``) made absolute, so any working directory works."""
    prefix = "cli_configs/"
    out = []
    for arg in args:
        if arg.startswith(prefix):
            arg = str(configs / arg[len(prefix):])
        elif "=" + prefix in arg:
            key, value = arg.split("=", 1)
            arg = f"{key}={configs / value[len(prefix):]}"
        out.append(arg)
    return out


def fit_argv(row_args: Sequence[str], name: str, seed: int, steps: int, settings: Settings,
             configs: Path) -> list[str]:
    """The CLI arguments of one run: demo config, row, tiny/data args, then the fixed overrides last (so no row
    config can change steps, validation or where the logs go). The MoE configs log routing themselves
    (``RoutingMonitor`` in their callbacks)."""
    argv = ["--config", BASE_CONFIG, *row_args, *settings.extra]
    argv += [
        "--seed_everything", str(seed),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(settings.val_every),
        "--trainer.limit_val_batches", str(settings.limit_val_batches),
        "--trainer.logger.init_args.save_dir", str(settings.out / "runs"),
        "--trainer.logger.init_args.name", name,
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]
    return resolve_configs(argv, configs)


def chain_for(row: str, seed: int, settings: Settings, configs: Path) -> list[RunSpec]:
    """The runs of one row and seed, in order (two for upcycled: the dense half, then the upcycled half)."""
    if row != UPCYCLED:
        name = f"{row}_s{seed}"
        argv = fit_argv(ROWS[row], name, seed, settings.steps, settings, configs)
        return [RunSpec(name, row, seed, settings.steps, argv)]
    half = settings.steps // 2
    dense_name = f"dense_half_s{seed}"
    dense = RunSpec(dense_name, row, seed, half,
                    fit_argv(ROWS[DENSE], dense_name, seed, half, settings, configs))
    checkpoint = settings.out / "runs" / dense_name / "version_0" / "checkpoints" / "last.ckpt"
    name = f"{row}_s{seed}"
    row_args = [*ROWS[row], "--model.upcycle_from", str(checkpoint)]
    return [dense, RunSpec(name, row, seed, half, fit_argv(row_args, name, seed, half, settings, configs))]


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's latest ``version_*`` with events: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    versions = sorted((p for p in run_dir.glob("version_*") if any(p.glob("events.out.tfevents.*"))),
                      key=lambda p: int(p.name.split("_")[1]) if p.name.split("_")[1].isdigit() else -1)
    if not versions:
        return {}
    accumulator = EventAccumulator(str(versions[-1]), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def complete(spec: RunSpec, scalars: dict[str, list[tuple[int, float]]], run_dir: Path) -> bool:
    """Whether the run finished: its events hold the validation after its last step (and, for the dense half
    of upcycled, its ``last.ckpt`` exists)."""
    if not any(step == spec.steps - 1 for step, _ in scalars.get(VAL, [])):
        return False
    if spec.name.startswith("dense_half_"):
        return any(run_dir.glob("version_*/checkpoints/last.ckpt"))
    return True


def child_env(threads: int) -> dict[str, str]:
    """The environment of every run: ours, with ``threads`` OpenMP/MKL (torch intra-op) threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class SubprocessLauncher:
    """Every run a fresh ``python -m lightning_moe.cli fit ...``."""

    name = "subprocess"

    def __init__(self, threads: int) -> None:
        self.env = child_env(threads)

    def launch(self, argv: list[str], log_path: Path) -> int:
        with log_path.open("a") as log:
            command = [sys.executable, "-m", "lightning_moe.cli", "fit", *argv]
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=self.env).returncode

    def ready(self) -> None:
        pass

    def close(self) -> None:
        pass


class ForkLauncher:
    """Every run a fresh process forked from a *zygote* that imported ``lightning_moe.cli`` once.

    One zygote per worker thread (``--jobs``), started with the runs' environment; for each run it
    forks a child that calls ``lightning_moe.cli.main()`` on ``fit <argv>`` (the ``lightning-moe``
    command's own function, so the same parsing, the same training, the same results) with its
    output in the run's log, waits for it and answers its exit code. It saves the 5-15 s of imports
    per run that dominate short runs. POSIX only (``os.fork``).
    """

    name = "fork"

    def __init__(self, threads: int, log_dir: Path) -> None:
        if not hasattr(os, "fork"):
            raise SystemExit("lightning-moe-bench-learning: --launcher fork needs os.fork (Linux, macOS).")
        self.env = child_env(threads)
        self.log_dir = log_dir
        self.local = threading.local()
        self.zygotes: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def _zygote(self) -> subprocess.Popen:
        zygote = getattr(self.local, "zygote", None)
        if zygote is None or zygote.poll() is not None:
            with self.lock:
                log = (self.log_dir / f"zygote{len(self.zygotes)}.log").open("w")
                zygote = subprocess.Popen(
                    [sys.executable, "-c", "from lightning_moe.bench.learning import zygote; zygote()"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env, text=True,
                )
                log.close()
                self.zygotes.append(zygote)
            assert zygote.stdout is not None
            ready = zygote.stdout.readline()  # after its imports: the runs' wall time leaves them out
            if not ready or not json.loads(ready)["ready"]:
                raise RuntimeError(f"the fork launcher's zygote failed to start (or started threads, making "
                                   f"fork unsafe); see {self.log_dir}/zygote*.log")
            self.local.zygote = zygote
        return zygote

    def ready(self) -> None:
        self._zygote()

    def launch(self, argv: list[str], log_path: Path) -> int:
        zygote = self._zygote()
        assert zygote.stdin is not None and zygote.stdout is not None
        zygote.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}) + "\n")
        zygote.stdin.flush()
        answer = zygote.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork launcher's zygote died (exit {zygote.wait()}); see {self.log_dir}")
        return int(json.loads(answer)["rc"])

    def close(self) -> None:
        for zygote in self.zygotes:
            if zygote.stdin is not None:
                zygote.stdin.close()
            zygote.wait()


def zygote() -> None:
    """The fork launcher's server: import the CLI once, then per request line ``{"argv", "log"}`` fork a child
    running ``lightning-moe fit <argv>`` into ``log`` and answer ``{"rc": exit code}``."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything printed here (or by an import) stays off the answer channel
    import lightning_moe.cli

    # What every run imports later (the data, TensorBoard, the routing heatmap's colormaps); none starts a
    # thread, so forking stays safe.
    for module in ("datasets", "torch.utils.tensorboard", "matplotlib.colors"):
        importlib.import_module(module)
    answers.write(json.dumps({"ready": threading.active_count() == 1}) + "\n")
    answers.flush()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the run
            code = 1
            try:
                log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.dup2(log, 1)
                os.dup2(log, 2)
                sys.argv = ["lightning-moe", "fit", *request["argv"]]
                lightning_moe.cli.main()
                code = 0
            except SystemExit as err:
                code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


class Runner:
    def __init__(self, settings: Settings, launcher: SubprocessLauncher | ForkLauncher) -> None:
        self.settings = settings
        self.launcher = launcher
        self.lock = threading.Lock()
        self.ran = 0
        self.reused = 0

    def say(self, message: str) -> None:
        with self.lock:
            print(f"[learning] {message}", file=sys.stderr, flush=True)

    def run(self, spec: RunSpec) -> RunOutcome:
        run_dir = self.settings.out / "runs" / spec.name
        record_path = run_dir / RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        scalars = read_scalars(run_dir) if run_dir.is_dir() else {}
        if complete(spec, scalars, run_dir) and record.get("argv", spec.argv) == spec.argv:
            wall = float(record["wall_seconds"]) if "wall_seconds" in record else _event_span(run_dir)
            outcome = RunOutcome(spec, scalars, wall, True)
            with self.lock:
                self.reused += 1
            self._progress(outcome)
            return outcome
        if run_dir.exists():
            why = "other arguments" if complete(spec, scalars, run_dir) else "incomplete"
            self.say(f"{spec.name}: {why}, starting it again")
            shutil.rmtree(run_dir)
        log_dir = self.settings.out / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{spec.name}.log"
        command = [sys.executable, "-m", "lightning_moe.cli", "fit", *spec.argv]
        log_path.write_text(f"# {self.launcher.name} launcher, OMP_NUM_THREADS={self.settings.threads}\n"
                            f"{shlex.join(command)}\n\n")
        self.launcher.ready()  # the fork launcher's zygote imports first, outside the run's wall time
        start = time.perf_counter()
        returncode = self.launcher.launch(spec.argv, log_path)
        wall = time.perf_counter() - start
        if returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-25:])
            raise RuntimeError(f"{spec.name} failed (exit {returncode}); log: {log_path}\n{tail}")
        scalars = read_scalars(run_dir)
        if not complete(spec, scalars, run_dir):
            raise RuntimeError(f"{spec.name} finished without a validation at step {spec.steps}; log: {log_path}")
        record_path.write_text(json.dumps({"argv": spec.argv, "wall_seconds": wall, "launcher": self.launcher.name},
                                          indent=1) + "\n")
        outcome = RunOutcome(spec, scalars, wall, False)
        with self.lock:
            self.ran += 1
        self._progress(outcome)
        return outcome

    def _progress(self, outcome: RunOutcome) -> None:
        spec = outcome.spec
        label = "upcycled (dense half)" if spec.name.startswith("dense_half_") else spec.row
        how = "reused" if outcome.reused else "ran"
        self.say(f"{how} {label} seed {spec.seed}: val/loss {outcome.curve[-1][1]:.4f}, "
                 f"{outcome.wall_seconds:.1f} s ({spec.name})")

    def run_chain(self, chain: list[RunSpec]) -> RunResult:
        outcomes = [self.run(spec) for spec in chain]
        return combine(outcomes, self.settings.steps)


def _event_span(run_dir: Path) -> float:
    """Seconds between a run's first and last event (for runs finished without a record)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = []
    for version in run_dir.glob("version_*"):
        accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            times += [e.wall_time for e in accumulator.Scalars(tag)]
    return max(times) - min(times) if times else float("nan")


def _int(value: float | None) -> int:
    return -1 if value is None else int(round(value))


def combine(outcomes: list[RunOutcome], steps: int) -> RunResult:
    """A row and seed from its runs: the last run's sizes and routing; upcycled's curve continues the dense half's
    from ``steps / 2``."""
    last = outcomes[-1]
    curve = list(last.curve)
    if len(outcomes) == 2:
        offset = outcomes[0].spec.steps
        curve = outcomes[0].curve + [(step + offset, value) for step, value in curve]
    layer_tags = sorted(tag for tag in last.scalars if tag.startswith("routing/layer") and tag.endswith("/min_share"))
    finals = [last.last(tag) for tag in layer_tags]
    moe = bool(layer_tags)
    return RunResult(
        row=last.spec.row,
        seed=last.spec.seed,
        curve=curve,
        params_active=_int(last.last("model/params_active")),
        params_total=_int(last.last("model/params_total")),
        dead_layers=sum(1 for value in finals if value == 0.0) if moe else None,
        moe_layers=len(layer_tags) if moe else None,
        min_share=last.last("routing/min_share"),
        max_share=last.last("routing/max_share"),
        wall_seconds=sum(o.wall_seconds for o in outcomes),
        reused=[o.reused for o in outcomes],
    )


def run_all(rows: list[str], seeds: list[int], settings: Settings, jobs: int,
            runner: Runner) -> tuple[list[RunResult], list[str]]:
    """Every row and seed (upcycled's two runs in order), ``jobs`` at a time; results and failure messages."""
    configs = config_dir()
    chains = [chain_for(row, seed, settings, configs) for row in rows for seed in seeds]
    order = sorted(range(len(chains)), key=lambda i: -len(chains[i]))  # the two-run chains first
    results: dict[int, RunResult] = {}
    failures: list[str] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(runner.run_chain, chains[i]): i for i in order}
        for future in as_completed(futures):
            try:
                results[futures[future]] = future.result()
            except RuntimeError as err:
                failures.append(str(err))
                runner.say(str(err))
    return [results[i] for i in sorted(results)], failures


# ---------------------------------------------------------------------------------------------
# Reports


@dataclass
class RowSummary:
    row: str
    results: list[RunResult]
    deltas: list[float]  # per seed, row - dense, over the seeds both ran

    @property
    def finals(self) -> list[float]:
        return [r.final for r in self.results]


def _mean_std(values: list[float], fmt: str, signed: bool = False) -> str:
    if not values:
        return "-"
    sign = "+" if signed else ""
    mean = f"{statistics.fmean(values):{sign}{fmt}}"
    return f"{mean} ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else f"{mean} ± -"


def _mean(values: list[float | None], fmt: str) -> str:
    present = [v for v in values if v is not None]
    return f"{statistics.fmean(present):{fmt}}" if present else "-"


def summarise(results: list[RunResult], rows: list[str]) -> list[RowSummary]:
    dense = {r.seed: r.final for r in results if r.row == DENSE}
    summaries = []
    for row in rows:
        mine = sorted((r for r in results if r.row == row), key=lambda r: r.seed)
        if mine:
            deltas = [r.final - dense[r.seed] for r in mine if r.seed in dense] if row != DENSE else []
            summaries.append(RowSummary(row, mine, deltas))
    return summaries


def dense_active(summaries: list[RowSummary]) -> int | None:
    for summary in summaries:
        if summary.row == DENSE:
            return summary.results[0].params_active
    return None


def markdown_table(summaries: list[RowSummary]) -> str:
    reference = dense_active(summaries)
    header = ("| row | seeds | val/loss | Δ vs dense | params_active | params_total | dead-expert layers | "
              "min_share | max_share | minutes |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = [header, rule]
    flagged = []
    for s in summaries:
        first = s.results[0]
        active = f"{first.params_active:,}"
        if reference and abs(first.params_active - reference) > ACTIVE_TOLERANCE * reference:
            active += " †"
            flagged.append(f"{s.row} {100 * (first.params_active / reference - 1):+.1f}%")
        moe_layers = first.moe_layers
        dead = "-" if moe_layers is None else f"{_mean([r.dead_layers for r in s.results], 'g')}/{moe_layers}"
        delta = "-" if s.row == DENSE else _mean_std(s.deltas, ".4f", signed=True)
        lines.append(
            f"| {s.row} | {len(s.results)} | {_mean_std(s.finals, '.4f')} | {delta} | {active} | "
            f"{first.params_total:,} | {dead} | {_mean([r.min_share for r in s.results], '.4f')} | "
            f"{_mean([r.max_share for r in s.results], '.4f')} | "
            f"{_mean([r.wall_seconds / 60 for r in s.results], '.2f')} |"
        )
    if flagged:
        lines += ["", f"† params_active differs from dense's ({reference:,}) by more than "
                      f"{ACTIVE_TOLERANCE:.0%}: {', '.join(flagged)}."]
    return "\n".join(lines)


def _number(value: float | int | None) -> str:
    return "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def write_csv(results: list[RunResult], rows: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "seed", "final_val_loss", "val_loss_points", "params_active", "params_total",
                         "dead_expert_layers", "moe_layers", "min_share", "max_share", "wall_seconds"])
        for r in sorted(results, key=lambda r: (rows.index(r.row), r.seed)):
            points = ";".join(f"{step}:{value:.6g}" for step, value in r.curve)
            writer.writerow([r.row, r.seed, f"{r.final:.6g}", points, r.params_active, r.params_total,
                             _number(r.dead_layers), _number(r.moe_layers), _number(r.min_share),
                             _number(r.max_share), f"{r.wall_seconds:.1f}"])


def _seeds(summary: RowSummary) -> str:
    n = len(summary.results)
    return f"{n} seed{'s' if n > 1 else ''}"


def write_png(summaries: list[RowSummary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(10, 5.5))
    colours = matplotlib.colormaps["tab20"]
    others = [s for s in summaries if s.row != DENSE]
    for s in summaries:
        steps = sorted(set.intersection(*(set(step for step, _ in r.curve) for r in s.results)))
        values = np.array([[dict(r.curve)[step] for step in steps] for r in s.results])
        mean, low, high = values.mean(0), values.min(0), values.max(0)
        if s.row == DENSE:
            style = {"color": "black", "linestyle": "--", "linewidth": 2.2, "zorder": 5}
            label = f"dense (reference, {_seeds(s)})"
        else:
            style = {"color": colours(others.index(s) % 20), "linewidth": 1.4}
            label = f"{s.row} ({_seeds(s)})"
        ax.plot(steps, mean, marker="o", markersize=2.5, label=label, **style)
        if len(s.results) > 1:
            ax.fill_between(steps, low, high, color=style["color"], alpha=0.12, linewidth=0)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val/loss (nats/byte)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str, what: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--{what}: expected comma-separated integers, got {text!r}")
    if not values or len(set(values)) != len(values):
        parser.error(f"--{what}: expected distinct comma-separated integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-moe-bench-learning",
        description="Matched training runs through the lightning-moe CLI (cli_configs/tiny.yaml plus each row's "
                    "arguments): final val/loss per row vs dense at equal active parameters, dead experts, routing "
                    "balance; writes learning.md, learning.csv and learning.png.",
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {','.join(ROWS)} "
                        "(default: all)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {FULL['steps']}; "
                        f"--tiny {TINY['steps']})")
    parser.add_argument("--val-every", type=int, help=f"steps between validations (default {FULL['val_every']}; "
                        f"--tiny {TINY['val_every']}); must divide --steps")
    parser.add_argument("--limit-val-batches", type=int, help="validation batches (default "
                        f"{FULL['limit_val_batches']}; --tiny {TINY['limit_val_batches']})")
    parser.add_argument("--data-args", default="", help="extra CLI arguments for every run, shell-quoted, e.g. "
                        "--data-args='--data.corpus pydoc' or --data-args=\"--data.data_files '[a.txt]'\"")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS (torch threads) of every run "
                        "(default 2)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1; results do not depend on it)")
    parser.add_argument("--out", default="runs/learning", help="output directory (default runs/learning)")
    parser.add_argument("--launcher", choices=["subprocess", "fork"], default="subprocess",
                        help="subprocess (default): every run a fresh `python -m lightning_moe.cli fit ...`; fork: "
                        "every run a process forked from one that imported the CLI once, calling the same "
                        "lightning_moe.cli.main() (same results, no 5-15 s of imports per run: for many short runs)")
    parser.add_argument("--tiny", action="store_true", help="smoke setting: 4 steps, validation every 2 on 1 batch, "
                        "sequences of 32, batches of 2, the pydoc corpus")
    return parser


def bench_learning(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (the command line by default), run or reuse every run, write the reports; the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = TINY if args.tiny else FULL
    steps = defaults["steps"] if args.steps is None else args.steps
    val_every = defaults["val_every"] if args.val_every is None else args.val_every
    limit_val = defaults["limit_val_batches"] if args.limit_val_batches is None else args.limit_val_batches
    rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in rows if name not in ROWS]
    if unknown or not rows or len(set(rows)) != len(rows):
        parser.error(f"--rows: unknown or repeated {unknown or rows}; valid names: {','.join(ROWS)}")
    seeds = _int_list(args.seeds, "seeds", parser)
    for name, value in (("steps", steps), ("val-every", val_every), ("limit-val-batches", limit_val),
                        ("threads", args.threads), ("jobs", args.jobs)):
        if value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if steps % val_every:
        parser.error(f"--val-every ({val_every}) must divide --steps ({steps}): the last validation must be at the "
                     "last step")
    if UPCYCLED in rows and (steps % 2 or (steps // 2) % val_every):
        parser.error(f"the upcycled row runs --steps / 2 twice: --steps ({steps}) must be even and --val-every "
                     f"({val_every}) must divide {steps / 2:g}")
    try:
        data_args = shlex.split(args.data_args)
    except ValueError as err:
        parser.error(f"--data-args: {err}")
    out = Path(args.out).resolve()
    settings = Settings(out, steps, val_every, limit_val, args.threads, [*(TINY_ARGS if args.tiny else []), *data_args])

    (out / "logs").mkdir(parents=True, exist_ok=True)
    launcher = (ForkLauncher(args.threads, out / "logs") if args.launcher == "fork"
                else SubprocessLauncher(args.threads))
    runner = Runner(settings, launcher)
    start = time.perf_counter()
    try:
        results, failures = run_all(rows, seeds, settings, args.jobs, runner)
    finally:
        launcher.close()
    runner.say(f"finished: {runner.ran} runs ran, {runner.reused} reused, {len(failures)} failed "
               f"({time.perf_counter() - start:.0f} s)")
    if not results:
        print("lightning-moe-bench-learning: no run finished.", file=sys.stderr)
        return 1

    summaries = summarise(results, rows)
    setup = (f"lightning-moe-bench-learning: {BASE_CONFIG} + row args{' + --tiny' if args.tiny else ''}, "
             f"{steps} steps (upcycled: {steps // 2} dense + {steps // 2} upcycled), val/loss every {val_every} "
             f"steps on {limit_val} batches, seeds {','.join(map(str, seeds))}, data args "
             f"{shlex.join(data_args) or '(none)'}, {args.threads} threads per run, {args.jobs} at once, "
             f"{args.launcher} launcher. "
             "val/loss: mean ± sample std over seeds; Δ: mean ± std of per-seed (row - dense); dead-expert layers: "
             "MoE layers with an expert that got no token in the last logged training batch, mean over seeds; "
             "min/max_share at that batch; minutes per run.")
    table = markdown_table(summaries)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.md").write_text(f"{setup}\n\n{table}\n")
    write_csv(results, rows, out / "learning.csv")
    title = (f"val/loss, mean over seeds (band: min-max), {steps} steps, seeds {','.join(map(str, seeds))}"
             f"{' (--tiny)' if args.tiny else ''}")
    write_png(summaries, out / "learning.png", title)
    print(setup)
    print()
    print(table)
    print(f"\nwrote {out / 'learning.md'}, {out / 'learning.csv'}, {out / 'learning.png'}")
    if failures:
        print(f"lightning-moe-bench-learning: {len(failures)} run(s) failed; see the logs under {out / 'logs'}.",
              file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """Console script ``lightning-moe-bench-learning``."""
    sys.exit(bench_learning())


if __name__ == "__main__":
    main()

"""Training throughput (tokens/s) and MFU of an MoE transformer against the dense model with the same active parameters.

Both models are ``MoETransformer``. Sizes come from a preset, each overridable by its option:

- ``tiny`` (default): the tiny model of ``cli_configs/tiny.yaml``: vocabulary 256, D=128, 4 layers, 4 heads,
  E=8 experts of width F=256, top-2; batch 16 x 128 tokens, float32.
- ``gpu``: large enough that a step keeps an H100/H200 busy rather than waiting on the host: vocabulary 256,
  D=1024, 8 layers, 16 heads, E=8, K=2, F=2048 (dense FFN width 4096 = 4D), batch 16 x 1024 tokens, bfloat16;
  about 134M active and 436M total parameters, ~15 TFLOP per dense step. The byte vocabulary of the project
  keeps the output head (the same cost in both models) from diluting the MoE/dense ratio.

An MoE FFN in every layer, Switch aux loss 0.01 and z-loss 0.001, AdamW lr 3e-3 weight decay 0.1 (``fused`` on
CUDA). The dense model is ``moe_every=0`` with FFN width K*F (``cli_configs/dense_baseline.yaml``), so its active
parameters equal the MoE's, the routers' ``n_layers * E * D`` weights aside; both counts are printed
(``parameter_counts()``). ``--dispatcher`` takes any name in ``lightning_moe.dispatch.DISPATCHERS``; by default
``triton`` on CUDA where registered, else ``grouped``.

Precision (``--dtype``): ``float32``; ``bfloat16``: ``torch.autocast`` around forward and loss, weights,
gradients and AdamW state in float32 (the standard mixed precision, Lightning's ``bf16-mixed``);
``bfloat16-true``: weights, gradients and AdamW state in bfloat16, no autocast (Lightning's ``bf16-true``).
Under ``bfloat16`` a note is printed for a model whose FFNs return float32 from one probe forward: their matmuls
ignored autocast (a dispatcher computing in its float32 input's dtype), so the ratio compares unlike precisions.

One training step is plain PyTorch: ``zero_grad(set_to_none=True)``, forward on a random token batch
``(B, S+1)`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), cross-entropy plus the MoE's aux losses, backward,
``AdamW.step()``. The two models train in the same process, one step each per round, the order alternating
between rounds (these machines are noisy), ``--warmup`` untimed rounds first; on CUDA each step is bracketed by
``torch.cuda.synchronize``. Printed: a markdown table (ms/step, tokens/s, parameters, last loss, training
FLOPs per token, achieved TFLOP/s, MFU, and on CUDA the step's peak memory) and the MoE/dense tokens/s ratio of
medians and of minimums against the >= 0.8 target. ``--json PATH`` writes the same figures.

FLOPs (PaLM's convention, as nanoGPT's ``estimate_mfu``): a training token costs ``6 N + 12 L S d_attn``, with N
the matmul weights a token goes through (``MoETransformer.flops_per_token``'s count: the active parameters
without the norms and without the untied input embedding, a lookup; the output head and the routers count) and
``12 L S d_attn`` attention's scores and values (d_attn = D), forward and backward, counted without halving
for the causal mask. Aux losses, norms and elementwise work are not counted. MFU = FLOPs/token x tokens/s
(median) / peak. The peak (``--peak-tflops``): a number in TFLOP/s; ``auto``: the best of a few large matmuls
in the run's compute dtype measured at start (achievable, not datasheet, so MFU reads higher); omitted: on CUDA
with a bfloat16 dtype the dense (no sparsity) bfloat16 datasheet peak of the device if it is in
``PEAK_BF16_TFLOPS``, else MFU is ``n/a``. The header says which peak was used.

    python benchmarks/train_throughput.py                       # tiny model, batch 16 x 128, 30 steps
    python benchmarks/train_throughput.py --dispatcher loop --steps 10 --peak-tflops 0.119
    python benchmarks/train_throughput.py --preset gpu --json train_throughput.json     # on an H100/H200
    python benchmarks/train_throughput.py --preset gpu --batch-size 8 --layers 4 --dtype bfloat16-true
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.balancing import SwitchAuxLoss, ZLoss
from lightning_moe.dispatch import DISPATCHERS
from lightning_moe.layers import MoEConfig
from lightning_moe.models import MoETransformer
from lightning_moe.routing import TopKRouter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import device_name, synchronize  # noqa: E402  (a sibling script: one way to name the hardware)

TARGET = 0.8
DTYPES = ("float32", "bfloat16", "bfloat16-true")
SIZES = ("vocab_size", "d_model", "n_layers", "n_heads", "experts", "top_k", "expert_d_ff", "seq_len", "batch_size")
PRESETS: dict[str, dict[str, int | str]] = {
    "tiny": dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, experts=8, top_k=2, expert_d_ff=256,
                 seq_len=128, batch_size=16, dtype="float32", steps=30, warmup=3),
    "gpu": dict(vocab_size=256, d_model=1024, n_layers=8, n_heads=16, experts=8, top_k=2, expert_d_ff=2048,
                seq_len=1024, batch_size=16, dtype="bfloat16", steps=30, warmup=5),
}
# Dense bfloat16 tensor-core peaks (no 2:4 sparsity) from NVIDIA's datasheets, TFLOP/s; the first key found in
# torch.cuda.get_device_name wins, so more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0), ("B200", 2250.0), ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
)
DISPATCHER_PREFERENCE_CUDA = ("triton", "grouped")


# ----------------------------------------------------------------------------------------------- arguments


def peak_argument(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        peak = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of TFLOP/s or 'auto', got {value!r}") from None
    if not peak > 0 or math.isinf(peak):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value!r}")
    return peak


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS], default="tiny",
                        help="model size, batch, dtype, steps and warm-up; explicit options override its values")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model first")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None, help="input tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=None, help="D")
    parser.add_argument("--layers", "--n-layers", dest="n_layers", type=int, default=None)
    parser.add_argument("--heads", "--n-heads", dest="n_heads", type=int, default=None)
    parser.add_argument("--experts", type=int, default=None, help="E")
    parser.add_argument("--top-k", type=int, default=None, help="K")
    parser.add_argument("--d-ff", "--expert-d-ff", dest="expert_d_ff", type=int, default=None,
                        help="F, each expert's width; the dense FFN width is K * F")
    parser.add_argument("--dispatcher", default=None,
                        help=f"MoE dispatch backend, one of {sorted(DISPATCHERS)} (default: on CUDA the first "
                             f"registered of {', '.join(DISPATCHER_PREFERENCE_CUDA)}, on CPU grouped)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="bfloat16: autocast, float32 weights and optimizer; bfloat16-true: bfloat16 weights")
    parser.add_argument("--peak-tflops", type=peak_argument, default=None,
                        help="peak FLOP/s for MFU, in TFLOP/s, or 'auto' (measure a large matmul); default: "
                             "the datasheet bfloat16 peak of a known GPU, else no MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-aux-losses", action="store_true", help="train the MoE without its balancing losses")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON to PATH")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options with the preset's values filled in where not given, the dispatcher resolved, all checked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in (*SIZES, "steps", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} exceeds --experts {args.experts}")
    if args.d_model % args.n_heads or (args.d_model // args.n_heads) % 2:
        parser.error(f"--d-model {args.d_model} must be divisible by --heads {args.n_heads} into even head widths")
    if args.dispatcher is None:
        preferred = DISPATCHER_PREFERENCE_CUDA if args.device == "cuda" else ("grouped",)
        args.dispatcher = next(name for name in (*preferred, "grouped") if name in DISPATCHERS)
    if args.dispatcher not in DISPATCHERS:
        parser.error(f"--dispatcher {args.dispatcher!r} is not in lightning_moe.dispatch.DISPATCHERS "
                     f"({sorted(DISPATCHERS)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


# ----------------------------------------------------------------------------------------------- models


def build_models(args: argparse.Namespace, device: torch.device) -> dict[str, MoETransformer]:
    common = dict(vocab_size=args.vocab_size, max_seq_len=args.seq_len, d_model=args.d_model,
                  n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.top_k * args.expert_d_ff)
    top_k = args.top_k

    def router(d_model: int, num_experts: int) -> TopKRouter:
        return TopKRouter(d_model, num_experts, top_k=top_k)

    balancers = [] if args.no_aux_losses else [SwitchAuxLoss(0.01), ZLoss(0.001)]
    torch.manual_seed(0)
    moe = MoETransformer(**common, moe_every=1, moe=MoEConfig(
        num_experts=args.experts, expert_d_ff=args.expert_d_ff, router=router, balancers=balancers,
        dispatcher=args.dispatcher))
    torch.manual_seed(0)
    dense = MoETransformer(**common, moe_every=0, moe=MoEConfig(balancers=[]))
    weights = torch.bfloat16 if args.dtype == "bfloat16-true" else torch.float32
    return {"dense": dense.to(device, weights), f"moe ({args.dispatcher})": moe.to(device, weights)}


def train_flops_per_token(model: MoETransformer, seq_len: int) -> tuple[int, int]:
    """``(N, 6 N + 12 L S d_attn)``: matmul weights per token and training FLOPs per token (PaLM's count).

    ``flops_per_token`` is Kaplan's forward count ``2 N + 2 S sum(d_attn)``; PaLM counts attention's
    scores and values separately (``4 S d_attn`` forward), and the backward twice the forward.
    """
    attention = seq_len * sum(block.attn.score_width for block in model.blocks)  # S * sum over layers of d_attn
    matmul_params = round((model.flops_per_token(seq_len) - 2 * attention) / 2)
    return matmul_params, round(6 * matmul_params + 12 * attention)


# ----------------------------------------------------------------------------------------------- peak FLOP/s


def compute_dtype(dtype: str) -> torch.dtype:
    return torch.float32 if dtype == "float32" else torch.bfloat16


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of a few large matmuls: (8192 x 8192) @ (8192 x 8192) on CUDA; on CPU (4096 x 512) @ (512 x 2048), the
    shape of ENVIRONMENT.md's measured rate, or 512-cubed in bfloat16, which these CPUs run at ~0.5 GFLOP/s."""
    if device.type == "cuda":
        m, k, n, repeats = 8192, 8192, 8192, 20
    else:
        m, k, n, repeats = (4096, 512, 2048, 3) if dtype == torch.float32 else (512, 512, 512, 2)
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    a @ b  # warm-up: library initialisation, kernel selection
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e12


def resolve_peak(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    """``(peak TFLOP/s or None, where it comes from)``."""
    if args.peak_tflops == "auto":
        dtype = compute_dtype(args.dtype)
        peak = measure_matmul_tflops(device, dtype)
        return peak, f"measured: best large {str(dtype).removeprefix('torch.')} matmul on this device"
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "none on CPU without --peak-tflops"
    name = torch.cuda.get_device_name(device)
    if args.dtype == "float32":
        return None, "the table holds bfloat16 peaks; pass --peak-tflops for float32"
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)
    if peak is None:
        return None, f"{name!r} not in the table of bfloat16 peaks; pass --peak-tflops"
    return peak, f"datasheet dense bfloat16 peak of {name}"


# ----------------------------------------------------------------------------------------------- timing


def train_step(model: MoETransformer, optimizer: torch.optim.Optimizer, ids_BS1: Tensor,
               autocast: contextlib.AbstractContextManager) -> Tensor:
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        logits_BSV = model(ids_BS1[:, :-1])
        loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), ids_BS1[:, 1:].flatten())
        loss = loss + sum(model.aux_losses().values())
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class Measured:
    """Per model: seconds of each timed step, the last loss, the step peak (MiB, CUDA only: the most one step
    allocated above what was allocated at its start: activations, gradients, optimizer temporaries); and the
    run's ``max_memory_allocated`` (GiB, CUDA only)."""

    times: dict[str, list[float]]
    losses: dict[str, float]
    step_peak_mib: dict[str, float | None]
    run_peak_gib: float | None


def run_rounds(models: dict[str, MoETransformer], args: argparse.Namespace, device: torch.device) -> Measured:
    cuda = device.type == "cuda"
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, fused=cuda or None)
                  for name, model in models.items()}
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), generator=generator).to(device)
               for _ in range(4)]
    times: dict[str, list[float]] = {name: [] for name in models}
    last_loss: dict[str, Tensor] = {}
    step_peak: dict[str, float | None] = dict.fromkeys(models, 0.0 if cuda else None)
    run_peak = 0
    names = list(models)
    for round_ in range(args.warmup + args.steps):
        ids = batches[round_ % len(batches)]
        for name in names if round_ % 2 == 0 else names[::-1]:
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" \
                else contextlib.nullcontext()
            synchronize(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            last_loss[name] = train_step(models[name], optimizers[name], ids, autocast)
            synchronize(device)
            seconds = time.perf_counter() - start
            if round_ >= args.warmup:
                times[name].append(seconds)
            if cuda:
                run_peak = max(run_peak, torch.cuda.max_memory_allocated(device))
                step_peak[name] = max(step_peak[name], (torch.cuda.max_memory_allocated(device) - before) / 2**20)
    losses = {name: loss.item() for name, loss in last_loss.items()}
    return Measured(times, losses, step_peak, run_peak / 2**30 if cuda else None)


@torch.no_grad()
def ffn_output_dtypes(model: MoETransformer, ids_BS: Tensor) -> set[str]:
    """The dtypes the FFNs return in one eval-mode forward under bfloat16 autocast."""
    seen: set[str] = set()
    hooks = [block.ffn.register_forward_hook(lambda _m, _i, out: seen.add(str(out.dtype).removeprefix("torch.")))
             for block in model.blocks]
    model.eval()
    try:
        with torch.autocast(ids_BS.device.type, dtype=torch.bfloat16):
            model(ids_BS)
    finally:
        model.train()
        for hook in hooks:
            hook.remove()
    return seen


def autocast_notes(models: dict[str, MoETransformer], args: argparse.Namespace, device: torch.device) -> list[str]:
    """Under ``--dtype bfloat16``, a note for each model whose FFNs return float32: FFN matmuls that follow
    autocast return bfloat16, ones that compute in float32 (as a dispatcher may) return float32."""
    if args.dtype != "bfloat16":
        return []
    ids_1S = torch.randint(0, args.vocab_size, (1, args.seq_len), device=device)
    notes = []
    for name, model in models.items():
        dtypes = ffn_output_dtypes(model, ids_1S)
        if dtypes != {"bfloat16"}:
            notes.append(f"under bfloat16 autocast the FFNs of {name} return {', '.join(sorted(dtypes))}: their "
                         "matmuls do not follow autocast (float32 compute), so the ratio compares unlike precisions")
    return notes


# ----------------------------------------------------------------------------------------------- report


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def summarise(models: dict[str, MoETransformer], args: argparse.Namespace, measured: Measured,
              peak: float | None) -> dict:
    """One record per model (JSON-ready) and the MoE/dense ratios."""
    tokens_per_step = args.batch_size * args.seq_len
    rows = {}
    for name, model in models.items():
        times = measured.times[name]
        med, low = statistics.median(times), min(times)
        counts = model.parameter_counts()
        matmul_params, flops_per_token = train_flops_per_token(model, args.seq_len)
        achieved = flops_per_token * tokens_per_step / med / 1e12
        rows[name] = dict(
            median_ms=med * 1e3, min_ms=low * 1e3, tokens_per_s_median=tokens_per_step / med,
            tokens_per_s_best=tokens_per_step / low, params_total=counts["total"], params_active=counts["active"],
            matmul_params=matmul_params, train_flops_per_token=flops_per_token, tflops_median=achieved,
            mfu=None if peak is None else achieved / peak, step_peak_mib=measured.step_peak_mib[name],
            last_loss=measured.losses[name], step_ms=[t * 1e3 for t in times])
    dense, moe = rows["dense"], rows[next(name for name in rows if name != "dense")]
    ratio_median = moe["tokens_per_s_median"] / dense["tokens_per_s_median"]
    ratio_best = moe["tokens_per_s_best"] / dense["tokens_per_s_best"]
    return dict(models=rows, ratio_median=ratio_median, ratio_best=ratio_best, target=TARGET,
                target_met=ratio_median >= TARGET)


def print_report(summary: dict, args: argparse.Namespace, argv: list[str], device: torch.device,
                 peak: float | None, peak_source: str) -> None:
    header = summary["header"]
    print(f"### {header['date']}, {header['device']}, torch {header['torch']}"
          f"{', CUDA ' + header['cuda'] if header['cuda'] else ''}, triton {header['triton']}, "
          f"{header['threads']} threads, {args.dtype}\n")
    print(f"`python benchmarks/train_throughput.py {' '.join(argv)}`: preset {args.preset}; vocabulary "
          f"{args.vocab_size}, D={args.d_model}, {args.n_layers} layers, {args.n_heads} heads; MoE E={args.experts} "
          f"K={args.top_k} F={args.expert_d_ff} ({args.dispatcher}), dense FFN width {args.top_k * args.expert_d_ff}; "
          f"batch {args.batch_size} x {args.seq_len} tokens; {args.steps} interleaved steps after {args.warmup} "
          f"warm-up. Peak for MFU: {'n/a' if peak is None else f'{peak:.4g} TFLOP/s'} ({peak_source}).\n")
    print("| model | median ms/step | min ms/step | tokens/s (median) | tokens/s (best) | params total "
          "| params active | last loss | GFLOP/token | TFLOP/s | MFU | step peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in summary["models"].items():
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu'] * 100:.2f}%"
        memory = "-" if row["step_peak_mib"] is None else f"{row['step_peak_mib']:.0f}"
        print(f"| {name} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['tokens_per_s_median']:.0f} "
              f"| {row['tokens_per_s_best']:.0f} | {row['params_total']:,} | {row['params_active']:,} "
              f"| {row['last_loss']:.3f} | {row['train_flops_per_token'] / 1e9:.4g} | {row['tflops_median']:.4g} "
              f"| {mfu} | {memory} |")
    dense, moe_name = summary["models"]["dense"], next(name for name in summary["models"] if name != "dense")
    router_params = args.n_layers * args.experts * args.d_model
    print(f"\nActive parameters: MoE {summary['models'][moe_name]['params_active']:,} (of which routers "
          f"{router_params:,}), dense {dense['params_active']:,}. FLOPs per training token: 6 N + 12 L S D "
          f"(PaLM), N = matmul weights per token; TFLOP/s and MFU from median step times.")
    if header["cuda_peak_gib"] is not None:
        print(f"CUDA max_memory_allocated over the run: {header['cuda_peak_gib']:.2f} GiB (both models, their "
              "AdamW states, one step's activations); step peak = the most one step allocated above its start.")
    for note in summary["notes"]:
        print(f"Note: {note}.")
    verdict = "met" if summary["target_met"] else "not met"
    print(f"MoE/dense tokens/s: {summary['ratio_median']:.3f} (medians), {summary['ratio_best']:.3f} (minimums); "
          f"target >= {TARGET} (medians): {verdict}.", flush=True)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak, peak_source = resolve_peak(args, device)
    models = build_models(args, device)
    notes = autocast_notes(models, args, device)
    measured = run_rounds(models, args, device)

    summary = summarise(models, args, measured, peak)
    cuda = device.type == "cuda"
    summary["header"] = dict(
        date=datetime.date.today().isoformat(), device=device_name(device), torch=torch.__version__,
        cuda=torch.version.cuda if cuda else None, triton=package_version("triton"), threads=torch.get_num_threads(),
        cuda_peak_gib=measured.run_peak_gib)
    summary["config"] = {key: getattr(args, key) for key in (*SIZES, "preset", "dispatcher", "dtype", "steps",
                                                             "warmup", "device", "no_aux_losses")}
    summary["argv"], summary["peak_tflops"], summary["peak_source"] = argv, peak, peak_source
    summary["notes"] = notes
    print_report(summary, args, argv, device, peak, peak_source)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=1)
    return summary


if __name__ == "__main__":
    main()

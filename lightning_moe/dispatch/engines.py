"""GEMM engines for the ``triton`` dispatcher's expert step, and the ``auto`` choice between them.

Legend: ``A`` rows (assignments) sorted by expert, ``D`` model width, ``E`` experts, ``E1`` = E + 1
offsets, ``F`` expert hidden width.

The dispatcher's permute and combine are always our fused kernels; the SwiGLU experts between them,
``out_AD = (silu(x W_gate) * (x W_up)) W_out`` per expert on its rows (ungated), run on an *engine*:

- ``"triton"``: our grouped GEMM (:func:`~lightning_moe.kernels.grouped_gemm.grouped_swiglu`);
- ``"grouped_mm"``: :func:`torch.nn.functional.grouped_mm` (cuBLAS/CUTLASS on CUDA, where it wants
  bfloat16 and 16-byte-aligned strides; widths that are not aligned are zero-padded here). A tiny
  forward and backward probes it once per device and dtype; if torch refuses, the engine is
  unavailable, ``auto`` never picks it and forcing it raises ``RuntimeError`` with torch's reason;
- ``"auto"``: the first call for a key ``(device type and name, dtype, E, D, F)`` times forward and
  backward of every available engine on the call's own tensors (a warm-up, then a few rounds,
  interleaved), keeps the faster in a process-wide table, and uses it for that key from then on.
  Where ``LIGHTNING_MOE_ENGINE_CACHE`` names a JSON file, choices are read from it and new ones
  written to it (atomically), so later runs skip the measurement.

Nothing is measured (nor probed) while ``torch.compile`` traces or a CUDA graph is captured: there
``auto`` takes the key's cached choice, or ``"triton"`` if there is none, so warm up eagerly first
(one eager step) to let ``auto`` measure. Compiled code also takes ``"triton"`` where torch cannot
trace ``grouped_mm`` in the dtype (torch 2.13's shape function takes bfloat16 only), and a forced
``"grouped_mm"`` then raises ``RuntimeError`` saying so. Once a key is chosen, a call reads no
value back from the GPU. Ranks of a data-parallel job measure separately and may choose
differently; both engines compute the same function, to rounding. The measurement runs on the
first step, so that step briefly holds a second set of expert gradients.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_moe.kernels._triton import interpreting, unavailable_reason

ENGINES = ("triton", "grouped_mm", "auto")
"""Valid ``engine`` values: the two GEMM engines and the measured choice between them."""
COMPUTE_ENGINES = ("triton", "grouped_mm")
CACHE_ENV = "LIGHTNING_MOE_ENGINE_CACHE"
"""Environment variable naming a JSON file that keeps ``auto``'s choices across processes."""

WARMUP = 1  # untimed calls per engine (Triton autotunes and compiles in the first)
REPEATS = 5  # timed rounds; each runs every engine once, so noise hits them alike

_log = logging.getLogger(__name__)
Weights = tuple[Tensor, Tensor, Tensor]


class EngineKey(NamedTuple):
    """What ``auto`` keys its choice on: the device (type and name), dtype and expert shapes."""

    device: str  # "cuda:NVIDIA H200", "cpu:x86_64"
    dtype: str  # "bfloat16"
    num_experts: int
    d_model: int
    d_ff: int


_CHOICES: dict[EngineKey, str] = {}  # auto's choices, this process
_PROBES: dict[tuple[str, torch.dtype], str | None] = {}  # grouped_mm's refusal reason per (device, dtype)
_META_PROBES: dict[torch.dtype, str] = {}  # why torch.compile cannot trace grouped_mm per dtype ("" if it can)
_file_state: dict[str, str | None] = {"loaded": None}  # the cache file merged into _CHOICES, if any


# --- The engines ---------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _tf32_allowed() -> bool:
    # float32 follows torch's own matmul setting (Lightning's `torch.set_float32_matmul_precision`):
    # "highest" keeps exact float32, "high"/"medium" allow TF32 tensor cores. A constant to Dynamo.
    return torch.get_float32_matmul_precision() != "highest"


def _precision(x_AD: Tensor) -> str:
    return "tf32" if x_AD.dtype == torch.float32 and _tf32_allowed() else "ieee"


def triton_swiglu(x_AD: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_out_EFD: Tensor,
                  offsets_E1: Tensor) -> Tensor:
    """The ``triton`` engine: our grouped GEMMs, ``(A, D)`` in x's dtype (weights cast to it)."""
    from lightning_moe.kernels.grouped_gemm import grouped_swiglu

    weights = (w.to(x_AD.dtype) for w in (w_gate_EDF, w_up_EDF, w_out_EFD))
    return grouped_swiglu(x_AD, *weights, offsets_E1, precision=_precision(x_AD))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient a real tensor: ``grouped_mm``'s backward rejects
    the stride-0 gradient that ``y.sum().backward()`` sends ("Invalid strides/sizes")."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        return grad.contiguous()


def _aligned(t: Tensor, pad: tuple[int, ...]) -> Tensor:
    """``t`` zero-padded at the end of its last dims (``F.pad`` order), on a 16-byte-aligned base."""
    if any(pad):
        return F.pad(t, pad)
    # A view into a larger buffer (a flat parameter) may start off a 16-byte boundary; a copy does not.
    if not torch.compiler.is_compiling() and t.data_ptr() % 16:
        return t.clone()
    return t


def grouped_mm_swiglu(x_AD: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_out_EFD: Tensor,
                      offsets_E1: Tensor) -> Tensor:
    """The ``grouped_mm`` engine: three :func:`torch.nn.functional.grouped_mm`, ``(A, D)`` in x's dtype.

    ``offsets_E1`` is int64 ``(E + 1,)`` starting at 0 (as for the Triton engine); ``grouped_mm``
    takes the int32 ends, ``offs = offsets_E1[1:]``. Strides must be multiples of 16 bytes, so D
    and F are zero-padded to a multiple of ``16 / itemsize`` when they are not (exact: the padded
    columns are zeros, and silu(0) * 0 = 0); the result is sliced back to D columns.
    """
    D, F_ = w_gate_EDF.shape[1:]
    align = 16 // x_AD.element_size()
    pad_d, pad_f = -D % align, -F_ % align
    offs_E = offsets_E1[1:].to(torch.int32)
    w_gate_EDF, w_up_EDF, w_out_EFD = (w.to(x_AD.dtype) for w in (w_gate_EDF, w_up_EDF, w_out_EFD))
    x_AD = _aligned(x_AD.contiguous(), (0, pad_d))
    w_gate_EDF, w_up_EDF = (_aligned(w, (0, pad_f, 0, pad_d)) for w in (w_gate_EDF, w_up_EDF))
    w_out_EFD = _aligned(w_out_EFD, (0, pad_d, 0, pad_f))
    h_AF = F.silu(F.grouped_mm(x_AD, w_gate_EDF, offs=offs_E)) * F.grouped_mm(x_AD, w_up_EDF, offs=offs_E)
    out_AD = F.grouped_mm(h_AF, w_out_EFD, offs=offs_E)
    return _ContiguousGrad.apply(out_AD[:, :D] if pad_d else out_AD)


_RUNNERS: dict[str, Callable[..., Tensor]] = {"triton": triton_swiglu, "grouped_mm": grouped_mm_swiglu}


# --- Availability --------------------------------------------------------------------------------


@functools.cache
def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine() or 'unknown'}"


def _capturing(device: torch.device) -> bool:
    """True inside ``torch.compile`` tracing or a CUDA graph capture: no measuring, no probing."""
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run a tiny ``grouped_mm`` forward and backward; the error's first line if torch refuses."""
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            x_AD = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
            w_EDF = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
            y_AF = F.grouped_mm(x_AD, w_EDF, offs=torch.tensor([3, 8], dtype=torch.int32, device=device))
            torch.autograd.grad(y_AF, (x_AD, w_EDF), torch.ones_like(y_AF))
    except Exception as error:  # RuntimeError, NotImplementedError, ...: whatever torch raises
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"torch.nn.functional.grouped_mm refuses {dtype} on {_device_label(device)} " \
               f"({type(error).__name__}: {message})"
    return None


def engine_unavailable_reason(engine: str, x_AD: Tensor) -> str | None:
    """Why ``engine`` cannot run on rows like ``x_AD`` (its device and dtype), or ``None`` if it can.

    ``grouped_mm`` is probed once per device and dtype (the result is kept); while compiling or
    capturing an unprobed pair is taken as available, and the op itself raises if it is not.
    """
    if engine == "triton":
        return unavailable_reason(x_AD)
    if engine != "grouped_mm":
        raise ValueError(f"`engine` must be one of {COMPUTE_ENGINES}, got {engine!r}.")
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm (it came in torch 2.8)"
    key = (_device_label(x_AD.device), x_AD.dtype)
    if key not in _PROBES:
        if _capturing(x_AD.device):
            return None
        _PROBES[key] = _probe_grouped_mm(x_AD.device, x_AD.dtype)
    return _PROBES[key]


# --- The auto choice -----------------------------------------------------------------------------


def engine_key(x_AD: Tensor, w_gate_EDF: Tensor) -> EngineKey:
    """The key ``auto`` caches its choice under, for rows ``x_AD`` and experts ``w_gate_EDF``."""
    return _key(x_AD.device, x_AD.dtype, *w_gate_EDF.shape)


def _key(device: torch.device, dtype: torch.dtype, num_experts: int, d_model: int, d_ff: int) -> EngineKey:
    return EngineKey(_device_label(device), str(dtype).removeprefix("torch."), num_experts, d_model, d_ff)


def engine_choices() -> dict[EngineKey, str]:
    """A copy of ``auto``'s choices so far, ``{EngineKey: engine}`` (the cache file's included)."""
    _merge_file()
    return dict(_CHOICES)


def clear_engine_choices() -> None:
    """Forget ``auto``'s choices (not the cache file's contents: it is read again on next use)."""
    _CHOICES.clear()
    _file_state["loaded"] = None


def _time_once(run: Callable[[], None], device: torch.device) -> float:
    """Seconds one ``run()`` takes: CUDA events on the GPU, ``perf_counter`` elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    run()
    return time.perf_counter() - begin


def measure_engines(x_AD: Tensor, weights: Weights, offsets_E1: Tensor,
                    engines: tuple[str, ...] = COMPUTE_ENGINES) -> dict[str, float]:
    """Median seconds of forward + backward of each engine on these tensors, ``{engine: seconds}``.

    The tensors are not changed and no gradient reaches them (the weights are detached, not
    copied; the rows are copied, so inference-mode rows work). The upstream gradient is the rows
    themselves (no random numbers drawn: the global RNG is left alone). An engine whose first call
    raises ``RuntimeError`` on these shapes (out of memory, a layout torch refuses) is left out with
    a warning; if every one does, the last error is raised.
    """
    # Under Triton's interpreter the times say nothing about a GPU (the kernels run in Python):
    # one timed call each, the first, keeps CPU tests quick.
    warmup, repeats = (0, 1) if interpreting() else (WARMUP, REPEATS)
    with torch.inference_mode(False), torch.enable_grad():
        x = x_AD.detach().clone().requires_grad_()
        ws = [w.detach().requires_grad_() for w in weights]

        def step(engine: str) -> Callable[[], None]:
            def run() -> None:
                out_AD = _RUNNERS[engine](x, *ws, offsets_E1)
                torch.autograd.grad(out_AD, (x, *ws), x.detach().to(out_AD.dtype))
            return run

        runs, seconds, failure = {}, {}, None
        for engine in engines:
            try:  # the first call: checked, and timed when there is no warm-up
                first = _time_once(step(engine), x_AD.device)
            except RuntimeError as error:
                warnings.warn(f"GEMM engine {engine!r} failed on rows {tuple(x_AD.shape)} and experts "
                              f"{tuple(ws[0].shape)} ({error}); 'auto' leaves it out.", RuntimeWarning, stacklevel=3)
                failure = error
                continue
            runs[engine], seconds[engine] = step(engine), [] if warmup else [first]
            for _ in range(warmup - 1):
                runs[engine]()
        if not runs:
            raise failure
        for _ in range(repeats - (0 if warmup else 1)):
            for engine, run in runs.items():
                seconds[engine].append(_time_once(run, x_AD.device))
    return {engine: statistics.median(times) for engine, times in seconds.items()}


def choose_engine(engine: str, x_AD: Tensor, weights: Weights, offsets_E1: Tensor) -> str:
    """The engine that runs these tensors: ``engine`` itself if forced, else ``auto``'s choice.

    Raises ``ValueError`` for an unknown ``engine``, ``RuntimeError`` naming the reason when a
    forced engine (or every engine, under ``auto``) cannot run here.
    """
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}, got {engine!r}.")
    if torch.compiler.is_compiling():  # plain Python constants to Dynamo, no graph break
        reason = _untraceable_reason(x_AD.dtype) if engine == "grouped_mm" else ""
        if reason:
            raise RuntimeError(f"GEMM engine 'grouped_mm' cannot be compiled: {reason}.")
        if engine != "auto":
            return engine
        return _traced_choice(x_AD.device, x_AD.dtype, *weights[0].shape)
    if engine != "auto":
        reason = engine_unavailable_reason(engine, x_AD)
        if reason is not None:
            raise RuntimeError(f"GEMM engine {engine!r} is unavailable: {reason}.")
        return engine
    return _auto_choice(x_AD, weights, offsets_E1)


def expert_swiglu(x_AD: Tensor, w_gate_EDF: Tensor, w_up_EDF: Tensor, w_out_EFD: Tensor, offsets_E1: Tensor,
                  *, engine: str = "auto") -> Tensor:
    """Each expert's SwiGLU on its rows, ungated, ``(A, D)`` in x's dtype, on ``engine``.

    Args:
        x_AD: rows sorted by expert; expert ``e`` owns rows ``offsets_E1[e]:offsets_E1[e + 1]``.
        w_gate_EDF, w_up_EDF, w_out_EFD: the experts' weights (``SwiGLUExperts`` layout), cast to x's dtype.
        offsets_E1: int64 ``(E + 1,)``, from 0 to A, nondecreasing (not checked: no host sync).
        engine: ``"triton"``, ``"grouped_mm"`` or ``"auto"`` (module docstring).
    """
    weights = (w_gate_EDF, w_up_EDF, w_out_EFD)
    chosen = choose_engine(engine, x_AD, weights, offsets_E1)
    return _RUNNERS[chosen](x_AD, *weights, offsets_E1)


def _available(x_AD: Tensor) -> tuple[list[str], list[str]]:
    """The engines that run on rows like ``x_AD``, and the reasons of those that do not."""
    reasons = {e: engine_unavailable_reason(e, x_AD) for e in COMPUTE_ENGINES}
    return [e for e, r in reasons.items() if r is None], [f"{e}: {r}" for e, r in reasons.items() if r is not None]


def _auto_choice(x_AD: Tensor, weights: Weights, offsets_E1: Tensor) -> str:
    key = engine_key(x_AD, weights[0])
    cached = _cached_choice(key)
    if cached is not None and engine_unavailable_reason(cached, x_AD) is None:
        return cached  # every call after the first: one check, not both engines'
    available, refused = _available(x_AD)
    if not available:
        raise RuntimeError(f"No GEMM engine can run {x_AD.dtype} on {key.device}: {'; '.join(refused)}.")
    if len(available) == 1:
        return available[0]  # nothing to measure, and nothing worth keeping
    if _capturing(x_AD.device) or x_AD.shape[0] == 0:
        return "triton"  # no measuring here (or nothing to measure); the key stays open
    seconds = measure_engines(x_AD, weights, offsets_E1, tuple(available))
    chosen = min(seconds, key=seconds.__getitem__)
    _log.info("lightning_moe: GEMM engine %r for %s (median fwd+bwd seconds %s)", chosen, key, seconds)
    _CHOICES[key] = chosen
    _save_choice(key, chosen)
    return chosen


def _cached_choice(key: EngineKey) -> str | None:
    _merge_file()
    return _CHOICES.get(key)


@torch.compiler.assume_constant_result
def _traced_choice(device: torch.device, dtype: torch.dtype, num_experts: int, d_model: int, d_ff: int) -> str:
    # Runs as plain Python while Dynamo traces; its result is a constant of the graph.
    cached = _cached_choice(_key(device, dtype, num_experts, d_model, d_ff))
    return "grouped_mm" if cached == "grouped_mm" and not _untraceable_reason(dtype) else "triton"


@torch.compiler.assume_constant_result
def _untraceable_reason(dtype: torch.dtype) -> str:
    """Why torch.compile cannot trace ``grouped_mm`` in ``dtype`` ("" if it can): its shape function
    (meta kernel) may take fewer dtypes than the eager op (torch 2.13: bfloat16 only, even on CPU).
    Cached in a plain dict: Dynamo would trace through a ``functools.cache`` wrapper."""
    if dtype not in _META_PROBES:
        _META_PROBES[dtype] = _probe_meta(dtype)
    return _META_PROBES[dtype]


def _probe_meta(dtype: torch.dtype) -> str:
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    try:
        x_AD = torch.empty(8, 16, device="meta", dtype=dtype)
        F.grouped_mm(x_AD, torch.empty(2, 16, 16, device="meta", dtype=dtype),
                     offs=torch.empty(2, device="meta", dtype=torch.int32))
    except Exception as error:  # what the meta kernel raises
        return f"torch's meta kernel of grouped_mm refuses {dtype} ({type(error).__name__}: {error})"
    return ""


# --- The cache file ------------------------------------------------------------------------------


def _merge_file() -> None:
    """Merge the cache file's choices into ``_CHOICES`` once per file (choices made here win)."""
    path = os.environ.get(CACHE_ENV) or None
    if path is None or _file_state["loaded"] == path:
        return
    _file_state["loaded"] = path
    for key, engine in _read_file(path).items():
        _CHOICES.setdefault(key, engine)


def _read_file(path: str) -> dict[EngineKey, str]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        warnings.warn(f"{CACHE_ENV}={path!r} cannot be read ({error}); measuring afresh.", RuntimeWarning,
                      stacklevel=2)
        return {}
    entries = data.get("choices", []) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        warnings.warn(f"{CACHE_ENV}={path!r} holds no list of choices; measuring afresh.", RuntimeWarning,
                      stacklevel=2)
        return {}
    choices = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        try:
            key = EngineKey(str(entry["device"]), str(entry["dtype"]), int(entry["num_experts"]),
                            int(entry["d_model"]), int(entry["d_ff"]))
        except (KeyError, TypeError, ValueError):
            continue  # an entry from another version, or hand-edited: skipped, not fatal
        if entry.get("engine") in COMPUTE_ENGINES:
            choices[key] = entry["engine"]
    return choices


def _save_choice(key: EngineKey, engine: str) -> None:
    """Add one choice to the cache file: read, merge, write a temporary file, ``os.replace`` it.

    Concurrent writers (ranks) do not corrupt the file; one may drop another's new entry, which is
    then measured again next time.
    """
    path = os.environ.get(CACHE_ENV) or None
    if path is None:
        return
    choices = _read_file(path)
    choices[key] = engine
    entries = [{**k._asdict(), "engine": e} for k, e in sorted(choices.items())]
    temporary = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".engine-cache-", suffix=".json",
                                         delete=False, encoding="utf-8") as file:
            temporary = file.name
            json.dump({"version": 1, "choices": entries}, file, indent=1)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None and os.path.exists(temporary):
            os.remove(temporary)
        warnings.warn(f"{CACHE_ENV}={path!r} cannot be written ({error}); the choice is kept in memory only.",
                      RuntimeWarning, stacklevel=2)

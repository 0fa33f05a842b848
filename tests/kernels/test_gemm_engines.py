"""The ``triton`` dispatcher's GEMM engines against the ``loop`` reference: outputs and every gradient.

Legend: ``T`` tokens, ``D`` model width, ``E`` experts, ``F`` expert hidden width, ``A`` assignments,
``E1`` = E + 1 offsets.

Without a GPU our kernels run under Triton's interpreter (``tests/conftest.py``) and
``F.grouped_mm`` on CPU, so shapes stay small; the ``gpu`` test checks both engines in bfloat16 on
CUDA. The ``auto`` tests watch :func:`~lightning_moe.dispatch.engines.measure_engines` and the engine
functions through spies that call the real ones.
"""

import copy
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_moe.dispatch import (
    DISPATCHERS,
    TritonDispatcher,
    clear_engine_choices,
    engine_choices,
    engines,
    expert_swiglu,
    get_dispatcher,
)
from lightning_moe.experts import SwiGLUExperts
from lightning_moe.kernels.grouped_gemm import grouped_swiglu_reference
from lightning_moe.layers import MoEConfig, MoELayer
from lightning_moe.routing import Routing, TopKRouter

# The dispatcher names that force an engine, and the measured choice.
ENGINE_DISPATCHERS = {"triton-kernels": "triton", "triton-grouped_mm": "grouped_mm", "triton": "auto"}


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch: pytest.MonkeyPatch):
    """Every test starts with no ``auto`` choices and no cache file."""
    monkeypatch.delenv(engines.CACHE_ENV, raising=False)
    clear_engine_choices()
    yield
    clear_engine_choices()


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts of measurements (``"measure"``) and of each engine's runs; the real functions run."""
    calls = Counter()
    measure = engines.measure_engines

    def counting_measure(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["measure"] += 1
        return measure(*args, **kwargs)

    monkeypatch.setattr(engines, "measure_engines", counting_measure)
    for name, run in list(engines._RUNNERS.items()):
        def counting_run(*args, _name=name, _run=run):  # noqa: ANN002, ANN202
            calls[_name] += 1
            return _run(*args)

        monkeypatch.setitem(engines._RUNNERS, name, counting_run)
    return calls


def _skip_unless_available(dispatcher: str, x: torch.Tensor) -> None:
    """On a GPU, float32 ``grouped_mm`` may be refused: the engine is then not this test's subject."""
    engine = ENGINE_DISPATCHERS.get(dispatcher, "triton")
    needed = engines.COMPUTE_ENGINES if engine == "auto" else (engine,)
    for name in needed:
        reason = engines.engine_unavailable_reason(name, x)
        if reason is not None:
            pytest.skip(reason)


def _routing(expert_A: list[int], num_tokens: int, num_experts: int, top_k: int) -> Routing:
    """A routing with given experts: token ``a // top_k`` for assignment ``a``, random gates with grad."""
    scores_TE = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    return Routing(scores_TE=scores_TE, logits_TE=scores_TE.log(),
                   token_A=torch.arange(num_tokens).repeat_interleave(top_k), expert_A=torch.tensor(expert_A),
                   weight_A=torch.rand(len(expert_A)).requires_grad_())


def _run(dispatcher: str, x_TD: torch.Tensor, routing: Routing, experts: SwiGLUExperts,
         dy_TD: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and the gradients of the input, the gates and the three weights."""
    experts.zero_grad(set_to_none=True)
    routing.weight_A.grad = None
    x_TD = x_TD.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels must run, not fall back
        y_TD = get_dispatcher(dispatcher)(x_TD, routing, experts)
    y_TD.backward(dy_TD)
    results = {"y": y_TD.detach(), "x": x_TD.grad, "gates": routing.weight_A.grad}
    return results | {name: p.grad.clone() for name, p in experts.named_parameters()}


def _assert_all_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=f"{name} differs")


@pytest.mark.parametrize("dispatcher", ENGINE_DISPATCHERS)
@pytest.mark.parametrize(("tokens", "d_model", "d_ff", "experts", "top_k"),
                         [(37, 24, 40, 6, 2), (19, 33, 17, 8, 3), (13, 7, 5, 3, 1)],
                         ids=["random", "odd-widths", "tiny-odd"])
def test_layer_matches_loop(dispatcher: str, tokens: int, d_model: int, d_ff: int, experts: int, top_k: int) -> None:
    """A whole layer: output, input gradient, router and expert weight gradients."""
    torch.manual_seed(tokens + experts)
    router = TopKRouter(d_model, experts, top_k=top_k, renormalize=top_k > 1)
    ref = MoELayer(d_model, d_ff, experts, router=router, dispatcher="loop")
    fast = copy.deepcopy(ref)
    fast.dispatcher = dispatcher
    x, dy = torch.randn(tokens, d_model), torch.randn(tokens, d_model)
    _skip_unless_available(dispatcher, x)
    results = []
    for layer in (ref, fast):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = layer(xg)
        y.backward(dy)
        results.append({"y": y.detach(), "x": xg.grad} | {n: p.grad for n, p in layer.named_parameters()})
    assert len(results[0]) >= 6  # y, x, the router's weights, three expert weights
    _assert_all_close(results[1], results[0])


@pytest.mark.parametrize("dispatcher", ENGINE_DISPATCHERS)
@pytest.mark.parametrize("case", ["empty-experts", "one-expert-takes-all"])
def test_uneven_routings_match_loop(dispatcher: str, case: str) -> None:
    """Experts with no rows (first, middle, last), and every token on one expert, gates' gradient included."""
    torch.manual_seed(2)
    T, D, F_, E = 29, 10, 14, 6
    if case == "empty-experts":
        expert_A = [(1, 3, 4)[(t + k) % 3] for t in range(T) for k in range(2)]  # experts 0, 2, 5 idle
        routing = _routing(expert_A, T, E, 2)
    else:
        routing = _routing([4] * T, T, E, 1)
    experts = SwiGLUExperts(D, F_, E)
    x, dy = torch.randn(T, D), torch.randn(T, D)
    _skip_unless_available(dispatcher, x)
    want = _run("loop", x, routing, experts, dy)
    got = _run(dispatcher, x, routing, experts, dy)
    _assert_all_close(got, want)
    idle = [0, 2, 5] if case == "empty-experts" else [0, 1, 2, 3, 5]
    assert torch.equal(got["w_gate_EDF"][idle], torch.zeros(len(idle), D, F_, device=x.device))


@pytest.mark.parametrize("counts", [[0, 5, 0, 17, 9, 0], [0, 0, 0], [31]], ids=["empty-experts", "no-rows", "one"])
def test_grouped_mm_engine_matches_reference(counts: list[int]) -> None:
    """The engine alone, at odd widths (padded to 16 bytes), with the stride-0 gradient of ``.sum()``."""
    torch.manual_seed(3)
    E, D, F_ = len(counts), 9, 11
    x_AD = torch.randn(sum(counts), D, requires_grad=True)
    weights = [(torch.randn(E, *shape) / 3).requires_grad_() for shape in ((D, F_), (D, F_), (F_, D))]
    offsets_E1 = torch.tensor([0, *counts]).cumsum(0)
    grads = []
    for fn in (engines.grouped_mm_swiglu, grouped_swiglu_reference):
        out_AD = fn(x_AD, *weights, offsets_E1)
        assert out_AD.shape == (sum(counts), D)
        grads.append([out_AD.detach(), *torch.autograd.grad(out_AD.pow(2).sum() + out_AD.sum(), [x_AD, *weights])])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_auto_measures_once_per_key_and_keeps_its_choice(spies: Counter) -> None:
    torch.manual_seed(4)
    T, D, F_, E = 21, 12, 9, 4
    routing, experts = _routing([t % E for t in range(T)], T, E, 1), SwiGLUExperts(D, F_, E)
    x, dy = torch.randn(T, D), torch.randn(T, D)
    _skip_unless_available("triton", x)
    first = _run("triton", x, routing, experts, dy)
    assert spies["measure"] == 1
    ((key, chosen),) = engine_choices().items()
    assert key == engines.engine_key(x, experts.w_gate_EDF) and (key.dtype, key.num_experts, key.d_model,
                                                                 key.d_ff) == ("float32", E, D, F_)
    assert chosen in engines.COMPUTE_ENGINES
    spies.clear()
    second = _run("triton", x, routing, experts, dy)
    assert spies == Counter({chosen: 1})  # no measurement, the chosen engine once
    _assert_all_close(second, first, atol=0)  # same engine, same numbers
    assert engine_choices() == {key: chosen}
    # Another expert width is another key: measured once more.
    _run("triton", x, routing, SwiGLUExperts(D, F_ + 1, E), dy)
    assert spies["measure"] == 1 and len(engine_choices()) == 2


def test_auto_measures_under_inference_mode(spies: Counter) -> None:
    """A first call without autograd (evaluation) still times forward and backward, leaving the
    global RNG alone."""
    torch.manual_seed(9)
    T, D, F_, E = 14, 8, 7, 3
    routing, experts = _routing([t % E for t in range(T)], T, E, 1), SwiGLUExperts(D, F_, E)
    x = torch.randn(T, D)
    _skip_unless_available("triton", x)
    state = torch.get_rng_state()
    with torch.inference_mode():
        y = get_dispatcher("triton")(x, routing, experts)
    assert spies["measure"] == 1 and len(engine_choices()) == 1
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        torch.testing.assert_close(y, get_dispatcher("loop")(x, routing, experts), atol=1e-5, rtol=1e-4)


def test_a_cached_choice_is_used_without_measuring(spies: Counter, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A choice in the cache file decides (each engine in turn), with no measurement."""
    torch.manual_seed(5)
    T, D, F_, E = 16, 8, 6, 3
    routing, experts = _routing([t % E for t in range(T)], T, E, 1), SwiGLUExperts(D, F_, E)
    x, dy = torch.randn(T, D), torch.randn(T, D)
    _skip_unless_available("triton", x)
    key = engines.engine_key(x, experts.w_gate_EDF)
    path = tmp_path / "engines.json"
    monkeypatch.setenv(engines.CACHE_ENV, str(path))
    for engine in engines.COMPUTE_ENGINES:
        path.write_text(json.dumps({"version": 1, "choices": [{**key._asdict(), "engine": engine}]}))
        clear_engine_choices()
        spies.clear()
        _run("triton", x, routing, experts, dy)
        assert spies == Counter({engine: 1}), spies


def test_cache_file_round_trips(spies: Counter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    T, D, F_, E = 12, 8, 5, 2
    routing, experts = _routing([t % E for t in range(T)], T, E, 1), SwiGLUExperts(D, F_, E)
    x, dy = torch.randn(T, D), torch.randn(T, D)
    _skip_unless_available("triton", x)
    path = tmp_path / "cache" / "engines.json"
    monkeypatch.setenv(engines.CACHE_ENV, str(path))
    _run("triton", x, routing, experts, dy)
    chosen = engine_choices()
    assert spies["measure"] == 1 and len(chosen) == 1
    (entry,) = json.loads(path.read_text())["choices"]
    assert engines.EngineKey(**{k: v for k, v in entry.items() if k != "engine"}) in chosen
    assert list(path.parent.iterdir()) == [path]  # the temporary file was moved, not left behind
    clear_engine_choices()  # as a new process would start
    assert engine_choices() == chosen
    _run("triton", x, routing, experts, dy)
    assert spies["measure"] == 1
    path.write_text("{not json")
    clear_engine_choices()
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert engine_choices() == {}
    for corrupt in ('{"version": 1, "choices": null}', '{"choices": 5}', '[1, 2]'):
        path.write_text(corrupt)
        clear_engine_choices()
        with pytest.warns(RuntimeWarning, match="no list of choices"):
            assert engine_choices() == {}
    path.write_text('{"choices": [7, "x", {"engine": "triton"}]}')  # entries of the wrong kind: skipped
    clear_engine_choices()
    assert engine_choices() == {}


def test_forced_engine_from_yaml_config_and_layer(spies: Counter) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    _skip_unless_available("triton-grouped_mm", torch.randn(1))
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(MoEConfig, "moe")
    config = parser.instantiate(parser.parse_string(
        "moe:\n  num_experts: 4\n  expert_d_ff: 6\n  dispatcher: triton-grouped_mm\n")).moe
    assert config.dispatcher == "triton-grouped_mm"
    layer = MoELayer.from_config(10, config)
    assert layer.dispatcher.engine == "grouped_mm" and "dispatcher='triton-grouped_mm'" in repr(layer)
    layer(torch.randn(11, 10)).sum().backward()
    assert spies == Counter({"grouped_mm": 1})
    spies.clear()
    layer = MoELayer(10, 6, 4, dispatcher="triton-kernels")
    assert repr(layer.dispatcher) == "TritonDispatcher(name='triton-kernels', engine='triton')"
    layer(torch.randn(11, 10))
    assert spies == Counter({"triton": 1})
    assert repr(get_dispatcher("triton")) == "TritonDispatcher(name='triton', engine='auto')"
    assert {"triton", "triton-kernels", "triton-grouped_mm"} <= set(DISPATCHERS)


def test_invalid_engine_names_the_valid_ones() -> None:
    valid = r"\('triton', 'grouped_mm', 'auto'\)"
    with pytest.raises(ValueError, match=r"`engine` must be one of " + valid + r", got 'cublas'"):
        TritonDispatcher(engine="cublas")
    x_AD, w = torch.randn(4, 8), torch.randn(2, 8, 8)
    with pytest.raises(ValueError, match=r"`engine` must be one of " + valid):
        expert_swiglu(x_AD, w, w, w, torch.tensor([0, 2, 4]), engine="fast")
    with pytest.raises(ValueError, match=r"valid names are .*'triton-grouped_mm', 'triton-kernels'"):
        get_dispatcher("triton-cublas")


def test_forcing_an_unavailable_engine_says_why() -> None:
    # grouped_mm takes no float64: the probe finds out once, and the error carries torch's reason.
    x_AD, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 8, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"GEMM engine 'grouped_mm' is unavailable: .*float64"):
        expert_swiglu(x_AD, w, w, w, torch.tensor([0, 2, 4]), engine="grouped_mm")
    assert engines.engine_unavailable_reason("grouped_mm", x_AD) is not None


def test_compiled_dispatch_does_not_measure(spies: Counter) -> None:
    """Under torch.compile ``auto`` takes the cached choice or ``triton`` and never measures; the
    forced ``grouped_mm`` engine compiles with no graph break where torch can trace it (bfloat16)
    and says why not elsewhere."""
    torch.manual_seed(7)
    layer = MoELayer(16, 8, 4)
    x = torch.randn(10, 16, requires_grad=True)
    _skip_unless_available("triton", x)
    routing = layer.router(x)
    routing.weight_A = routing.weight_A.detach()  # each backward below then stops at the gates

    def compiled(name: str):  # noqa: ANN202
        dispatcher = get_dispatcher(name)
        return torch.compile(lambda x: dispatcher(x, routing, layer.experts), fullgraph=True, backend="aot_eager")

    y = compiled("triton")(x)
    torch.testing.assert_close(y, get_dispatcher("loop")(x, routing, layer.experts), atol=1e-5, rtol=1e-4)
    y.pow(2).sum().backward()
    assert spies == Counter({"triton": 1}) and engine_choices() == {}  # traced once, nothing measured
    with pytest.raises(Exception, match="'grouped_mm' cannot be compiled: .*float32"):
        compiled("triton-grouped_mm")(x)
    experts16 = copy.deepcopy(layer.experts).bfloat16()
    x16 = x.detach().bfloat16().requires_grad_()
    y16 = torch.compile(lambda x: get_dispatcher("triton-grouped_mm")(x, routing, experts16), fullgraph=True,
                        backend="aot_eager")(x16)
    torch.testing.assert_close(y16, get_dispatcher("loop")(x16, routing, experts16), atol=2e-2, rtol=2e-2)
    y16.float().pow(2).sum().backward()
    assert x16.grad is not None and experts16.w_out_EFD.grad is not None
    assert spies["grouped_mm"] >= 1 and spies["measure"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engines_in_bfloat16_match_loop_and_do_not_sync() -> None:
    torch.manual_seed(8)
    T, D, F_, E, K = 1024, 256, 384, 16, 2
    layer = MoELayer(D, F_, E, router=TopKRouter(D, E, top_k=K), dispatcher="loop").cuda()
    x = torch.randn(T, D, device="cuda")
    _skip_unless_available("triton", x.bfloat16())  # grouped_mm needs bfloat16 on sm80 or newer
    routing = layer.router(x)
    routing.weight_A = routing.weight_A.detach().requires_grad_()
    dy = torch.randn(T, D, device="cuda")
    want = _run("loop", x, routing, layer.experts, dy)  # float32 reference
    experts16 = copy.deepcopy(layer.experts).bfloat16()
    for name in ENGINE_DISPATCHERS:
        got = _run(name, x.bfloat16(), routing, experts16, dy.bfloat16())
        for key in want:
            error = (got[key].float() - want[key].float()).norm() / want[key].float().norm()
            assert error < 2e-2, f"{name}: {key} relative error {error:.3g}"
    assert set(engine_choices().values()) <= set(engines.COMPUTE_ENGINES) and len(engine_choices()) == 1
    for name in ENGINE_DISPATCHERS:  # measured and autotuned above: now no host sync
        xg = x.bfloat16().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            get_dispatcher(name)(xg, routing, experts16).backward(dy.bfloat16())
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_autocast_reaches_the_kernels() -> None:
    # Under bfloat16 autocast the permuted rows and the expert GEMMs run in bfloat16 (as a dense
    # F.linear would) and the float32 weights still get float32 gradients.
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, router=TopKRouter(16, 4, top_k=2), dispatcher="triton-grouped_mm")
    reference = copy.deepcopy(layer)
    reference.dispatcher = "loop"
    x = torch.randn(24, 16)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.experts.w_gate_EDF.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), reference(x).detach(), atol=0.05, rtol=0.05)

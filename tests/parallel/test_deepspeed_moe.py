"""DeepSpeedMoELayer: DeepSpeed-MoE's dispatch driven by our routers, against plain PyTorch, against
DeepSpeed's own gating functions, and under expert parallelism (CPU, gloo, real DeepSpeed).

The routes are compared in this process with DeepSpeed's ``topkgating``/``top2gating`` (pure
functions: nothing distributed). The layer runs in subprocesses (``ds_moe_worker.py``) after
``deepspeed.init_distributed``, as users run it; this process only compares. ~15 s on 2 cores.
"""

import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed", reason="install the `deepspeed` extra: pip install -e '.[deepspeed]'")

from deepspeed.moe.sharded_moe import top2gating, topkgating  # noqa: E402

from lightning_moe.balancing import SwitchAuxLoss  # noqa: E402
from lightning_moe.experts.swiglu import SwiGLU  # noqa: E402
from lightning_moe.parallel.deepspeed_moe import (  # noqa: E402
    DeepSpeedMoELayer,
    deepspeed_capacity,
    deepspeed_routes,
)
from lightning_moe.routing import ExpertChoiceRouter, TopKRouter  # noqa: E402
from lightning_moe.routing.topk import token_choice_routing  # noqa: E402

WORKER = Path(__file__).with_name("ds_moe_worker.py")
D, F, E, T = 12, 10, 4, 13  # as in the worker
TOL = {"rtol": 1e-5, "atol": 1e-5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- references (the test oracles)


def reference_rule(experts_TK: torch.Tensor, scores_TE: torch.Tensor, capacity: int,
                   policy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed's capacity rule as a loop: ``(keep_TK, location_TK)``.

    Assignments claim their expert's slots in priority order (token order; highest score first for
    ``score``; all first choices before second choices for ``first_choice``), at most ``capacity``
    each. Kept ones sit in their buffer in that order, except under ``score``: token order.
    """
    num_tokens, top_k = experts_TK.shape
    pairs = [(t, k) for t in range(num_tokens) for k in range(top_k)]
    if policy == "first_choice":
        pairs = [(t, k) for k in range(top_k) for t in range(num_tokens)]
    elif policy == "score":
        pairs = sorted(pairs, key=lambda tk: (-scores_TE[tk[0], experts_TK[tk]].item(), tk[0]))
    keep_TK = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    filled = [0] * scores_TE.shape[1]
    for t, k in pairs:
        e = int(experts_TK[t, k])
        keep_TK[t, k] = filled[e] < capacity
        filled[e] += int(keep_TK[t, k])
    location_TK = torch.zeros(num_tokens, top_k, dtype=torch.long)
    filled = [0] * scores_TE.shape[1]
    for t, k in pairs if policy != "score" else sorted(pairs):
        if keep_TK[t, k]:
            e = int(experts_TK[t, k])
            location_TK[t, k], filled[e] = filled[e], filled[e] + 1
    return keep_TK, location_TK


def reference(router: torch.nn.Module, weights: list[dict], x: torch.Tensor, dy: torch.Tensor, balancers=(),
              keep_A: torch.Tensor | None = None) -> dict:
    """Plain PyTorch: the router's Routing, then ``weight * expert_e(x_t)`` summed per token over the
    kept assignments; backward of ``(y * dy).sum() + aux`` as the worker does."""
    router.zero_grad(set_to_none=True)
    modules = []
    for w in weights:
        module = SwiGLU(D, F)
        module.load_state_dict(w)
        modules.append(module)
    x = x.clone().requires_grad_(True)
    x_TD = x.reshape(-1, D)
    routing = router(x_TD)
    if x.dim() >= 3:
        routing.seq_len = x.shape[-2]
    keep_A = torch.ones_like(routing.token_A, dtype=torch.bool) if keep_A is None else keep_A
    rows = [routing.weight_A[a] * modules[int(e)](x_TD[int(t)]) if keep_A[a] else torch.zeros(D)
            for a, (t, e) in enumerate(zip(routing.token_A, routing.expert_A, strict=True))]
    y_TD = torch.zeros_like(x_TD).index_add(0, routing.token_A, torch.stack(rows))
    kept = replace(routing, token_A=routing.token_A[keep_A], expert_A=routing.expert_A[keep_A],
                   weight_A=routing.weight_A[keep_A])
    aux = {b.name: b.loss(kept) for b in balancers}
    ((y_TD.view_as(x) * dy).sum() + sum(aux.values())).backward()
    return {"y": y_TD.detach().view_as(x), "x_grad": x.grad, "aux_losses": aux, "routing": routing,
            "router_grads": {n: p.grad.clone() for n, p in router.named_parameters()},
            "expert_grads": [{n: p.grad for n, p in m.named_parameters()} for m in modules]}


def assert_grads_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], **TOL, msg=name)


# ---------------------------------------------------------------- arguments


def test_expert_choice_router_is_refused() -> None:
    with pytest.raises(ValueError, match="`router` must be a token-choice router.*ExpertChoiceRouter"):
        DeepSpeedMoELayer(D, F, E, router=ExpertChoiceRouter(D, E))


def test_expert_parallel_size_must_divide_num_experts() -> None:
    with pytest.raises(ValueError, match=r"`expert_parallel_size`=3 must divide `num_experts`=4; valid values are "
                                         r"\[1, 2, 4\]"):
        DeepSpeedMoELayer(D, F, E, expert_parallel_size=3)
    with pytest.raises(ValueError, match="`expert_parallel_size` must be an integer >= 1"):
        DeepSpeedMoELayer(D, F, E, expert_parallel_size=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"router": TopKRouter(D, 8)}, "router` was built for d_model=12, num_experts=8"),
    ({"capacity_factor": 0.0}, "`capacity_factor` must be a finite number > 0"),
    ({"eval_capacity_factor": -1.0}, "`eval_capacity_factor` must be a finite number > 0"),
    ({"min_capacity": -1}, "`min_capacity` must be an integer >= 0"),
    ({"drop_policy": "random"}, "`drop_policy` must be one of"),
    ({"drop_tokens": "yes"}, "`drop_tokens` must be True or False"),
    ({"expert": "swiglu"}, "`expert` must be an nn.Module"),
])
def test_bad_arguments_name_the_parameter(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeepSpeedMoELayer(D, F, E, **kwargs)


def test_routing_that_is_not_token_choice_is_refused() -> None:
    routing = ExpertChoiceRouter(D, E, capacity_factor=2.0)(torch.randn(6, D))  # A = E * C = 4 * 3 = 12 = 6 * 2
    with pytest.raises(ValueError, match="exactly top_k=2 assignments per token; ExpertChoiceRouter gave"):
        deepspeed_routes(routing, 2, 4, source="ExpertChoiceRouter")


# ---------------------------------------------------------------- routes against DeepSpeed's own gates


def softmax_routing(logits_SE: torch.Tensor, top_k: int):  # noqa: ANN201
    """What DeepSpeed's gates compute from these logits, as our Routing (softmax, top-k, renormalised)."""
    scores_SE = logits_SE.softmax(dim=-1)
    gates_SK, experts_SK = scores_SE.topk(top_k, dim=-1)
    return token_choice_routing(scores_SE, logits_SE, experts_SK, gates_SK / gates_SK.sum(-1, keepdim=True))


@pytest.mark.parametrize(("policy", "top_k", "capacity_factor", "min_capacity"), [
    ("position", 2, 0.5, 1), ("position", 3, 0.7, 1), ("score", 2, 0.5, 1), ("score", 3, 0.3, 3),
    ("first_choice", 2, 0.6, 1), ("dropless", 2, 1.0, 4), ("dropless", 3, 1.0, 4),
])
def test_routes_match_deepspeeds_gating(policy: str, top_k: int, capacity_factor: float, min_capacity: int) -> None:
    num_tokens, num_experts = 13, 5
    logits_SE = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(top_k)) * 2
    drop_tokens = policy != "dropless"
    if policy == "first_choice":
        ds = top2gating(logits_SE.clone(), capacity_factor, min_capacity, drop_tokens=drop_tokens,
                        top2_2nd_expert_sampling=False, sparse_routes=True)
    else:
        ds = topkgating(logits_SE.clone(), top_k, capacity_factor, min_capacity, drop_tokens=drop_tokens,
                        drop_policy={"score": "probs"}.get(policy, policy) if drop_tokens else "position",
                        sparse_routes=True)  # DeepSpeed calls our "score" "probs"
    _, ds_capacity, _, ds_expert_KS, ds_location_KS, ds_gate_KS, ds_counts = ds

    capacity = None
    if drop_tokens:
        capacity = deepspeed_capacity(num_tokens, num_experts, top_k, capacity_factor, min_capacity)
    routing = softmax_routing(logits_SE, top_k)
    routes, kept = deepspeed_routes(routing, top_k, capacity, policy if drop_tokens else "position")
    assert routes.capacity == int(ds_capacity)
    torch.testing.assert_close(routes.expert_KS, ds_expert_KS.int(), rtol=0, atol=0)
    torch.testing.assert_close(routes.location_KS, ds_location_KS.int(), rtol=0, atol=0)
    torch.testing.assert_close(routes.exp_counts_E, ds_counts, rtol=0, atol=0)
    num_dropped = int((routes.expert_KS < 0).sum())
    assert int(kept.num_dropped) == num_dropped and kept.expert_A.numel() == num_tokens * top_k - num_dropped
    assert (num_dropped > 0) == drop_tokens
    # DeepSpeed renormalises a token's gates over its kept routes; ours keep the router's weights.
    whole_S = (routes.expert_KS >= 0).all(dim=0)
    torch.testing.assert_close(routes.gate_KS[:, whole_S], ds_gate_KS[:, whole_S], **TOL)
    assert torch.all(routes.gate_KS[routes.expert_KS < 0] == 0)
    assert torch.all(routes.gate_KS[:, ~whole_S].sum(dim=0) < 1)


def test_dense_form_matches_deepspeeds_dense_gating() -> None:
    logits_SE = torch.randn(13, 5, generator=torch.Generator().manual_seed(5)) * 2
    _, ds_combine_SEC, ds_dispatch_SEC, _ = topkgating(logits_SE.clone(), 2, 0.6, 1, drop_policy="position")
    routes, _ = deepspeed_routes(softmax_routing(logits_SE, 2), 2, deepspeed_capacity(13, 5, 2, 0.6, 1))
    combine_SEC, dispatch_SEC = routes.dense()
    assert torch.equal(dispatch_SEC, ds_dispatch_SEC)
    whole_S = (routes.expert_KS >= 0).all(dim=0)
    torch.testing.assert_close(combine_SEC[whole_S], ds_combine_SEC[whole_S], **TOL)
    assert torch.equal(combine_SEC.sum(dim=(1, 2)), routes.gate_KS.sum(dim=0))


# ---------------------------------------------------------------- the layer, one process


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ds_moe_single")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(WORKER), "single", str(out)], capture_output=True, text=True,
                            timeout=300, env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return {**torch.load(out / "single.pt", weights_only=False), "dir": out}


@pytest.mark.parametrize("case", ["softmax", "sigmoid"])
def test_layer_matches_plain_pytorch(single: dict, case: str) -> None:
    """No drops (a large capacity factor; ``drop_tokens=False``): output, aux losses and every gradient
    equal the plain loop over assignments. ``sigmoid``: scaling 2.5, an expert bias that steers
    selection, a (1, S, D) input and the sequence-level balancer."""
    got = single[case]
    expected = reference(got["router"], single["weights"], got["x"], got["dy"], got["balancers"])
    torch.testing.assert_close(got["y"], expected["y"], **TOL)
    torch.testing.assert_close(got["x_grad"], expected["x_grad"], **TOL)
    assert_grads_close(got["router_grads"], expected["router_grads"])
    for got_e, expected_e in zip(got["expert_grads"], expected["expert_grads"], strict=True):
        assert_grads_close(got_e, expected_e)
    assert got["aux_losses"].keys() == expected["aux_losses"].keys() and got["aux_losses"]
    for name, loss in got["aux_losses"].items():
        torch.testing.assert_close(loss, expected["aux_losses"][name].detach(), **TOL)
    counts_E = torch.bincount(expected["routing"].expert_A, minlength=E)
    assert got["num_dropped"] == 0 and torch.equal(got["tokens_per_expert"], counts_E)
    if case == "sigmoid":
        assert got["capacity"] == int(counts_E.max())  # drop_tokens=False: the largest expert count


@pytest.mark.parametrize("case", ["position", "score", "first_choice", "top3_position"])
def test_capacity_drops_what_deepspeeds_rule_drops(single: dict, case: str) -> None:
    got = single[case]
    kwargs = got["layer_kwargs"]
    routing = got["router"](got["x"].reshape(-1, D))
    top_k = routing.expert_A.numel() // T
    capacity = max(kwargs["min_capacity"], math.ceil(T / E * kwargs["capacity_factor"] * top_k))
    experts_TK = routing.expert_A.view(T, top_k)
    keep_TK, location_TK = reference_rule(experts_TK, routing.scores_TE.detach(), capacity,
                                          kwargs.get("drop_policy", "position"))
    assert got["capacity"] == capacity
    assert torch.equal(got["expert_KS"], torch.where(keep_TK, experts_TK, -1).T.int())
    assert torch.equal(got["location_KS"], torch.where(keep_TK, location_TK, 0).T.int())
    assert got["num_dropped"] == int((~keep_TK).sum()) > 0
    assert got["eval_num_dropped"] == 0  # eval_capacity_factor=None: dropless in evaluation

    expected = reference(got["router"], single["weights"], got["x"], got["dy"], keep_A=keep_TK.reshape(-1))
    torch.testing.assert_close(got["y"], expected["y"], **TOL)
    torch.testing.assert_close(got["x_grad"], expected["x_grad"], **TOL)
    assert_grads_close(got["router_grads"], expected["router_grads"])
    for got_e, expected_e in zip(got["expert_grads"], expected["expert_grads"], strict=True):
        assert_grads_close(got_e, expected_e)
    all_dropped_T = ~keep_TK.any(dim=1)
    assert torch.all(got["y"][all_dropped_T] == 0)


def test_engine_detects_the_layer_and_round_trips_its_expert_checkpoints(single: dict) -> None:
    engine = single["engine"]
    assert engine["has_moe_layers"] and engine["ep_group_set"]
    assert sorted(engine["moe_param_groups"]) == [False, True]
    assert engine["expert0_moved"]
    expert_files = {f"step1/layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(E)}
    assert expert_files <= set(engine["files"])
    model_states = torch.load(single["dir"] / "ckpt" / "step1" / "mp_rank_00_model_states.pt", weights_only=False)
    assert set(model_states["module"]) == {"router.scorer.weight_ED", "router.expert_bias_E"}
    assert engine["state"].keys() == engine["loaded_state"].keys()
    for name, tensor in engine["state"].items():
        assert torch.equal(engine["loaded_state"][name], tensor), name
    assert engine["state"]["router.expert_bias_E"].abs().sum() > 0


# ---------------------------------------------------------------- expert parallelism, two processes


@pytest.fixture(scope="module")
def ep_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ds_moe_ep")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(WORKER), "ep", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"ep_rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["drop", "dropless"])
def test_expert_parallel_matches_single_process(ep_ranks: list[dict], case: str) -> None:
    """``ep_size=2``, each rank its half of the batch, against the ``ep_size=1`` layer on the same
    half (same seed, same expert weights). Expert gradients arrive by all-to-all from both halves."""
    for rank, result in enumerate(ep_ranks):
        got, halves = result[case]["ep"], result[case]["reference"]
        local = halves[rank]
        for key in ("y", "x_grad", "expert_KS", "location_KS"):
            torch.testing.assert_close(got[key], local[key], **TOL, msg=key)
        assert_grads_close(got["router_grads"], local["router_grads"])
        for i, got_e in enumerate(got["expert_grads"]):
            e = rank * 2 + i
            assert_grads_close(got_e, {n: halves[0]["expert_grads"][e][n] + halves[1]["expert_grads"][e][n]
                                       for n in got_e})
        x, dy = result["x_full"][rank * T:(rank + 1) * T], result["dy_full"][rank * T:(rank + 1) * T]
        keep_A = (local["expert_KS"] >= 0).T.reshape(-1)
        expected = reference(result[case]["router"], result["weights"], x, dy, [SwitchAuxLoss(0.1)], keep_A=keep_A)
        torch.testing.assert_close(got["y"], expected["y"], **TOL)
        if case == "drop":
            assert got["capacity"] == local["capacity"] == deepspeed_capacity(T, E, 2, 0.75, 1)
            assert got["num_dropped"] > 0
        else:  # the largest expert count over both ranks
            assert got["capacity"] == max(half["capacity"] for half in halves)
            assert got["num_dropped"] == 0


@pytest.mark.distributed
def test_engine_averages_expert_gradients_over_the_global_batch(ep_ranks: list[dict]) -> None:
    """After ``engine.backward``: router gradients averaged over the ranks, expert gradients summed by
    all-to-all then divided by the data-parallel size: both the gradient of the mean loss."""
    first = ep_ranks[0]
    halves = [reference(first["engine"]["router"], first["weights"], first["x_full"][r * T:(r + 1) * T],
                        first["dy_full"][r * T:(r + 1) * T]) for r in range(2)]
    for rank, result in enumerate(ep_ranks):
        got = result["engine"]
        assert_grads_close(got["router_grads"], {n: (halves[0]["router_grads"][n] + halves[1]["router_grads"][n]) / 2
                                                 for n in got["router_grads"]})
        for i, got_e in enumerate(got["expert_grads"]):
            e = rank * 2 + i
            assert_grads_close(got_e, {n: (halves[0]["expert_grads"][e][n] + halves[1]["expert_grads"][e][n]) / 2
                                       for n in got_e})


def test_callbacks_find_the_layer_but_cannot_revive_its_experts() -> None:
    from lightning_moe.discovery import find_moe_layers
    from lightning_moe.parallel import DeepSpeedMoELayer

    torch.manual_seed(0)
    model = torch.nn.Sequential(DeepSpeedMoELayer(8, 16, 4, capacity_factor=4.0))
    model(torch.randn(6, 8))
    (view,) = find_moe_layers(model)
    assert view.family == "deepspeed_moe" and view.num_experts == 4
    assert view.stats is not None and int(view.stats.tokens_per_expert_E.sum()) == 12
    with pytest.raises(NotImplementedError, match="does not support DeepSpeedMoELayer"):
        view.revive([0], [1], 0.0)

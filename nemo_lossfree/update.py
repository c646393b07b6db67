"""The bias update as pure math: no communication, no module state.

Han & Zhong (2025, arXiv 2512.03915) read the expert bias as the dual variable
of the constraint "every expert receives the mean load"; one update is one dual
subgradient step. ``compute_bias_update`` is that step, ``scheduled_rate`` its
step size over time, and ``compute_bias_update_with_integral`` adds a leaky
integral of past steps that follows a router whose scores drift.

The "quantile" rule is the dual coordinate step of quantile balancing
(Megatron-Core 0.19's ``qb_dual_update``): each expert's bias moves to where,
with the others fixed, it would have received exactly the mean load on this
batch. It needs more than counts: where each token's biased score lies
relative to the token's top-K threshold. Routers record that as a histogram
of margins (``margin_histogram``, a fixed set of bins shared by every rank),
so the balancer sums it over all ranks and micro-batches with the counts in
its one all-reduce and takes the quantile of the *global* batch
(``quantile_step``); upstream averages per-micro-batch, per-rank quantiles.

Shape suffixes: T tokens, E experts, K top-k, L layers, B margin bins.

Two rules hold for every rule here: a layer that saw no token, or whose
counts (or margin histogram) hold a non-finite value, keeps its bias and its
state; and a rate of 0 returns the bias bit for bit (no re-centering either,
which would move it by rounding). Both are decided on the device
(``torch.where``): nothing here reads a tensor back to the host, so a balancer
step runs without a host synchronisation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from nemo_lossfree.config import UPDATE_RULES, LossFreeConfig, check_nonnegative

# ---------------------------------------------------------------- margins
# Bin edges of the margin histogram, in score units: 0 and +-SMALLEST * 2**j for
# j < OCTAVES (1e-5 .. 5.2). Geometric bins are fine where the quantile lands
# once the load is near balance (small margins) and coarse far from it, where a
# step only needs the right direction and size to within a factor of two.
MARGIN_BIN_SMALLEST = 1e-5
MARGIN_BIN_OCTAVES = 20
_POSITIVE_EDGES = [MARGIN_BIN_SMALLEST * 2.0**j for j in range(MARGIN_BIN_OCTAVES)]
MARGIN_EDGES = tuple([-e for e in reversed(_POSITIVE_EDGES)] + [0.0] + _POSITIVE_EDGES)
#: Bins per expert: between consecutive edges, plus the two tails.
MARGIN_BINS = len(MARGIN_EDGES) + 1
# Margins are clamped here before they are summed (the tails' means stay finite).
_MARGIN_CLAMP = 2 * _POSITIVE_EDGES[-1]


def margin_edges(device=None) -> torch.Tensor:
    return torch.tensor(MARGIN_EDGES, dtype=torch.float32, device=device)


def selection_margins(biased_TE: torch.Tensor, selected_TE: torch.Tensor, topk: int,
                      allowed_TE: Optional[torch.Tensor] = None, *,
                      upstream_cutoff: bool = False) -> torch.Tensor:
    """How far each biased score is from changing the token's choice of that expert, ``[T, E]``.

    Expert i keeps or gains token t when its bias rises by more than the
    margin, the others fixed (one coordinate of the dual):
    - a selected expert keeps t while it beats the token's (K+1)-th biased
      score: margin ``s_(K+1) - (s + b)``, negative;
    - an unselected one gains t when it beats the K-th, which then drops out:
      margin ``s_(K) - (s + b)``, >= 0.
    ``qb_dual_update`` measures every expert against the (K+1)-th; that
    underestimates an unselected expert's margin by the K-th/(K+1)-th gap, so
    a balancing step overshoots for the experts that gain tokens
    (``upstream_cutoff=True`` reproduces it, for the equivalence test;
    benchmarks/quantile_margins.py measures both). ``allowed_TE``
    (group-limited routing) leaves the losing groups out of the cutoffs.
    Selected margins are forced below 0 and the others' to >= 0, so the
    histogram's mass below 0 is exactly the expert's count whatever the
    routing (group-limited or replayed) chose.
    """
    biased_TE = biased_TE.float()
    pool_TE = biased_TE if allowed_TE is None else biased_TE.masked_fill(~allowed_TE, float("-inf"))
    k = min(topk + 1, biased_TE.shape[-1])
    values_TK = torch.topk(pool_TE, k, dim=-1).values
    if allowed_TE is not None:  # fewer than K+1 allowed experts: the plain cutoffs
        plain_TK = torch.topk(biased_TE, k, dim=-1).values
        values_TK = torch.where(torch.isfinite(values_TK), values_TK, plain_TK)
    keep_T1 = values_TK[:, -1:]
    gain_T1 = keep_T1 if upstream_cutoff else values_TK[:, topk - 1 : topk]
    below = torch.clamp(keep_T1 - biased_TE, max=-MARGIN_BIN_SMALLEST / 2)
    return torch.where(selected_TE, below, (gain_T1 - biased_TE).clamp(min=0.0))


def margin_bins(margins: torch.Tensor) -> torch.Tensor:
    """The bin of every margin: ``torch.bucketize(margins, margin_edges(), right=True)``.

    Computed from the float's exponent instead of a search (6x faster on a
    CPU); bin ``J`` is ``[-SMALLEST, 0)``, bin ``J + 1`` is ``[0, SMALLEST)``.
    """
    octaves = MARGIN_BIN_OCTAVES
    mantissa, exponent = torch.frexp(margins.abs() / MARGIN_BIN_SMALLEST)  # |x|/x0 = m * 2**e
    # Positive: edges <= x are the J negative ones, 0, and the x0 * 2**k <= x: floor(log2 y) + 1.
    above = (exponent).clamp(0, octaves)
    # Negative: x0 * 2**k < |x| for ceil(log2 y) of them (exact powers of two: one fewer).
    below = torch.where(mantissa > 0.5, exponent, exponent - 1).clamp(0, octaves)
    return torch.where(margins >= 0, octaves + 1 + above, octaves - below)


def margin_histogram(margins_TE: torch.Tensor, weight_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[E, 2, B]`` float32: per expert and bin, the tokens and the sum of their margins.

    ``weight_T`` is 0 for tokens that must not count (padding). Summed over
    micro-batches and ranks, it is the histogram of the global batch.
    """
    num_tokens, num_experts = margins_TE.shape
    device = margins_TE.device
    margins_TE = margins_TE.float().clamp(-_MARGIN_CLAMP, _MARGIN_CLAMP)
    bins_TE = margin_bins(margins_TE)
    slots_TE = bins_TE + MARGIN_BINS * torch.arange(num_experts, device=device)
    if weight_T is None:
        weight_TE = torch.ones_like(margins_TE)
    else:
        weight_TE = weight_T.float().unsqueeze(-1).expand_as(margins_TE)
    hist = torch.zeros(2, num_experts * MARGIN_BINS, dtype=torch.float32, device=device)
    hist[0].scatter_add_(0, slots_TE.reshape(-1), weight_TE.reshape(-1))
    hist[1].scatter_add_(0, slots_TE.reshape(-1), (weight_TE * margins_TE).reshape(-1))
    return hist.view(2, num_experts, MARGIN_BINS).transpose(0, 1).contiguous()


_CLAMPED_EDGES: dict[torch.device, torch.Tensor] = {}


def _clamped_edges(device: torch.device) -> torch.Tensor:
    """The bin edges with the clamp as outer edges, float64, made once per device.

    Built from a Python tuple each step, they would be a host-to-device copy
    (a synchronisation on a GPU) in every balancer step of the quantile rule.
    """
    edges = _CLAMPED_EDGES.get(device)
    if edges is None:
        edges = torch.tensor((-_MARGIN_CLAMP,) + MARGIN_EDGES + (_MARGIN_CLAMP,), dtype=torch.float64,
                             device=device)
        _CLAMPED_EDGES[device] = edges
    return edges


def histogram_counts(histogram: torch.Tensor) -> torch.Tensor:
    """``[..., E]``: each expert's count, the histogram's mass below 0 (``selection_margins``)."""
    return histogram[..., 0, : MARGIN_BINS // 2].sum(dim=-1)


def quantile_step(histogram: torch.Tensor) -> torch.Tensor:
    """The move ``d[i]`` after which expert i would get the mean load, ``[..., E]`` float64.

    ``histogram`` is ``[..., E, 2, B]`` (``margin_histogram`` summed over the
    global batch). An expert gains token t when ``d > margin[t]``, so ``d`` is
    the (C+1)-th smallest margin, C = mean load (any real C: no divisibility
    of T*K by E needed). Inside the bin that holds it, the margins are taken
    as evenly spaced around their mean, so a bin with one margin gives that
    margin exactly: ``qb_dual_update``'s value wherever the bins separate the
    tokens near the quantile. A layer without tokens gets ``d = 0``.
    """
    hist = histogram.double()
    counts_EB, sums_EB = hist[..., 0, :], hist[..., 1, :]
    load_E = histogram_counts(hist)
    target_E1 = (load_E.sum(dim=-1, keepdim=True) / load_E.shape[-1]).expand_as(load_E).unsqueeze(-1)
    below_EB = counts_EB.cumsum(dim=-1)
    # First bin whose cumulative count passes C: the (C+1)-th smallest is inside.
    bin_E1 = torch.searchsorted(below_EB.contiguous(), target_E1.contiguous(), right=True)
    bin_E1 = bin_E1.clamp(max=MARGIN_BINS - 1)
    n_E = counts_EB.gather(-1, bin_E1).squeeze(-1)
    before_E = (below_EB.gather(-1, bin_E1) - counts_EB.gather(-1, bin_E1)).squeeze(-1)
    mean_E = sums_EB.gather(-1, bin_E1).squeeze(-1) / n_E.clamp(min=1e-30)
    edges = _clamped_edges(hist.device)
    low_E, high_E = edges[bin_E1.squeeze(-1)], edges[bin_E1.squeeze(-1) + 1]
    tail = (bin_E1.squeeze(-1) == 0) | (bin_E1.squeeze(-1) == MARGIN_BINS - 1)
    width_E = torch.where(tail, torch.zeros_like(low_E), high_E - low_E)
    position_E = target_E1.squeeze(-1) - before_E + 1  # 1-based rank inside the bin
    value_E = mean_E + (position_E - (n_E + 1) / 2) * width_E / n_E.clamp(min=1.0)
    value_E = torch.minimum(torch.maximum(value_E, low_E), high_E)
    has_tokens = target_E1.squeeze(-1) > 0
    return torch.where(has_tokens & (n_E > 0), value_E, torch.zeros_like(value_E))


def rule_step(counts: torch.Tensor, *, rate: float, rule: str = "sign",
              histogram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The rule's move of every bias for one batch's ``[..., E]`` counts.

    "sign": ``u * sign(mean - c)`` (the paper and Megatron-Core);
    "proportional": ``u * (mean - c) / mean``: the same direction, scaled by the
    relative overload, so it settles instead of oscillating by +-u around balance;
    "quantile": ``u * quantile_step(histogram)``, u in (0, 1] the fraction of
    the way to the batch's balancing bias (upstream's quantile-balancing EMA e
    is u = 1 - e).
    Computed, and returned, in float64 whatever the counts' dtype: a float16
    sum overflows past 65504 tokens (an all-NaN bias), a float32 one rounds
    single tokens away past 2**24.
    """
    counts = counts.double()
    # The mean as sum / E, as Megatron-Core computes it (bit-identical sign rule).
    mean = counts.sum(dim=-1, keepdim=True) / counts.shape[-1]
    offset = mean - counts
    if rule == "sign":
        return torch.sign(offset) * rate
    if rule == "proportional":
        # A layer with no tokens has mean 0: no information, no step.
        return torch.where(mean > 0, offset / mean.clamp(min=1e-12), torch.zeros_like(offset)) * rate
    if rule == "quantile":
        if histogram is None or histogram.shape[:-2] != counts.shape:
            raise ValueError(
                f"histogram: the quantile rule needs a [..., E, 2, {MARGIN_BINS}] margin histogram "
                f"matching counts {tuple(counts.shape)}, got "
                f"{None if histogram is None else tuple(histogram.shape)}"
            )
        return quantile_step(histogram).to(offset.dtype) * rate
    raise ValueError(f"rule: must be one of {', '.join(UPDATE_RULES)}; got {rule!r}")


def _centered(bias: torch.Tensor, center: bool) -> torch.Tensor:
    # Top-K on s + b does not change when every b[i] moves by the same
    # constant, so centering changes no routing decision; it stops the
    # common-mode drift.
    return bias - bias.mean(dim=-1, keepdim=True) if center else bias


def usable_layers(counts: torch.Tensor, histogram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[..., 1]`` bool: the layers an update may move; the others keep their bias and state.

    A layer moves when it saw a token and every count (and margin-histogram
    entry) is finite. One sum per layer decides both, on the device: a sum is
    finite exactly when its terms are (counts are far below float's range),
    and NaN > 0 is false. Checking finiteness with ``if`` instead would read
    the result back to the host (a synchronisation on a GPU every step).
    """
    total = counts.double().sum(dim=-1, keepdim=True)
    usable = (total > 0) & torch.isfinite(total)
    if histogram is not None:
        usable &= torch.isfinite(histogram.double().sum(dim=(-3, -2, -1))).unsqueeze(-1)
    return usable


def compute_bias_update(
    counts: torch.Tensor,
    bias: torch.Tensor,
    *,
    rate: float,
    rule: str = "sign",
    center: bool = False,
    histogram: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return the bias after one update from the global token counts.

    Args:
        counts: ``[..., E]`` tokens routed to each expert over the global batch.
        bias: ``[..., E]`` current expert bias (float32).
        rate: step size u.
        rule: "sign", "proportional" or "quantile" (see ``rule_step``).
        center: subtract each layer's mean bias afterwards.
        histogram: ``[..., E, 2, B]`` margin histogram (the quantile rule only).

    With ``rule="sign", center=False`` the result is bit-identical to
    Megatron-Core's ``get_updated_expert_bias`` without its all-reduce
    wherever its float32 sum and mean are exact (it computes in the counts'
    dtype, this in float64). A layer without tokens or with a non-finite
    count keeps its bias (``usable_layers``; upstream would write NaN into
    it), and ``rate == 0`` returns ``bias`` bit for bit. Raises
    ``ValueError`` for a rate that is not a finite number >= 0. Non-finite
    counts raise nothing here (that would need a host synchronisation):
    ``LossFreeBalancer`` reports them on its logging steps.
    """
    if counts.shape != bias.shape:
        raise ValueError(f"counts and bias must have the same shape, got {counts.shape} and {bias.shape}")
    check_nonnegative("rate", rate)
    if rate == 0:
        return bias
    step = rule_step(counts, rate=rate, rule=rule, histogram=histogram)
    updated = _centered(bias + step.to(bias.dtype), center)
    return torch.where(usable_layers(counts, histogram), updated, bias)


def compute_bias_update_with_integral(
    counts: torch.Tensor,
    bias: torch.Tensor,
    integral: torch.Tensor,
    *,
    rate: float,
    rule: str = "sign",
    center: bool = False,
    gain: float,
    decay: float,
    histogram: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute_bias_update`` plus the drift-tracking integral term.

    ``integral <- decay * integral + gain * step`` and ``bias <- bias + step +
    integral`` (then centered), where ``step`` is the rule's move. Returns
    ``(bias, integral)``. The integral is a leaky sum of the steps: when the
    router's scores drift, the steps keep one sign and the integral grows
    until the bias moves with the drift; per-batch noise alternates in sign
    and mostly cancels in it. With ``gain == 0`` the bias equals
    ``compute_bias_update``'s bit for bit. A layer without tokens or with a
    non-finite count keeps both its bias and its integral; ``rate == 0``
    returns both unchanged.
    """
    if not (counts.shape == bias.shape == integral.shape):
        raise ValueError(
            "counts, bias and integral must have the same shape, got "
            f"{counts.shape}, {bias.shape} and {integral.shape}"
        )
    check_nonnegative("rate", rate)
    if gain == 0 or rate == 0:
        return compute_bias_update(counts, bias, rate=rate, rule=rule, center=center,
                                   histogram=histogram), integral
    step = rule_step(counts, rate=rate, rule=rule, histogram=histogram).to(bias.dtype)
    new_integral = decay * integral + gain * step
    updated = _centered(bias + step + new_integral, center)
    keep = ~usable_layers(counts, histogram)
    return torch.where(keep, bias, updated), torch.where(keep, integral, new_integral)


# ---------------------------------------------------------- adaptive gain
#: How fast the adaptive gain moves: its logarithm changes by this times the
#: correlation of two successive moves per step (at most a factor e**0.2).
ADAPTIVE_GAIN_STEP = 0.2


def adaptive_quantile_update(
    counts: torch.Tensor,
    bias: torch.Tensor,
    step: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    ceiling: float,
    floor: float,
    center: bool,
    histogram: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The quantile step with a gain per layer that keeps successive moves uncorrelated.

    ``step`` is ``quantile_step``'s ``[L, E]`` move with the current bias, and
    the bias takes ``gain * step``. Read the batch's balancing bias ``bias +
    step`` as a level that drifts as the router trains, seen through the
    count noise of one batch. A gain too small trails the drift: successive
    moves point the same way. A gain too large follows each batch's noise:
    they alternate. The moves are uncorrelated (white) exactly at the Kalman
    gain of that local-level model, ``q / r = g**2 / (1 - g)`` (drift
    variance q, noise variance r), so the gain is steered by the cosine
    ``rho`` between this step's and the last step's centered moves:
    ``gain <- clamp(gain * exp(ADAPTIVE_GAIN_STEP * rho), floor, ceiling)``,
    starting at ``ceiling``. Nothing is estimated but the sign of a
    correlation: no variances, no shape of the noise (a batch's balancing
    bias need not be Gaussian: identical tokens make it jump). Returns
    ``(bias, state, gain_L1)``; ``state`` holds ``gain`` ``[L, 1]``,
    ``previous`` (the last centered move) ``[L, E]`` and ``seen`` ``[L, 1]``;
    a layer that has seen no move yet starts at ``ceiling`` whatever its
    ``gain`` holds (state saved under another config resumes cleanly).
    A layer whose ``counts`` (or ``histogram``, the step's source) hold no
    token or a non-finite value keeps its bias and its state.
    """
    move = step.double() - step.double().mean(-1, keepdim=True)
    previous, seen = state["previous"], state["seen"]
    dot = (move * previous).sum(-1, keepdim=True)
    norms = ((move * move).sum(-1, keepdim=True) * (previous * previous).sum(-1, keepdim=True)).sqrt()
    rho = torch.where((seen >= 1) & (norms > 0), dot / norms.clamp(min=1e-300), torch.zeros_like(dot))
    prior = torch.where(seen >= 1, state["gain"], torch.full_like(state["gain"], ceiling))
    gain = (prior * torch.exp(ADAPTIVE_GAIN_STEP * rho)).clamp(floor, ceiling)
    updated = _centered(bias + (gain * step.double()).to(bias.dtype), center)
    new_state = {"gain": gain, "previous": move, "seen": seen + 1}
    keep_L1 = ~usable_layers(counts, histogram)
    new_state = {key: torch.where(keep_L1, state[key], value) for key, value in new_state.items()}
    return torch.where(keep_L1, bias, updated), new_state, new_state["gain"]


#: Every tensor an update may carry from one step to the next, per layer:
#: key -> (dtype, per expert or one per layer). The drift integral is float32
#: like the bias; the adaptive gain's history float64 like its arithmetic.
UPDATE_STATE_LAYOUT: dict[str, tuple[torch.dtype, bool]] = {
    "integral": (torch.float32, True),
    "gain": (torch.float64, False),
    "previous": (torch.float64, True),
    "seen": (torch.int64, False),
}
_ADAPTIVE_KEYS = ("gain", "previous", "seen")


def state_zeros(key: str, layers: int, experts: int, device=None) -> torch.Tensor:
    """``key``'s tensor of ``UPDATE_STATE_LAYOUT`` for ``[layers, experts]``, zeros."""
    dtype, per_expert = UPDATE_STATE_LAYOUT[key]
    return torch.zeros(layers, experts if per_expert else 1, dtype=dtype, device=device)


def adaptive_state(layers: int, experts: int, *, ceiling: float, device=None) -> dict[str, torch.Tensor]:
    """The starting state of ``adaptive_quantile_update`` for ``[layers, experts]``: gain at ``ceiling``."""
    state = {key: state_zeros(key, layers, experts, device) for key in _ADAPTIVE_KEYS}
    state["gain"].fill_(float(ceiling))
    return state


def update_state_keys(config: LossFreeConfig) -> tuple[str, ...]:
    """The keys of ``UPDATE_STATE_LAYOUT`` that ``config``'s update reads and writes."""
    keys = ("integral",) if config.integral_gain > 0 else ()
    return keys + (_ADAPTIVE_KEYS if config.schedule == "adaptive" else ())


def update_state(config: LossFreeConfig, layers: int, experts: int, device=None) -> dict[str, torch.Tensor]:
    """What ``config``'s update carries from one step to the next, per layer (``[layers, ...]``).

    ``integral`` (``integral_gain > 0``) and the adaptive gain's ``gain``,
    ``previous`` and ``seen`` (``schedule: adaptive``); empty for the plain
    rules. ``LossFreeRouter`` keeps every key of ``UPDATE_STATE_LAYOUT`` as a
    buffer, so the state is saved with the model whatever the config.
    """
    state = {key: state_zeros(key, layers, experts, device) for key in update_state_keys(config)}
    if "gain" in state:
        state["gain"].fill_(config.update_rate)
    return state


def apply_update(
    config: LossFreeConfig,
    step: int,
    counts: torch.Tensor,
    bias: torch.Tensor,
    state: dict[str, torch.Tensor],
    histogram: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One balancer step of ``config`` for ``[L, E]`` layers: ``(bias, state, rate_L1)``.

    The one place that turns a config into an update (the balancer, the
    simulator and the replay benchmark call it): the schedule's rate at
    ``step``, then the rule, the integral or the adaptive gain. ``state`` is
    ``update_state``'s; ``rate_L1`` is the rate each layer took (the adaptive
    gain, or the schedule's rate), a tensor so that reading it is the
    caller's choice (no host synchronisation here).
    """
    rate = scheduled_rate(config, step)
    rule = dict(rule=config.update_rule, center=config.center, histogram=histogram)
    taken = torch.full((bias.shape[0], 1), rate, dtype=torch.float64, device=bias.device)
    if rate == 0:
        return bias, state, taken
    if config.schedule == "adaptive":
        move = rule_step(counts, rate=1.0, rule="quantile", histogram=histogram)
        bias, adaptive, gain = adaptive_quantile_update(
            counts, bias, move, {k: state[k] for k in _ADAPTIVE_KEYS},
            ceiling=rate, floor=config.min_update_rate, center=config.center, histogram=histogram,
        )
        return bias, {**state, **adaptive}, gain
    if config.integral_gain > 0:
        bias, integral = compute_bias_update_with_integral(
            counts, bias, state["integral"], rate=rate, gain=config.integral_gain,
            decay=config.integral_decay, **rule,
        )
        return bias, {**state, "integral": integral}, taken
    return compute_bias_update(counts, bias, rate=rate, **rule), state, taken


def scheduled_rate(config: LossFreeConfig, step: int) -> float:
    """Step size for balancer step ``step`` (0 for the first update).

    - constant: u.
    - inverse_time: ``u / (1 + t / decay_steps)``, the O(1/t) steps under which
      the primal-dual analysis gives logarithmic regret; large early (fast
      balancing from a random router), small late (little routing noise).
    - cosine: from u down to ``min_update_rate`` over ``decay_steps``.
    - linear_warmup: a ramp over ``warmup_steps``, then u.
    ``warmup_steps`` ramps every schedule (t counts from the end of warm-up),
    ``min_update_rate`` floors the decaying ones, and ``freeze_after_steps``
    sets the rate to 0 from that step on.
    """
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step}")
    if config.freeze_after_steps is not None and step >= config.freeze_after_steps:
        return 0.0
    u = config.update_rate
    if config.warmup_steps and step < config.warmup_steps:
        return u * (step + 1) / config.warmup_steps
    t = step - config.warmup_steps
    if config.schedule in ("constant", "linear_warmup", "adaptive"):  # adaptive: u is the ceiling
        return u
    if config.schedule == "inverse_time":
        rate = u / (1.0 + t / config.decay_steps)
    elif config.schedule == "cosine":
        progress = min(t, config.decay_steps) / config.decay_steps
        rate = config.min_update_rate + 0.5 * (u - config.min_update_rate) * (1 + math.cos(math.pi * progress))
    else:  # validated by LossFreeConfig
        raise ValueError(f"lossfree.schedule: unknown schedule {config.schedule!r}")
    return max(rate, config.min_update_rate)

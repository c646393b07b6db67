"""LossFreeRouter: Megatron-Core's TopKRouter with loss-free expert bias.

Selection uses ``scores + expert_bias``; the gate weights that scale expert
outputs use the unbiased scores, so the bias never enters the loss. The router
only counts tokens; ``LossFreeBalancer`` reduces the counts and moves the bias
once per global batch.

Differences from ``TopKRouter(moe_router_enable_expert_bias=True)`` in
megatron-core 0.19.2, each on purpose:
- softmax score functions get the bias too (upstream refuses it in
  ``TransformerConfig`` and ignores it in the softmax branch);
- counts are the top-K selection of non-padding tokens, before capacity
  dropping (the bias must see demand; post-drop counts hide overload);
- a token is counted when the backward pass of its forward runs, so eval,
  ``no_grad`` and the recompute pass of activation checkpointing (reentrant or
  not) add nothing, and every trained token is counted exactly once;
- ``expert_bias`` and ``local_tokens_per_expert`` never leave float32, even
  through ``Float16Module``'s ``.bfloat16()`` (no round trip through bf16);
- buffers follow the module's device; no ``torch.cuda.current_device()``;
- what the balancer carries between steps is in the router too, saved as the
  router's ``_extra_state``: the step counter that drives the rate schedule,
  the drift integral and the adaptive gain's history. Every checkpoint of the
  model (Megatron-LM's, Bridge's, ``dist_checkpointing``) then resumes the
  balancer bit for bit, with no side file; see ``get_extra_state`` for why
  ``_extra_state`` rather than persistent buffers. A checkpoint without it
  (Megatron-Core's own expert bias, or one saved before the state was part
  of the model) still loads: ``_load_from_state_dict`` leaves the state as it
  is and notes it in ``balancer_state_loaded`` (the balancer warns).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import (
    apply_router_token_dropping,
    compute_routing_scores_for_aux_loss,
    group_limited_topk,
    router_gating_linear,
    topk_routing_with_score_function,
)
from megatron.core.transformer.moe.router import TopKRouter

from nemo_lossfree import megatron_compat
from nemo_lossfree.compat import refuse_unsupported_balancing, refuse_upstream_expert_bias
from nemo_lossfree.metrics import health_size, routing_health
from nemo_lossfree.scores import router_scores
from nemo_lossfree.update import MARGIN_BINS, UPDATE_STATE_LAYOUT, margin_histogram, selection_margins, state_zeros

#: The balancer's step counter (int64 ``[1]``): the rate schedule's position.
STEPS_BUFFER = "lossfree_steps"
#: ``update.UPDATE_STATE_LAYOUT`` key -> the router buffer holding this layer's row of it.
STATE_BUFFERS = {key: f"lossfree_{key}" for key in UPDATE_STATE_LAYOUT}
#: Every buffer of the balancer's state (saved through ``get_extra_state``).
BALANCER_STATE_BUFFERS = (STEPS_BUFFER, *STATE_BUFFERS.values())
#: ``get_extra_state()``'s layout version; ``set_extra_state`` reads this one.
EXTRA_STATE_FORMAT = 1
_EXTRA_STATE_KEYS = {"steps": STEPS_BUFFER, **STATE_BUFFERS}
# Buffers whose dtype no model-wide cast may change (float32 bias, counts and
# health sums, float64 and int64 state).
_FIXED_DTYPE_BUFFERS = ("expert_bias", "local_tokens_per_expert", "local_margin_histogram", "local_health",
                        *BALANCER_STATE_BUFFERS)
# Training micro-batches without a balancer step before the router warns. Far
# above the micro-batches of one global batch in practice.
UNBALANCED_FORWARDS_WARNING = 4096

logger = logging.getLogger(__name__)


@dataclass
class ScoreRecording:
    """What a routing trace (``nemo_lossfree.traces``) asks a router to keep during one step."""

    #: Tokens to keep per step on this rank (None: all).
    max_tokens: Optional[int]
    dtype: torch.dtype = torch.float16
    #: The unbiased scores ``[T, E]`` of the trained micro-batches, padding left out.
    chunks: list = field(default_factory=list)
    tokens: int = 0


class _CommitCountsOnBackward(torch.autograd.Function):
    """Identity on the gate weights; adds this forward's counts when its backward runs.

    Backward runs once per trained micro-batch whatever recomputation did in
    between: a reentrant checkpoint's first forward has no graph and its
    recompute's graph is the one that is differentiated; a non-reentrant
    checkpoint differentiates the original graph and discards the recompute's.
    What else the step records (margin histogram, health, scores) rides along
    in ``extras`` and is committed the same way.
    """

    @staticmethod
    def forward(ctx, probs, counts_E, extras, router):  # noqa: D401 - autograd signature
        ctx.counts_E = counts_E
        ctx.extras = extras
        ctx.router = router
        return probs.view_as(probs)

    @staticmethod
    def backward(ctx, grad_probs):
        ctx.router.commit(ctx.counts_E, ctx.extras)
        return grad_probs, None, None, None


class LossFreeRouter(TopKRouter):
    """Top-K router whose selection is balanced by a per-expert bias.

    Use it through ``MoESubmodules.router`` (see ``nemo_lossfree.spec``). It
    accepts every ``TransformerConfig`` the upstream router accepts except
    ``moe_router_enable_expert_bias=True`` (Megatron-Core would update the same
    bias a second time in ``finalize_model_grads``) and the sinkhorn /
    quantile-balancing routing types (they choose experts by other means).
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False) -> None:
        refuse_upstream_expert_bias(config, "LossFreeRouter")
        refuse_unsupported_balancing(config)
        megatron_compat.check_router_config(config)
        super().__init__(
            config=config, pg_collection=pg_collection, **megatron_compat.router_init_kwargs(is_mtp_layer)
        )
        megatron_compat.add_missing_router_attributes(self)
        # TopKRouter left these as plain None attributes; make them ours.
        for name in _FIXED_DTYPE_BUFFERS:
            if name in self.__dict__:
                delattr(self, name)
        device = self.weight.device
        experts = self.config.num_moe_experts
        self.register_buffer("expert_bias", torch.zeros(experts, dtype=torch.float32, device=device))
        self.register_buffer(
            "local_tokens_per_expert",
            torch.zeros(experts, dtype=torch.float32, device=device),
            persistent=False,
        )
        # The quantile rule's margin histogram, summed like the counts; the
        # balancer turns it on (record_margins) when its rule needs it.
        self.record_margins = False
        self.register_buffer(
            "local_margin_histogram",
            torch.zeros(experts, 2, MARGIN_BINS, dtype=torch.float32, device=device),
            persistent=False,
        )
        # The balancer's state (see get_extra_state), all of it whatever the
        # config, so that checkpoints of every config load into every other.
        # Buffers so that it follows the module's device; saved as _extra_state.
        self.register_buffer(STEPS_BUFFER, torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        for key, name in STATE_BUFFERS.items():
            self.register_buffer(name, state_zeros(key, 1, experts, device).reshape(-1), persistent=False)
        # None until a state dict is loaded; then whether it held the balancer state.
        self.balancer_state_loaded: Optional[bool] = None
        # Router-health sums (metrics.routing_health), recorded only on the
        # steps the balancer logs (it sets record_health) and summed with the counts.
        self.record_health = False
        self.register_buffer(
            "local_health", torch.zeros(health_size(experts), dtype=torch.float32, device=device),
            persistent=False,
        )
        # A routing trace's recording of this step (nemo_lossfree.traces); None: off.
        self.score_recording: Optional[ScoreRecording] = None
        # Training micro-batches counted since the last balancer step; a loud
        # warning when it grows without bound (no balancer is running).
        self.forwards_since_update = 0
        self.balancer_attached = False
        # `frozen_expert_bias` (inherited, False) keeps Megatron's meaning: when a
        # framework sets it (Megatron-LM's --freeze-all-layers does), the
        # balancer leaves this router's bias alone.

    #: Bumped whenever any router's buffers are replaced (device move, cast,
    #: load): a balancer caches the buffers it updates and re-reads them, and
    #: the step counter, only when this changed (one integer compare per step).
    buffers_version = 0

    # ----------------------------------------------------------------- dtype
    def _apply(self, fn, recurse=True):
        """Keep the bias, counts and balancer state in their dtypes (bit-exact) through casts.

        ``Float16Module`` calls ``.bfloat16()`` on the whole model; a bias cast
        to bf16 and back would collapse distinct values, and bf16 counts flip
        update signs. Device moves still apply.
        """
        before = {name: self._buffers[name] for name in _FIXED_DTYPE_BUFFERS}
        super()._apply(fn, recurse)
        for name, original in before.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        LossFreeRouter.buffers_version += 1
        return self

    def _follow_device(self, device: torch.device) -> None:
        # Router.gating() moves only the weight to the compute device.
        if self._buffers["expert_bias"].device == device:
            return
        for name in _FIXED_DTYPE_BUFFERS:
            self._buffers[name] = self._buffers[name].to(device)
        LossFreeRouter.buffers_version += 1

    # ------------------------------------------------------------ checkpoint
    def get_extra_state(self) -> dict:
        """The balancer's state of this layer, saved with the model: ``{"format", "steps", <update state>}``.

        Why ``_extra_state`` and not persistent buffers: Megatron-Core's
        ``sharded_state_dict`` (``make_sharded_tensors_for_checkpoint``) gives
        a router's ``_extra_state`` the same treatment as its ``expert_bias``:
        the replica id over TP and DP x CP (the router-replica group: one
        replica writes, every replica reads) and the layer offset across
        pipeline stages, so both reshard by layer alike. Unlike buffers, it is
        one versioned object: new state (an EMA, a new rule's) changes no key,
        so a checkpoint of this version keeps loading under later ones without
        a key mismatch, and ``set_extra_state`` reads older layouts. It is
        training state, not a weight: Megatron-Bridge's Hugging Face
        conversion skips ``_extra_state`` (Transformer Engine keeps its FP8
        history there) where it warns about every unmapped persistent buffer.
        CPU copies: read back only when a checkpoint is taken.
        """
        state = {key: self._buffers[name].detach().to("cpu", copy=True) for key, name in _EXTRA_STATE_KEYS.items()}
        return {"format": EXTRA_STATE_FORMAT, **state}

    def set_extra_state(self, state) -> None:
        """Restore ``get_extra_state()``'s dict (shapes checked); keys it lacks keep their values."""
        if not isinstance(state, dict) or state.get("format") != EXTRA_STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"LossFreeRouter (layer {self.layer_number}) _extra_state: must be a balancer state of "
                f"format {EXTRA_STATE_FORMAT}, got {found!r}"
            )
        for key, name in _EXTRA_STATE_KEYS.items():
            if key not in state:
                continue
            mine, saved = self._buffers[name], state[key]
            if saved.numel() != mine.numel():
                raise ValueError(
                    f"LossFreeRouter (layer {self.layer_number}) _extra_state[{key!r}]: {saved.numel()} "
                    f"values, this router holds {mine.numel()} (a checkpoint of another expert count?)"
                )
            mine.copy_(saved.reshape(mine.shape))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Load as usual; a state dict without the balancer state leaves it as it is.

        Such a checkpoint (Megatron-Core's own expert bias, or saved before the
        state was in the model) is no error even under ``strict=True``:
        ``balancer_state_loaded`` records that the state was absent, and the
        balancer says what restarts.
        """
        key = prefix + "_extra_state"
        present = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not present and key in missing_keys:
            missing_keys.remove(key)
        self.balancer_state_loaded = present
        LossFreeRouter.buffers_version += 1

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits; moves the gate weights to the input's device if needed.

        Upstream moves them to ``torch.cuda.current_device()``, which fails on
        a CPU-only host and is wrong for non-CUDA accelerators.
        """
        for name in ("weight", "bias"):
            param = getattr(self, name, None)
            if param is not None and param.device != input.device:
                param.data = param.data.to(device=input.device)
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        return router_gating_linear(input, self.weight, self.bias, router_dtype)

    # -------------------------------------------------------------- routing
    def _scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return router_scores(logits_TE, self.score_function)

    def _topk(self, scores_TE: torch.Tensor, topk: int, num_groups=None, group_topk=None):
        if group_topk:
            num_tokens, num_experts = scores_TE.shape
            return group_limited_topk(
                scores_TE, topk, num_tokens, num_experts, num_groups, group_topk
            )
        # Same as upstream: sorted only while training (indices order the dispatch).
        return torch.topk(scores_TE, k=topk, dim=1, sorted=torch.is_grad_enabled())

    def biased_topk(self, logits_TE: torch.Tensor):
        """Top-K on biased scores; gates from unbiased scores.

        Returns ``(probs_TE, routing_map_TE, top_indices_TK, biased_TE)``;
        ``top_indices_TK`` and ``biased_TE`` are None on the fused (Transformer
        Engine) path. The gates are upstream's own
        (``topk_routing_with_score_function(..., precomputed_indices=)``), so
        every score function, pre-softmax and scaling option gates exactly as
        in ``TopKRouter`` (before megatron-core 0.19: ``megatron_compat``).
        """
        cfg = self.config
        gating = dict(
            use_pre_softmax=cfg.moe_router_pre_softmax,
            num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk,
            scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=self.score_function,
        )
        if cfg.moe_router_fusion and self.score_function != "softmax":
            # TE's fused kernel applies expert_bias for sigmoid/sqrtsoftplus itself.
            probs, routing_map = topk_routing_with_score_function(
                logits_TE, self.topk, expert_bias=self.expert_bias, fused=True, **gating
            )
            return probs, routing_map, None, None

        biased_TE = self._scores(logits_TE) + self.expert_bias
        groups = (cfg.moe_router_num_groups, cfg.moe_router_group_topk)
        if self.router_replay is None:
            _, top_indices_TK = self._topk(biased_TE, self.topk, *groups)
        else:
            _, top_indices_TK = self.router_replay.get_replay_topk(
                biased_TE, self.topk, *groups, self._topk
            )
        probs_TE, routing_map_TE = megatron_compat.gate_at_indices(
            logits_TE, self.topk, top_indices_TK, **gating
        )
        return probs_TE, routing_map_TE, top_indices_TK, biased_TE

    def _allowed_experts(self, biased_TE: torch.Tensor) -> Optional[torch.Tensor]:
        """``[T, E]`` experts of the groups each token's group-limited routing kept (else None).

        Megatron scores a group by the sum of its top ``topk / group_topk``
        biased scores and keeps the best ``group_topk`` groups.
        """
        cfg = self.config
        if not cfg.moe_router_group_topk:
            return None
        num_tokens, num_experts = biased_TE.shape
        groups = cfg.moe_router_num_groups
        per_group = self.topk // cfg.moe_router_group_topk
        group_scores_TG = biased_TE.view(num_tokens, groups, -1).topk(per_group, dim=-1)[0].sum(-1)
        kept_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        kept_TG.scatter_(1, torch.topk(group_scores_TG, cfg.moe_router_group_topk, dim=-1)[1], True)
        return kept_TG.repeat_interleave(num_experts // groups, dim=1)

    def margin_histogram(self, logits_TE, biased_TE, routing_map_TE, padding_mask_T) -> torch.Tensor:
        """This micro-batch's ``[E, 2, B]`` margin histogram (the quantile rule's input)."""
        if biased_TE is None:  # fused path: the same scores, computed here
            biased_TE = self._scores(logits_TE) + self.expert_bias
        biased_TE = biased_TE.detach()
        margins_TE = selection_margins(
            biased_TE, routing_map_TE, self.topk, self._allowed_experts(biased_TE)
        )
        weight_T = None if padding_mask_T is None else (~padding_mask_T).float()
        return margin_histogram(margins_TE, weight_T)

    def health(self, logits_TE, biased_TE, routing_map_TE, padding_mask_T, seq_length) -> torch.Tensor:
        """This micro-batch's router-health sums (``metrics.routing_health``), logging steps only.

        Costs one more score function and top-K (the unbiased choice) and a few
        ``[T, E]`` reductions; no host synchronisation.
        """
        scores_TE = self._scores(logits_TE).detach()
        biased_TE = (scores_TE + self.expert_bias) if biased_TE is None else biased_TE.detach()
        cfg = self.config
        _, unbiased_TK = self._topk(scores_TE, self.topk, cfg.moe_router_num_groups, cfg.moe_router_group_topk)
        unbiased_TE = torch.zeros_like(routing_map_TE, dtype=torch.bool).scatter_(1, unbiased_TK, True)
        return routing_health(biased_TE, routing_map_TE.bool(), unbiased_TE, padding_T=padding_mask_T,
                              allowed_TE=self._allowed_experts(biased_TE), seq_length=seq_length)

    def scores_to_record(self, logits_TE, padding_mask_T) -> torch.Tensor:
        """The unbiased scores of this micro-batch's tokens (padding left out) for a routing trace."""
        recording = self.score_recording
        scores_TE = self._scores(logits_TE).detach()
        if padding_mask_T is not None:
            scores_TE = scores_TE[~padding_mask_T]  # a host sync, on traced steps only
        if recording.max_tokens is not None:
            scores_TE = scores_TE[: recording.max_tokens]
        return scores_TE.to(recording.dtype)

    def count_tokens(
        self,
        routing_map_TE: torch.Tensor,
        top_indices_TK: Optional[torch.Tensor],
        padding_mask_T: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Per-expert counts of the non-padding tokens' selections, float32 ``[E]``.

        ``padding_mask_T`` is True for padding (megatron-core's convention in
        GPTModel and in the z-loss / aux-loss code). No host synchronisation.
        """
        num_experts = routing_map_TE.shape[-1]
        if top_indices_TK is None:
            selected_TE = routing_map_TE
            if padding_mask_T is not None:
                selected_TE = selected_TE & ~padding_mask_T.unsqueeze(-1)
            return selected_TE.sum(dim=0, dtype=torch.float32)
        if padding_mask_T is None:
            weight_TK = torch.ones(top_indices_TK.shape, dtype=torch.float32, device=top_indices_TK.device)
        else:
            weight_TK = (~padding_mask_T).unsqueeze(-1).expand_as(top_indices_TK).float()
        counts_E = torch.zeros(num_experts, dtype=torch.float32, device=top_indices_TK.device)
        return counts_E.scatter_add_(0, top_indices_TK.reshape(-1), weight_TK.reshape(-1))

    def commit(self, counts_E: torch.Tensor, extras: Optional[dict] = None) -> None:
        """Add one trained micro-batch's counts (and what else it recorded) to the step's totals."""
        self.local_tokens_per_expert.add_(counts_E)
        if not extras:
            return
        if "histogram" in extras:
            self.local_margin_histogram.add_(extras["histogram"])
        if "health" in extras:
            self.local_health.add_(extras["health"])
        recording = self.score_recording
        if "scores" in extras and recording is not None:
            scores_TE = extras["scores"]
            if recording.max_tokens is not None:
                scores_TE = scores_TE[: max(recording.max_tokens - recording.tokens, 0)]
            if scores_TE.shape[0]:
                recording.chunks.append(scores_TE)
                recording.tokens += scores_TE.shape[0]

    def _note_training_forward(self) -> None:
        self.forwards_since_update += 1
        if self.forwards_since_update == UNBALANCED_FORWARDS_WARNING:
            what = "attached but never ran" if self.balancer_attached else "never created"
            message = (
                f"LossFreeRouter (layer {self.layer_number}): {self.forwards_since_update} training "
                f"micro-batches without a bias update (the balancer was {what}); the expert bias "
                "is frozen. Call LossFreeBalancer(model, config).attach(transformer_config), or "
                "its .step() after every global batch."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            logger.warning(message)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Top-K routing on biased scores, then upstream's token dropping and aux losses.

        Args:
            logits: ``[seq_length, bsz, E]`` gating logits.
            padding_mask: ``[seq_length, bsz]``, True for padding tokens.

        Returns:
            ``(probs, routing_map)``, both ``[num_tokens, E]``, as TopKRouter.
        """
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        self._follow_device(logits.device)

        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        probs, routing_map, top_indices, biased = self.biased_topk(logits)

        if self.training and torch.is_grad_enabled():
            self._note_training_forward()
            counts_E = self.count_tokens(routing_map, top_indices, padding_mask)
            extras = {}
            if self.record_margins:
                extras["histogram"] = self.margin_histogram(logits, biased, routing_map, padding_mask)
            if self.record_health:
                extras["health"] = self.health(logits, biased, routing_map, padding_mask, seq_length)
            if self.score_recording is not None:
                extras["scores"] = self.scores_to_record(logits, padding_mask)
            if probs.requires_grad:
                probs = _CommitCountsOnBackward.apply(probs, counts_E, extras, self)
            else:  # frozen router: no backward will come; count now
                self.commit(counts_E, extras)

        if self.config.moe_expert_capacity_factor is not None:
            probs, routing_map = apply_router_token_dropping(
                probs,
                routing_map,
                router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )

        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            routing_map_for_aux, scores_for_aux = compute_routing_scores_for_aux_loss(
                logits,
                self.topk,
                self.score_function,
                fused=self.config.moe_router_fusion,
                padding_mask=padding_mask,
            )
            with_padding = padding_mask is not None
            probs = self._apply_aux_loss(
                probs, scores_for_aux, routing_map_for_aux, with_padding_mask=with_padding
            )
            probs = self._apply_seq_aux_loss(
                probs, scores_for_aux, routing_map_for_aux, seq_length, bsz,
                with_padding_mask=with_padding,
            )
            probs = self._apply_global_aux_loss(
                probs, scores_for_aux, routing_map_for_aux, with_padding_mask=with_padding
            )
        return probs, routing_map

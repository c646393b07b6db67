"""Check a run config before any GPU time is spent.

Checked on the plain dict from ``nemo_lossfree.runconfig.load``, so that a
mistake costs seconds on a laptop, not a queue wait on a cluster. Problems are
strings ``"<key>: <problem>"``.

Megatron-Core's own model rules are Megatron's: the ``model:`` section is
built into its ``TransformerConfig`` on the CPU (``transformer_config.build``),
and its refusal is one problem naming the key. The rules below are those
Megatron applies later (at process-group set-up, model build or the first
step) or never, and this project's own:
- world size = nodes x tasks_per_node must be a multiple of TP x PP x CP; the
  rest is data parallelism (``parallel_state.initialize_model_parallel``).
- the expert grid ETP x EP x PP must divide the world size, i.e. EP x ETP
  divides TP x CP x DP (same function; ETP defaults to TP).
- EP divides ``num_moe_experts`` (``MoELayer``: experts per rank, at build time).
- global batch divisible by micro batch x DP (Megatron's microbatch calculator).
- MoE with TP > 1 needs ``sequence_parallel`` (``MoELayer`` refuses to train
  otherwise; ``TransformerConfig`` only warns, and only with EP > 1).
- virtual pipeline needs PP > 1, and an even pipeline split needs
  ``num_layers`` divisible by PP x VPP (``TransformerConfig`` checks only the
  uneven splits; the even one fails when the model is built).
- top-k <= experts (``torch.topk`` fails on the first step) and the score
  function (``scores``; ``TransformerConfig``'s ``Literal`` is not enforced).
- sequence length divisible by 2 x CP (load-balanced context parallelism).
- the ``lossfree:`` section (``LossFreeConfig``) and ``compat``'s refusals.
- every ``model:`` key is a field Megatron knows (``megatron_fields``):
  ``TransformerConfig(**model)`` refuses any other, and Bridge skips it with a
  warning, so a misspelt ``moe_router_topkk`` would silently leave the default.
"""

from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional

from nemo_lossfree import compat
from nemo_lossfree.config import LossFreeConfig
from nemo_lossfree.runconfig import megatron_fields, transformer_config
from nemo_lossfree.runconfig.load import tasks_per_node
from nemo_lossfree.scores import check_score_function

_MISSING = object()


class _Checker:
    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def section(self, name: str) -> Mapping[str, Any]:
        value = self.config.get(name)
        return value if isinstance(value, Mapping) else {}

    def refusal(self, rule, *args: Any) -> None:
        """Run one of ``compat``'s rules; its ValueError is a problem."""
        try:
            rule(*args)
        except ValueError as exc:
            self.problems.append(str(exc))

    def integer(self, section: str, key: str, default: Any = _MISSING, *, minimum: int = 1,
                optional: bool = False) -> Optional[int]:
        """The int at ``section.key`` or None (and a problem) when absent/invalid."""
        value = self.section(section).get(key, default)
        if value is _MISSING:
            self.problems.append(f"{section}.{key}: required, missing")
            return None
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
            self.problems.append(f"{section}.{key}: must be {allowed}, got {value!r}")
            return None
        return value


def _lossfree(c: _Checker) -> Optional[LossFreeConfig]:
    section = c.config.get("lossfree")
    if section is None:
        return None
    if not isinstance(section, Mapping):
        c.problems.append(f"lossfree: must be a mapping of LossFreeConfig fields, got {section!r}")
        return None
    try:
        return LossFreeConfig.from_dict(section)
    except ValueError as exc:  # the message already names lossfree.<field>
        c.problems.append(str(exc))
        return None


def _model_keys(c: _Checker) -> None:
    model = c.section("model")
    known = megatron_fields.model_keys()
    for key in model:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        c.problems.append(
            f"model.{key}: unknown key (not a field of Megatron-Core's TransformerConfig or "
            f"MLATransformerConfig, nor of Megatron-Bridge's GPTModelProvider){hint}"
        )


def _megatron_model(c: _Checker) -> None:
    """Megatron-Core's own rules: the section as its ``TransformerConfig``, one line if refused."""
    model = c.section("model")
    if model:
        problem = transformer_config.check_model_section(model)
        if problem is not None:
            c.problems.append(problem)


def _routing(c: _Checker, lossfree: Optional[LossFreeConfig]) -> dict[str, Any]:
    model = c.section("model")
    experts = c.integer("model", "num_moe_experts", None, optional=True)
    on = lossfree is not None and lossfree.enabled
    info: dict[str, Any] = {"experts": experts}
    if experts is None:
        if on:
            c.refusal(compat.require_moe, model, compat.yaml_key)
        return info
    topk = c.integer("model", "moe_router_topk", 2)
    info["topk"] = topk
    if topk is not None and topk > experts:
        c.problems.append(
            f"model.moe_router_topk: must be <= num_moe_experts ({experts}), got {topk}"
        )
    score = model.get("moe_router_score_function", "softmax")
    info["score"] = score
    c.refusal(check_score_function, score, "model.moe_router_score_function")
    if on:
        c.refusal(compat.refuse_upstream_expert_bias, model, "lossfree.enabled", compat.yaml_key)
        c.refusal(compat.refuse_unsupported_balancing, model, compat.yaml_key)
        warning = compat.aux_loss_warning(model, compat.yaml_key)
        if warning is not None:
            c.warnings.append(warning)
    return info


def _layout(c: _Checker, experts: Optional[int]) -> dict[str, Any]:
    cluster = c.section("cluster")
    if "cluster" not in c.config:
        c.problems.append("cluster: required section (nodes, gpus_per_node, tasks_per_node) missing")
        return {}
    nodes = c.integer("cluster", "nodes")
    gpus = c.integer("cluster", "gpus_per_node", minimum=0)
    tasks = tasks_per_node(cluster)
    if tasks is None and gpus == 0:
        c.problems.append("cluster.tasks_per_node: required when gpus_per_node is 0 (CPU processes)")
        tasks = None
    elif isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
        if gpus is not None:
            c.problems.append(f"cluster.tasks_per_node: must be an integer >= 1, got {tasks!r}")
        tasks = None
    elif gpus and tasks > gpus:
        c.problems.append(
            f"cluster.tasks_per_node: must be <= gpus_per_node ({gpus}), one rank per GPU; got {tasks}"
        )
    tp = c.integer("model", "tensor_model_parallel_size", 1)
    pp = c.integer("model", "pipeline_model_parallel_size", 1)
    cp = c.integer("model", "context_parallel_size", 1)
    ep = c.integer("model", "expert_model_parallel_size", 1)
    etp = c.integer("model", "expert_tensor_parallel_size", None, optional=True)
    vpp = c.integer("model", "virtual_pipeline_model_parallel_size", None, optional=True)
    info: dict[str, Any] = dict(nodes=nodes, gpus=gpus, tasks=tasks, tp=tp, pp=pp, cp=cp, ep=ep)
    if etp is None and tp is not None:
        etp = tp  # parallel_state's default
    info["etp"] = etp
    if None in (nodes, tasks, tp, pp, cp, ep, etp):
        return info
    world = nodes * tasks
    info["world"] = world
    model_size = tp * pp * cp
    if world % model_size:
        c.problems.append(
            f"cluster: world size {world} (nodes {nodes} x tasks_per_node {tasks}) is not "
            f"divisible by TP x PP x CP = {tp} x {pp} x {cp} = {model_size}"
        )
        return info
    dp = world // model_size
    info["dp"] = dp
    if world % (etp * ep * pp):
        c.problems.append(
            f"model.expert_model_parallel_size: EP x ETP = {ep} x {etp} must divide "
            f"TP x CP x DP = {tp} x {cp} x {dp} = {tp * cp * dp} (Megatron's expert grid "
            f"ETP x EP x PP must divide the world size {world})"
        )
    else:
        info["edp"] = world // (etp * ep * pp)
    if experts is not None and experts % ep:
        c.problems.append(
            f"model.expert_model_parallel_size: must divide num_moe_experts ({experts}), got {ep}"
        )
    model = c.section("model")
    sp = model.get("sequence_parallel", False)
    if sp is not True and tp > 1 and experts is not None:
        c.problems.append(
            f"model.sequence_parallel: must be true with MoE and tensor_model_parallel_size {tp} "
            "(Megatron-Core's MoELayer refuses to train without it)"
        )
    if vpp is not None and pp == 1:
        c.problems.append(
            "model.virtual_pipeline_model_parallel_size: needs pipeline_model_parallel_size > 1 "
            "(interleaved schedule); set it null"
        )
    layers = c.integer("model", "num_layers")
    # Uneven splits (first/last stage sizes, a layout string, embedding/loss
    # accounting) are TransformerConfig's to check; the even split is ours.
    uneven = any(
        model.get(k) for k in (
            "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
            "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
            "account_for_loss_in_pipeline_split",
        )
    )
    if layers is not None and not uneven and pp > 1 and layers % (pp * (vpp or 1)):
        key = "virtual_pipeline_model_parallel_size" if vpp else "pipeline_model_parallel_size"
        c.problems.append(
            f"model.{key}: num_layers ({layers}) must be divisible by {pp} pipeline stage(s) "
            f"x VPP {vpp or 1} = {pp * (vpp or 1)}"
        )
    c.integer("model", "num_attention_heads")  # divisibility: TransformerConfig's
    seq = c.integer("model", "seq_length", None, optional=True)
    if seq is not None and cp > 1 and seq % (2 * cp):
        c.problems.append(
            f"model.seq_length: must be divisible by 2 x context_parallel_size = {2 * cp} "
            f"(load-balanced context parallelism), got {seq}"
        )
    return info


def _batch(c: _Checker, dp: Optional[int]) -> dict[str, Any]:
    gbs = c.integer("train", "global_batch_size")
    mbs = c.integer("train", "micro_batch_size")
    c.integer("train", "train_iters")
    info = {"gbs": gbs, "mbs": mbs}
    if None in (gbs, mbs, dp):
        return info
    if gbs % (mbs * dp):
        c.problems.append(
            f"train.global_batch_size: must be divisible by micro_batch_size x DP = {mbs} x {dp} "
            f"= {mbs * dp}, got {gbs}"
        )
    else:
        info["microbatches"] = gbs // (mbs * dp)
    return info


def check(config: Mapping[str, Any]) -> tuple[list[str], list[str], dict[str, Any]]:
    """``(problems, warnings, facts)`` for a run-config dict; facts feed ``describe``."""
    c = _Checker(config)
    _model_keys(c)
    _megatron_model(c)
    lossfree = _lossfree(c)
    facts: dict[str, Any] = {"lossfree": lossfree}
    facts.update(_routing(c, lossfree))
    facts.update(_layout(c, facts.get("experts")))
    facts.update(_batch(c, facts.get("dp")))
    return c.problems, c.warnings, facts


def find_problems(config: Mapping[str, Any]) -> list[str]:
    """Every problem as ``"<key>: <problem>"``; empty when the config is valid."""
    return check(config)[0]


def describe(config: Mapping[str, Any], facts: Optional[dict[str, Any]] = None) -> str:
    """One paragraph: the layout, experts per rank, batch split and balancing."""
    f = facts if facts is not None else check(config)[2]
    device = "GPUs" if f.get("gpus") else "CPU processes (gloo)"
    parts = [
        f"{f['world']} ranks = {f['nodes']} node(s) x {f['tasks']} {device}",
        f"TP {f['tp']} x PP {f['pp']} x CP {f['cp']} x DP {f['dp']}",
    ]
    vpp = (config.get("model") or {}).get("virtual_pipeline_model_parallel_size")
    if vpp:
        parts.append(f"{vpp} virtual pipeline stages per rank")
    if f.get("experts"):
        parts.append(
            f"experts: {f['experts']} routed, EP {f['ep']} x ETP {f['etp']} (expert DP "
            f"{f.get('edp')}), {f['experts'] // f['ep']} per rank, top-{f['topk']} {f['score']}"
        )
    if f.get("microbatches") is not None:
        parts.append(
            f"global batch {f['gbs']} = {f['microbatches']} micro-batch(es) of {f['mbs']} "
            f"x DP {f['dp']}"
        )
    lf = f.get("lossfree")
    if lf is not None and lf.enabled:
        parts.append(
            f"loss-free balancing on (rule {lf.update_rule}, u = {lf.update_rate:g}, schedule "
            f"{lf.schedule}, center {str(lf.center).lower()})"
        )
    else:
        parts.append("loss-free balancing off")
    return "; ".join(parts) + "."

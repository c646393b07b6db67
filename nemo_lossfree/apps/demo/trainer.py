"""One arm of the demo: build, train, evaluate, with Megatron-Core's own machinery.

Megatron-Core pieces, as a Megatron-LM run uses them:
- ``DistributedDataParallel`` (gradient buffers, all-reduce over data parallel),
- ``get_forward_backward_func()`` over micro-batches, which calls
  ``config.finalize_model_grads_func`` after the last backward: Megatron's
  ``finalize_model_grads`` (which also updates the built-in expert bias of the
  ``megatron_bias`` arm) wrapped by ``LossFreeBalancer.attach`` for ``loss_free``,
- ``get_megatron_optimizer`` (Adam) and ``OptimizerParamScheduler``.

Call ``cpu.init_distributed`` before building an ``ArmTrainer``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from nemo_lossfree.apps.demo.arms import ARMS
from nemo_lossfree.apps.demo.corpus import Corpus, MicroBatch, TrainData, validation_batches
from nemo_lossfree.apps.demo.settings import DemoSettings
from nemo_lossfree.integrations.cpu import cuda_allocations_on_cpu

MAXVIO_TARGET = 0.2


@dataclass
class StepRecord:
    step: int  # 1-based: steps done after this one
    loss: float
    maxvio_batch: float
    metrics: dict[str, float] = field(default_factory=dict)


def _loss_func(output_tensor: torch.Tensor):
    loss = output_tensor.float().mean()
    # clone: the schedule divides the returned loss in place by the micro-batch count.
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator: Iterator[MicroBatch], model):
    """Megatron's forward_step_func contract: (output, loss_func)."""
    batch = next(data_iterator)
    output = model(batch.tokens, batch.position_ids, None, labels=batch.labels)
    return output, _loss_func


class ArmTrainer:
    """Model, optimizer, balancer and data of one arm on this rank."""

    def __init__(self, arm_name: str, settings: DemoSettings, corpus: Corpus) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from nemo_lossfree.apps.demo import model as demo_model
        from nemo_lossfree.gpt import gpt_model

        self.arm = ARMS[arm_name]
        self.settings = settings
        s = settings
        # Same initial weights for every arm: reseed before building.
        torch.manual_seed(s.seed)
        model_parallel_cuda_manual_seed(s.seed)
        self.config = demo_model.transformer_config(
            s, self.arm.config_fields, parallel_state.get_expert_model_parallel_world_size()
        )
        spec = demo_model.layer_spec(s, self.config, loss_free=self.arm.loss_free)
        model = gpt_model(self.config, spec, vocab_size=corpus.vocab_size, max_sequence_length=s.seq_length)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
        self.model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=model)
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model.no_sync

        self.balancer = None
        if self.arm.loss_free:
            from nemo_lossfree.balancer import LossFreeBalancer

            self.balancer = LossFreeBalancer(self.model, s.lossfree_config).attach(self.config)

        # clip_grad 0: Megatron's clipping asserts torch.cuda.FloatTensor grads.
        opt_config = OptimizerConfig(
            optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=0.01,
            adam_beta1=0.9, adam_beta2=0.95, clip_grad=0.0, bf16=False, fp16=False,
            params_dtype=torch.float32, use_distributed_optimizer=False,
        )
        with cuda_allocations_on_cpu():
            # No gloo side groups: cpu.init_distributed does not create them (gloo is the main backend).
            self.optimizer = get_megatron_optimizer(
                opt_config, [self.model], use_gloo_process_groups=False
            )
        decay = s.lr_decay_steps or s.steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr,
            lr_warmup_steps=s.lr_warmup_steps, lr_decay_steps=max(decay, s.lr_warmup_steps + 1),
            lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
            wd_incr_steps=max(decay, 1), wd_incr_style="constant",
        )

        self.dp_group = parallel_state.get_data_parallel_group()
        self.train_data = TrainData(
            corpus.train_tokens, seq_length=s.seq_length, micro_batch_size=s.micro_batch_size,
            num_micro_batches=s.num_micro_batches, dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(), seed=s.seed,
        )
        self.val_batches = validation_batches(
            corpus.val_tokens, seq_length=s.seq_length, micro_batch_size=s.val_micro_batch_size,
            num_windows=s.val_windows, dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
        )
        from megatron.core.transformer.moe.router import TopKRouter

        self.routers = [m for m in self.model.modules() if isinstance(m, TopKRouter)]
        # The routers' replica group (TP x DP x CP), as the balancer uses.
        self.router_group = self.routers[0].tp_dp_cp_group
        from nemo_lossfree.metrics import expert_ranks

        ep_size = parallel_state.get_expert_model_parallel_world_size()
        self.placement = expert_ranks(s.experts, ep_size) if ep_size > 1 else None
        self.step = 0
        self.history: list[StepRecord] = []
        #: ``(layer numbers, [E] counts)`` of the last step, for the load heatmap.
        self.last_loads: Optional[tuple[list[int], list[torch.Tensor]]] = None

    # ------------------------------------------------------------- training
    def _layer_ids(self) -> list[int]:
        return [r.layer_number if r.layer_number is not None else i for i, r in enumerate(self.routers)]

    @staticmethod
    def _bias(router) -> Optional[torch.Tensor]:
        """The router's selection bias in this project's sign (added to the scores), if any.

        Megatron-Core's quantile balancing selects on ``logits - qb_beta``.
        """
        if getattr(router, "expert_bias", None) is not None:
            return router.expert_bias
        if getattr(router, "qb_beta", None) is not None:
            return -router.qb_beta
        return None

    def _bias_metrics(self) -> dict[str, float]:
        from nemo_lossfree import metrics as lf_metrics

        return lf_metrics.bias_summary([b for b in map(self._bias, self.routers) if b is not None])

    def train_step(self, recorder) -> StepRecord:
        """One global batch: forward/backward over the micro-batches, finalize, optimizer step."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_lossfree import metrics as lf_metrics

        s = self.settings
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self.train_data.step(self.step)
        # The biases that route this step (upstream arms update theirs inside the step).
        biases = None
        if self.balancer is None and all(self._bias(r) is not None for r in self.routers):
            biases = [self._bias(r).detach().clone() for r in self.routers]
        # No CudaAllocationsOnCpu mode here: cpu.enable() already maps the
        # schedule's and optimizer's device="cuda" allocations, and the mode
        # would hook every torch call of the step for nothing.
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[self.model],
            num_microbatches=len(batches),
            seq_length=s.seq_length,
            micro_batch_size=s.micro_batch_size,
            forward_only=False,
        )
        update_ok, _, _ = self.optimizer.step()
        if not update_ok:
            raise FloatingPointError(f"{self.arm.name}: optimizer step skipped at step {self.step}")
        self.scheduler.step(increment=1)
        loss = torch.stack([d["lm loss"] for d in losses]).mean().reshape(1)
        dist.all_reduce(loss, group=self.dp_group)
        loss_value = loss.item() / dist.get_world_size(self.dp_group)

        metrics: dict[str, float] = {}
        if self.balancer is not None:
            metrics.update(self.balancer.last_metrics)
            self.last_loads = self.balancer.last_loads
        else:
            # Upstream routers: count what they routed (forward hooks), over all replicas,
            # and measure it with the same metrics as the balancer's (no router health).
            counts = list(recorder.counts(self.router_group))
            recorder.reset()
            layer_ids = self._layer_ids()
            metrics.update(lf_metrics.step_metrics(layer_ids, counts, placements=[self.placement] * len(counts),
                                                   biases=biases))
            metrics.update(self._bias_metrics())
            self.last_loads = (layer_ids, counts)
        if recorder is not None and self.balancer is not None:
            recorder.reset()
        metrics["loss"] = loss_value
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.step += 1
        record = StepRecord(self.step, loss_value, metrics[lf_metrics.tag("maxvio_batch")], metrics)
        self.history.append(record)
        return record

    def training_recorder(self):
        """Forward hooks counting the upstream routers' loads (None for loss_free)."""
        from nemo_lossfree.metrics import RouterLoadRecorder

        if self.balancer is not None:
            return None
        return RouterLoadRecorder(self.model)

    # ----------------------------------------------------------- evaluation
    @torch.no_grad()
    def forward_only(self, batches: list[MicroBatch], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """One forward pass over ``batches`` in eval mode, no gradients; the schedule's loss dict per micro-batch.

        Forward hooks on the routers (load counters, score recorders) see every
        micro-batch; the balancer counts nothing (no backward). Train mode is
        restored afterwards, also when the pass fails.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model.eval()
        try:
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(batches),
                model=[self.model],
                num_microbatches=len(batches),
                seq_length=self.settings.seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=True,
            )
        finally:
            self.model.train()

    @torch.no_grad()
    def evaluate(self) -> dict[str, object]:
        """Validation loss and MaxVio_global over the held-out split, all ranks."""
        from nemo_lossfree.metrics import RouterLoadRecorder, max_violation

        with RouterLoadRecorder(self.model) as recorder:
            losses = self.forward_only(self.val_batches, self.settings.val_micro_batch_size)
        # Weighted by windows: the last micro-batch may be smaller than the rest.
        windows = torch.tensor([b.tokens.shape[0] for b in self.val_batches], dtype=torch.float64)
        per_batch = torch.stack([d["lm loss"] for d in losses]).double()
        loss = ((per_batch * windows).sum() / windows.sum()).reshape(1)
        dist.all_reduce(loss, group=self.dp_group)
        val_loss = loss.item() / dist.get_world_size(self.dp_group)
        counts_LE = recorder.counts(self.router_group)
        vio_L = max_violation(counts_LE).tolist()
        return {
            "val_loss": val_loss,
            "val_ppl": math.exp(val_loss),
            "maxvio_global": sum(vio_L) / len(vio_L),
            "maxvio_global_per_layer": vio_L,
        }

    def final_biases(self) -> Optional[list[list[float]]]:
        biases = [self._bias(r) for r in self.routers]
        if any(b is None for b in biases):
            return None
        return [b.float().tolist() for b in biases]


def steps_to_below(history: list[StepRecord], threshold: float = MAXVIO_TARGET) -> Optional[int]:
    for record in history:
        if record.maxvio_batch < threshold:
            return record.step
    return None


def run_arm(trainer: ArmTrainer, *, stop_requested: Callable[[], bool],
            on_step: Callable[[StepRecord], None], save: Optional[Callable[[], None]] = None,
            save_interval: Optional[int] = None, exit_after_steps: Optional[int] = None) -> bool:
    """Train until ``settings.steps``; returns False when stopped early (after saving).

    ``stop_requested`` is polled after every step (all ranks agree on it);
    ``save`` runs at the interval, on a stop, and at the end.
    """
    recorder = trainer.training_recorder()
    if recorder is not None:
        recorder.__enter__()
    try:
        while trainer.step < trainer.settings.steps:
            record = trainer.train_step(recorder)
            on_step(record)
            stop = stop_requested() or (
                exit_after_steps is not None and trainer.step >= exit_after_steps
            )
            if save is not None and (
                stop
                or trainer.step == trainer.settings.steps
                or (save_interval and trainer.step % save_interval == 0)
            ):
                save()
            if stop and trainer.step < trainer.settings.steps:
                return False
    finally:
        if recorder is not None:
            recorder.__exit__(None, None, None)
    return True


def now() -> float:
    return time.perf_counter()

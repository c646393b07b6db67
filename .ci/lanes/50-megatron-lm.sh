#!/usr/bin/env bash
# Megatron-LM's training loop lane: examples/pretrain_gpt_lossfree.py through
# `megatron.training.pretrain` (the megatron-core wheel's), Megatron's mock GPT
# dataset, 2 CPU ranks with gloo and expert parallelism 2, a run stopped after
# iteration 2 of 3 and resumed from its torch_dist checkpoint. Checks the
# lossfree/... scalars in TensorBoard and the balancer's step and biases after
# the resume (tests/_support/megatron_lm_lane/lane_checks.py; docs/megatron_lm.md).
# Needs only .venv (built by `make test`). Four Megatron-LM start-ups: 1m45s of
# CPU; wall time depends on the machine's load (`time bash .ci/lanes/50-megatron-lm.sh`).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
  tests/_support/megatron_lm_lane/lane_checks.py
echo "megatron-lm lane: done in $((SECONDS - start))s"

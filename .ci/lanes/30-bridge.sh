#!/usr/bin/env bash
# Megatron-Bridge lane: the `lossfree` config flag with the real megatron-bridge
# 0.6.2 (NeMo framework path). Builds its own venv on top of the project's .venv
# (torch and megatron-core come from there through a .pth; the Bridge packages
# are pinned in tests/_support/bridge_lane/requirements-bridge-lane.txt), then runs
# tests/_support/bridge_lane/lane_checks.py through the stand-in runner: the flag puts
# LossFreeRouter into a recipe's model (and takes over a recipe's own expert
# bias), every configs/*.yaml merges onto its real recipe and passes Bridge's
# validation, configs/tiny-cpu.yaml trains 4 steps on 2 CPU processes through
# Bridge's own pretrain() with the bias moving, a second process resumes it
# from Bridge's own step-2 checkpoint to the same bits at step 4, and a tiny
# DeepSeek-V3 model exported to Hugging Face picks the same experts in transformers.
# Transformer Engine / nvidia-resiliency-ext are import stand-ins (no CPU wheel /
# broken import); see tests/_support/bridge_lane/import_stand_ins.py and bridge_on_cpu.py.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
source .ci/lib/lane_venv.sh
LANE_VENV=${BRIDGE_LANE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nemo-lossfree/venv-bridge}
lane_venv "$LANE_VENV" tests/_support/bridge_lane/requirements-bridge-lane.txt
echo "bridge lane: venv ready (t=$((SECONDS - start))s)"
"$LANE_VENV/bin/python" tests/_support/bridge_lane/run_with_stand_ins.py -m pytest -q -p no:cacheprovider \
  -o addopts="" tests/_support/bridge_lane/lane_checks.py
echo "bridge lane: done in $((SECONDS - start))s"

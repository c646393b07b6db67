#!/usr/bin/env bash
# Apply the series to megatron-core 0.19.2's released sources and test it:
#   1. checkout.sh: the wheel's `megatron/` tree in a fresh git repo, `git am` every patch;
#   2. the series' own unit tests (tests/unit_tests/... in the patched tree), on the CPU,
#      through the harness in harness/ (CPU shim, gloo stand-in for Megatron-LM's Utils);
#   3. lossfree_equivalence.py: the plugin on the pristine megatron-core vs the patched
#      tree with upstream flags only; the biases must be bit-identical;
#   4. smoke_train.py: loss-free training on the patched tree through Megatron-Core's DDP,
#      schedule and finalize_model_grads, upstream flags only.
# The patched tree runs from PYTHONPATH, ahead of the venv's site-packages (which keep
# the pristine megatron-core for the plugin side).
#
#   patches/tools/check.sh [--keep]        PY=<python> (default .venv/bin/python)
set -euo pipefail
CHECK_NAME=patches-check
. "$(dirname "$0")/check_common.sh"
tree="$work/megatron-core"

step "apply the series to the megatron-core wheel's sources"
SERIES=megatron-core PYTHON="$py" "$here/checkout.sh" "$tree"
git -C "$tree" log --oneline base..HEAD

step "the series' unit tests (CPU)"
# Harness files only where the tree has none (a Megatron-LM checkout has its own).
(cd "$here/harness" && find . -type f -name '*.py' | while read -r f; do
  [ -e "$tree/$f" ] || install -D -m 644 "$f" "$tree/$f"; done)
(cd "$tree" && PYTHONPATH="$tree" "$py" -m pytest -q -p no:cacheprovider tests/unit_tests)

step "equivalence with the plugin: plugin on pristine megatron-core"
(cd "$work" && "$py" "$here/lossfree_equivalence.py" run --side plugin --out "$work/plugin.pt")
step "equivalence with the plugin: patched megatron-core, upstream flags only"
(cd "$work" && PYTHONPATH="$tree" "$py" "$here/lossfree_equivalence.py" run --side patched --out "$work/patched.pt")
"$py" "$here/lossfree_equivalence.py" compare "$work/plugin.pt" "$work/patched.pt"

step "loss-free training smoke test on the patched tree"
(cd "$work" && PYTHONPATH="$tree" "$py" "$here/smoke_train.py")

step "done"

#!/usr/bin/env bash
# Megatron-Core versions lane: the plugin on the older megatron-core minors it
# supports (requirements/mcore-versions.txt: 0.16, 0.17, 0.18; 0.19 is
# `make test`'s own). CI runs the oldest and the newest every time (CI's
# 45-minute budget): the oldest here with the single-process router, balancer,
# quantile, spec, recompute and compatibility tests and the multi-rank tests
# (gloo: expert parallel, TP x EP, MTP, pipeline groups, dist_checkpointing),
# the newest through `make test`. The minors in between get the single-process
# tests with MCORE_LANE_VERSIONS=all (about 1 minute each) and the multi-rank
# ones too with MCORE_LANE_MULTI_RANK=all (3.5-5.5 minutes each on 2 shared
# cores); measured with `time bash .ci/lanes/25-mcore-versions.sh`: 7.2
# minutes for all three minors with cached venvs, 5.4 for the oldest alone.
#
# Each minor gets a venv outside the work tree holding only that megatron-core
# wheel; it sees the project venv's other packages (torch, numpy, pytest, ...)
# through a view of its site-packages without Megatron: megatron is a
# namespace package, and the project's 0.19 `megatron.training` would
# otherwise join an older `megatron.core`. Usage:
#   bash .ci/lanes/25-mcore-versions.sh [0.16.1 ...]   (default: the oldest pin;
#   MCORE_LANE_VERSIONS=all: every pin;
#   PYTEST_ARGS="-x -k ..." narrows the run)
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS
VENV=${VENV:-.venv}
PINS=requirements/mcore-versions.txt
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/nemo-lossfree
PROJECT_SITE=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
PY312=$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')
SINGLE_RANK=(tests/test_balancer.py tests/test_megatron_compat.py tests/test_quantile.py
             tests/test_recompute.py tests/test_router.py tests/test_spec.py)
MULTI_RANK=(tests/test_checkpoint.py tests/test_distributed.py)

mapfile -t pinned < <(sed -n 's/^megatron-core==\([0-9.]*\).*/\1/p' "$PINS")
oldest=${pinned[0]}
if [ $# -gt 0 ]; then
  versions=("$@")
elif [ "${MCORE_LANE_VERSIONS:-}" = all ]; then
  versions=("${pinned[@]}")
else
  versions=("$oldest")
fi

for version in "${versions[@]}"; do
  grep -qx "megatron-core==$version" "$PINS" \
    || { echo "25-mcore-versions: $version is not pinned in $PINS" >&2; exit 2; }
  t0=$SECONDS
  lane_venv=$CACHE/venv-mcore-$version
  # Rebuilt when the pin or the project venv (its path or contents) changes.
  stamp=$( (echo "$version $PROJECT_SITE"; ls "$PROJECT_SITE") | sha256sum | cut -c1-16)
  if [ "$(cat "$lane_venv/.installed" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$lane_venv"
    "$PY312" -m venv "$lane_venv"
    view=$lane_venv/project-site
    mkdir "$view"
    for entry in "$PROJECT_SITE"/*; do
      case $(basename "$entry") in megatron|megatron_core-*) continue ;; esac
      ln -s "$entry" "$view/"
    done
    lane_site=$("$lane_venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    # addsitedir appends: the lane's own site-packages (this megatron-core) stay first,
    # and the view's .pth files (the project's editable install) are processed.
    echo "import site; site.addsitedir('$view')" > "$lane_site/_project_venv.pth"
    "$lane_venv/bin/python" -m pip install --quiet --no-deps "megatron-core==$version"
    echo "$stamp" > "$lane_venv/.installed"
  fi
  # This checkout's package (not another checkout's editable install), also in spawned ranks.
  export PYTHONPATH=$PWD
  "$lane_venv/bin/python" - "$version" <<'PY'
# This minor's megatron-core and nothing of the project's (megatron.training ships from 0.17).
import importlib.metadata, importlib.util, site, sys
lane_site = site.getsitepackages()[0]
assert importlib.metadata.version("megatron-core") == sys.argv[1]
for name in ("megatron.core", "megatron.training"):
    spec = importlib.util.find_spec(name)
    assert spec is None or spec.origin.startswith(lane_site + "/"), (name, spec.origin)
PY
  tests=("${SINGLE_RANK[@]}")
  if [ "$version" = "$oldest" ] || [ "${MCORE_LANE_MULTI_RANK:-}" = all ]; then
    tests+=("${MULTI_RANK[@]}")
  fi
  mapfile -t tests < <(printf '%s\n' "${tests[@]}" | sort)  # make test's order
  echo "mcore-versions lane: megatron-core $version, ${#tests[@]} test files (venv ready at $((SECONDS - t0))s)"
  "$lane_venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" "${tests[@]}" ${PYTEST_ARGS:-}
  echo "mcore-versions lane: megatron-core $version done in $((SECONDS - t0))s"
done
echo "mcore-versions lane: done in $((SECONDS - start))s"

#!/usr/bin/env bash
# Apply the Megatron-LM main series and test it, on a developer's machine. CI cannot
# fetch Megatron-LM, so the CI lane (check.sh, .ci/lanes/20-patches.sh) stays on the
# megatron-core 0.19.2 series.
#   1. checkout.sh with SERIES=megatron-lm-main: a clone of MEGATRON_LM at BASE_COMMIT
#      with every patch `git am`ed (the patched tree), and a worktree at `base` (the
#      pristine tree);
#   2. the series' own unit tests (the test files it adds), on the patched tree;
#   3. upstream's unit tests (UPSTREAM_TESTS) on the pristine and on the patched tree,
#      on the CPU through harness/megatron_lm (CPU shim, gloo, CUDA skips lifted), test
#      files untouched; upstream_test_report.py prints the outcomes and fails if a test
#      that passed without the series does not pass with it;
#   4. lossfree_equivalence.py --series megatron-lm-main: the plugin on the pristine
#      tree against the patched tree with upstream flags only; biases bit-identical;
#   5. smoke_train.py on the patched tree.
#
#   MEGATRON_LM=<Megatron-LM clone or URL> patches/tools/check_main.sh [--keep]
#
# Environment: PY (the project's python, default .venv/bin/python), STEPS (default
# "series upstream equivalence smoke"), UPSTREAM_TESTS (paths in the checkout), RANKS
# (default 1: one process; n > 1 runs the upstream tests under torchrun with n gloo
# processes and reports rank 0's outcomes), TEST_VENV (the venv with the test-only
# packages of requirements-megatron-lm-main.txt on top of PY's site-packages; built
# when missing or stale).
set -euo pipefail
CHECK_NAME=patches-check-main
. "$(dirname "$0")/check_common.sh"
steps="${STEPS:-series upstream equivalence smoke}"
ranks="${RANKS:-1}"
upstream_tests="${UPSTREAM_TESTS:-
  tests/unit_tests/transformer/moe/test_routers.py
  tests/unit_tests/transformer/moe/test_aux_loss.py
  tests/unit_tests/transformer/moe/test_qb_routing.py
  tests/unit_tests/transformer/moe/test_router_replay.py
  tests/unit_tests/transformer/moe/test_router_trace.py
  tests/unit_tests/transformer/moe/test_moe_layer.py
  tests/unit_tests/distributed/test_finalize_model_grads.py
  tests/unit_tests/models/test_hybrid_moe_model.py
  tests/unit_tests/test_argument_utils.py}"

tree="$work/megatron-lm"
pristine="$work/megatron-lm-base"
wants() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

step "the test venv"
test_venv="${TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nemo-lossfree/venv-megatron-lm-main}"
project_site="$("$py" -c 'import site; print(site.getsitepackages()[0])')"
stamp="$( (cat "$here/requirements-megatron-lm-main.txt"; echo "$project_site") | sha256sum | cut -c1-16)"
if [ "$(cat "$test_venv/.installed" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$test_venv"
  "$("$py" -c 'import sys; print(sys._base_executable)')" -m venv "$test_venv"
  test_site="$("$test_venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
  # addsitedir (not a bare path) so that the project's editable install is seen too.
  echo "import site; site.addsitedir('$project_site')" > "$test_site/_project_venv.pth"
  "$test_venv/bin/python" -m pip install --quiet --no-deps -r "$here/requirements-megatron-lm-main.txt"
  echo "$stamp" > "$test_venv/.installed"
fi
tpy="$test_venv/bin/python"

step "apply the series to Megatron-LM at $(cat "$here/../megatron-lm-main/BASE_COMMIT")"
SERIES=megatron-lm-main "$here/checkout.sh" "$tree"
git -C "$tree" log --oneline base..HEAD
git -C "$tree" worktree add --quiet --detach "$pristine" base

# pytest on a tree through the CPU plugin: run_tests TREE JUNIT_XML TEST... (status 1 when
# no report was written: pytest or a rank died).
run_tests() {
  local on="$1" xml="$2"
  shift 2
  local path="$on:$here/harness/megatron_lm:$root"
  local args=(-q -p no:cacheprovider -p megatron_lm_on_cpu -o addopts= -W ignore)
  if [ "$ranks" = 1 ]; then
    (cd "$on" && PYTHONPATH="$path" "$tpy" -m pytest "${args[@]}" --junitxml="$xml" "$@") \
      > "${xml%.xml}.log" 2>&1 || true
  else
    local launcher="$work/rank.sh"
    printf '#!/usr/bin/env bash\nexec "%s" -m pytest "$@" --junitxml="%s.rank$RANK.xml" > "%s.rank$RANK.log" 2>&1\n' \
      "$tpy" "${xml%.xml}" "${xml%.xml}" > "$launcher"
    chmod +x "$launcher"
    (cd "$on" && PYTHONPATH="$path" "$tpy" -m torch.distributed.run --standalone \
      --nproc-per-node "$ranks" --no-python "$launcher" "${args[@]}" "$@") \
      > "${xml%.xml}.log" 2>&1 || true
    if [ -f "${xml%.xml}.rank0.xml" ]; then cp "${xml%.xml}.rank0.xml" "$xml"; fi
  fi
  tail -n 1 "${xml%.xml}.log"
  [ -f "$xml" ] || { echo "check_main.sh: no report in $xml (see ${xml%.xml}.log)" >&2; return 1; }
}

status=0
if wants series; then
  step "the series' own unit tests (CPU)"
  mapfile -t own < <(git -C "$tree" diff --name-only --diff-filter=A base..HEAD -- 'tests/*.py')
  if run_tests "$tree" "$work/series.xml" "${own[@]}"; then
    "$py" "$here/upstream_test_report.py" "$work/series.xml" --reasons | tee "$work/series.txt"
    grep -q '| \*\*total\*\* | \*\*[0-9]* / 0 / 0 / 0\*\* |' "$work/series.txt" || status=1
  else
    status=1
  fi
fi

if wants upstream; then
  # shellcheck disable=SC2086  # one path per word
  step "upstream's tests without the series (CPU, $ranks process(es))"
  run_tests "$pristine" "$work/pristine.xml" $upstream_tests || status=1
  # shellcheck disable=SC2086
  step "upstream's tests with the series (CPU, $ranks process(es))"
  run_tests "$tree" "$work/patched.xml" $upstream_tests || status=1
  if [ -f "$work/pristine.xml" ] && [ -f "$work/patched.xml" ]; then
    "$py" "$here/upstream_test_report.py" "$work/pristine.xml" "$work/patched.xml" --reasons \
      || status=1
  fi
fi

if wants equivalence; then
  step "equivalence with the plugin: plugin on pristine Megatron-LM main"
  (cd "$work" && PYTHONPATH="$pristine:$root" "$py" "$here/lossfree_equivalence.py" run \
    --side plugin --series megatron-lm-main --out "$work/plugin.pt")
  step "equivalence with the plugin: patched Megatron-LM main, upstream flags only"
  (cd "$work" && PYTHONPATH="$tree:$root" "$py" "$here/lossfree_equivalence.py" run \
    --side patched --series megatron-lm-main --out "$work/patched.pt")
  "$py" "$here/lossfree_equivalence.py" compare "$work/plugin.pt" "$work/patched.pt" || status=1
fi

if wants smoke; then
  step "loss-free training smoke test on the patched tree"
  (cd "$work" && PYTHONPATH="$tree:$root" "$py" "$here/smoke_train.py") || status=1
fi

step "done (status $status)"
exit "$status"

# Sourced by check.sh and check_main.sh (one copy of their set-up); CHECK_NAME names the check.
# Sets here (tools/), root (the repository), py (an absolute interpreter path; PY, default
# .venv/bin/python), keep (1 with --keep as the script's first argument), work (a fresh
# directory, removed on exit unless kept) and step (a timed progress line).
here="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
py="${PY:-$root/.venv/bin/python}"
# The steps change directory: make a relative interpreter path absolute.
case "$py" in /*) ;; */*) py="$PWD/$py" ;; esac
keep=0
[ "${1:-}" = "--keep" ] && keep=1

work="$(mktemp -d "${TMPDIR:-/tmp}/$CHECK_NAME.XXXXXX")"
cleanup() { if [ "$keep" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
start=$SECONDS
step() { echo "--- $CHECK_NAME: $* (t=$((SECONDS - start))s)"; }

# Tiny models: one BLAS thread per process is fastest on a shared machine.
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore

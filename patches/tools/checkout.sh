#!/usr/bin/env bash
# Unpack megatron-core's released sources into a git repository whose first
# commit is the pristine `megatron/` tree (tagged `base`), then `git am` the
# series onto branch `lossfree`. This is the working copy that export.sh
# turns back into patches and that check.sh tests.
#
#   patches/tools/checkout.sh DIR [--no-am]
#
# Environment: MCORE_VERSION (default 0.19.2), PYTHON (default python3), PIP (a pip
# command; default `$PYTHON -m pip`), MCORE_WHEEL (a wheel on disk: skips the download).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
series="$here/../megatron-core"
dir="${1:?usage: checkout.sh DIR [--no-am]}"
apply=1
[ "${2:-}" = "--no-am" ] && apply=0
version="${MCORE_VERSION:-0.19.2}"
python="${PYTHON:-python3}"
pip="${PIP:-$python -m pip}"

[ -e "$dir" ] && { echo "checkout.sh: $dir exists; remove it or pick another" >&2; exit 2; }
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

wheel="${MCORE_WHEEL:-}"
if [ -z "$wheel" ]; then
  dl="$(mktemp -d)"
  trap 'rm -rf "$dl"' EXIT
  $pip download --quiet --no-deps --only-binary=:all: --dest "$dl" "megatron-core==$version"
  wheel="$(ls "$dl"/megatron_core-"$version"-*.whl)"
fi

# Only `megatron/`: the wheel's metadata is not part of the sources.
"$python" - "$wheel" "$dir" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    members = [m for m in wheel.namelist() if m.startswith("megatron/")]
    wheel.extractall(sys.argv[2], members)
PY

# Fixed identity and dates: the same wheel gives the same base commit anywhere.
export GIT_AUTHOR_NAME="megatron-core $version wheel" GIT_AUTHOR_EMAIL="wheel@megatron-core.invalid"
export GIT_COMMITTER_NAME="$GIT_AUTHOR_NAME" GIT_COMMITTER_EMAIL="$GIT_AUTHOR_EMAIL"
export GIT_AUTHOR_DATE="2000-01-01T00:00:00Z" GIT_COMMITTER_DATE="2000-01-01T00:00:00Z"
git -C "$dir" init --quiet --initial-branch=lossfree
git -C "$dir" config core.autocrlf false
git -C "$dir" add megatron
git -C "$dir" commit --quiet -m "megatron-core $version (megatron/ tree of the released wheel)"
git -C "$dir" tag base
unset GIT_AUTHOR_NAME GIT_AUTHOR_EMAIL GIT_COMMITTER_NAME GIT_COMMITTER_EMAIL GIT_AUTHOR_DATE GIT_COMMITTER_DATE

if [ "$apply" = 1 ]; then
  shopt -s nullglob
  patches=("$series"/*.patch)
  if [ "${#patches[@]}" -gt 0 ]; then
    # Committer = author: `git am` needs an identity on a fresh machine.
    git -C "$dir" -c user.name="patch check" -c user.email="check@megatron-core.invalid" \
      am --quiet --whitespace=error-all "${patches[@]}"
  fi
  echo "checkout.sh: $dir at $(git -C "$dir" rev-parse --short HEAD), ${#patches[@]} patch(es) on base"
fi

#!/usr/bin/env bash
# A git working copy of a series' base with the series applied: its first commit
# (tagged `base`) is the pristine upstream tree, branch `lossfree` carries one commit
# per patch. This is the working copy that export.sh turns back into patches and
# that check.sh / check_main.sh test.
#
#   patches/tools/checkout.sh DIR [--no-am]
#
# SERIES selects the series (a directory next to tools/):
#   megatron-core (default)  the megatron-core 0.19.2 wheel's `megatron/` tree, unpacked
#                            into a new repository. Environment: MCORE_VERSION (default
#                            0.19.2), PYTHON (default python3), PIP (a pip command;
#                            default `$PYTHON -m pip`), MCORE_WHEEL (a wheel on disk:
#                            skips the download).
#   megatron-lm-main         a clone of Megatron-LM at the commit in
#                            megatron-lm-main/BASE_COMMIT. Environment: MEGATRON_LM (a
#                            Megatron-LM repository to clone from, a path or a URL;
#                            default https://github.com/NVIDIA/Megatron-LM.git).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
name="${SERIES:-megatron-core}"
series="$here/../$name"
dir="${1:?usage: checkout.sh DIR [--no-am]}"
apply=1
[ "${2:-}" = "--no-am" ] && apply=0

[ -d "$series" ] || { echo "checkout.sh: SERIES=$name: no such series ($series)" >&2; exit 2; }
[ -e "$dir" ] && { echo "checkout.sh: $dir exists; remove it or pick another" >&2; exit 2; }

case "$name" in
megatron-core)
  version="${MCORE_VERSION:-0.19.2}"
  python="${PYTHON:-python3}"
  pip="${PIP:-$python -m pip}"
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
  ;;
megatron-lm-main)
  source="${MEGATRON_LM:-https://github.com/NVIDIA/Megatron-LM.git}"
  base="$(tr -d '[:space:]' < "$series/BASE_COMMIT")"
  # A local repository is cloned with hard links (seconds); a URL needs the network.
  git clone --quiet --no-checkout "$source" "$dir"
  dir="$(cd "$dir" && pwd)"
  git -C "$dir" cat-file -e "$base^{commit}" 2>/dev/null \
    || { echo "checkout.sh: $source has no commit $base (BASE_COMMIT); fetch it first" >&2; exit 2; }
  git -C "$dir" config core.autocrlf false
  git -C "$dir" checkout --quiet -B lossfree "$base"
  git -C "$dir" tag base
  ;;
*)
  echo "checkout.sh: SERIES=$name: no recipe for its base tree" >&2
  exit 2
  ;;
esac

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

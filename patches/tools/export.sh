#!/usr/bin/env bash
# Regenerate patches/$SERIES/*.patch from a branch of a working copy made by
# checkout.sh (with the same SERIES): one patch per commit between `base` and the
# branch. This is the only way the .patch files are produced; never edit them by hand.
#
#   patches/tools/export.sh DIR [BRANCH]      (BRANCH defaults to lossfree)
#
# SERIES: megatron-core (default) or megatron-lm-main, as for checkout.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(cd "$here/.." && pwd)/${SERIES:-megatron-core}"
[ -d "$out" ] || { echo "export.sh: SERIES=${SERIES:-}: no such series ($out)" >&2; exit 2; }
dir="${1:?usage: export.sh DIR [BRANCH]}"
branch="${2:-lossfree}"

git -C "$dir" rev-parse --verify --quiet base >/dev/null \
  || { echo "export.sh: $dir has no 'base' tag; create it with checkout.sh" >&2; exit 2; }
count="$(git -C "$dir" rev-list --count "base..$branch")"
[ "$count" -gt 0 ] || { echo "export.sh: no commits between base and $branch" >&2; exit 2; }

rm -f "$out"/*.patch
mkdir -p "$out"
# --zero-commit and --no-signature: the files change only when the code or a
# commit message does, not with the local commit ids or git version.
git -C "$dir" format-patch --quiet --zero-commit --no-signature --abbrev=12 \
  --output-directory "$out" "base..$branch"
ls "$out"/*.patch

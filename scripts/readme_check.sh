#!/usr/bin/env bash
# Runs the README's commands, in order, the way a new user would: a fresh clone of the
# committed HEAD, the install line, `make quickstart`, then every line of the README's
# "Using it" block (between the readme-check markers) with the virtualenv activated.
# Heavy (installs everything, ~15 min on 2 cores): `make readme-check`, not part of
# `make test`. Each command's exit code and wall time is printed; the first failure stops it.
#
#   bash scripts/readme_check.sh [WORKDIR]     # default: a new temporary directory
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d /tmp/jaxtune-readme.XXXXXX)}"
clone="$work/jaxtune"
git clone -q "$repo" "$clone"
cd "$clone"
echo "fresh clone of $(git rev-parse --short HEAD) in $clone"

step() {
    local t0=$SECONDS
    echo "\$ $*"
    if bash -c "$*" >"$work/step.log" 2>&1; then
        tail -n 3 "$work/step.log" | sed 's/^/    /'
        echo "    ok ($((SECONDS - t0)) s)"
    else
        local rc=$?
        tail -n 30 "$work/step.log" | sed 's/^/    /'
        echo "    FAILED with exit code $rc ($((SECONDS - t0)) s)"
        exit "$rc"
    fi
}

# The install and main-job lines of "The two commands", then activation as the README says.
step make quickstart
# shellcheck disable=SC1091
source .venv/bin/activate
# Every command of the "Using it" block, in order (continuation lines joined).
commands="$(
    awk '/<!-- readme-check: start -->/{on=1; next} /<!-- readme-check: end -->/{on=0}
         on && !/^```/' README.md | sed -e ':a' -e '/\\$/N; s/\\\n[[:space:]]*/ /; ta'
)"
[ -n "$commands" ] || { echo "no readme-check block in README.md"; exit 1; }
while IFS= read -r line; do
    line="${line%%#*}"  # the README's trailing comments
    [ -n "${line// }" ] && step "$line"
done <<<"$commands"
echo "all README commands passed"

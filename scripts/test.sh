#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/test_tools.sh
# the code's form first: formatted and lint-clean (ruff's default rules at the pinned version)
.venv/bin/ruff format --check --quiet src tests bench
.venv/bin/ruff check --quiet src tests bench
exec .venv/bin/python -m pytest -q --durations=15 "$@"

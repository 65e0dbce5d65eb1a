#!/bin/bash
# Install everything and run the whole test suite: lint, types, and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
echo "== ruff"
.venv/bin/ruff check unionfs tests benchmarks
.venv/bin/ruff format --check unionfs tests benchmarks
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"

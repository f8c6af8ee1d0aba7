#!/usr/bin/env bash
# Sets up .venv if missing and runs the test suite (CPU; tiny models built in the tests; no network).
source "$(dirname "$0")/_env.sh"
python -m pytest -q -m "not gpu" "$@"

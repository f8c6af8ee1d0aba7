# Sourced by quickstart.sh and test.sh: creates .venv on first use and installs titlegen with its dependencies.
# torch is pinned here (not in pyproject) so that pip takes the CPU build already on disk instead of pulling
# several GB of CUDA wheels; on a GPU machine install torch first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
stamp=".venv/.titlegen-installed"
want="$(cat pyproject.toml scripts/_env.sh | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing titlegen and its dependencies into .venv (once)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" -e ".[test,quickstart]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import titlegen, lightning, peft, bitsandbytes, transformers, datasets" \
    || { echo "install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"

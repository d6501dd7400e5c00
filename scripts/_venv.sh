# Sourced by the set-up scripts: a .venv with the CPU build of PyTorch installed first
# (a plain `pip install torch` would pull a multi-GB CUDA build).
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0" \
    || .venv/bin/pip install -q "torch>=2.2" --index-url https://download.pytorch.org/whl/cpu
fi

#!/usr/bin/env bash
# Install PyTorch into $PYTHON when it is missing, and say where it came from.
#
# With an NVIDIA GPU (nvidia-smi on the PATH): the default build from the default index. Elsewhere the CPU build
# (a few hundred MB instead of several GB) from PyTorch's CPU index, tried ONCE with a short timeout and no
# retries; where that index cannot be reached, torch from the default index (pip's own configuration) at once,
# instead of pip's minutes of retry warnings.
#   PYTHON           the interpreter to install into (default python3)
#   TORCH            the requirement (default torch)
#   TORCH_CPU_INDEX  PyTorch's CPU index (default https://download.pytorch.org/whl/cpu)
#   TORCH_TIMEOUT    seconds for the one try of that index (default 10)
set -u
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch}
INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
TIMEOUT=${TORCH_TIMEOUT:-10}

if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "torch: already installed ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  echo "torch: an NVIDIA GPU is present: installing $TORCH (the CUDA build) from the default index"
  exec "$PYTHON" -m pip install $TORCH
fi
# One try of the CPU index, no retries: a reachable index answers in well under a second.
if "$PYTHON" - "$INDEX" "$TIMEOUT" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=float(sys.argv[2])).close()
PY
then
  echo "torch: installing $TORCH (the CPU build) from PyTorch's CPU index $INDEX"
  if "$PYTHON" -m pip install --index-url "$INDEX" --retries 0 --timeout "$TIMEOUT" $TORCH; then
    echo "torch: installed from PyTorch's CPU index"
    exit 0
  fi
  echo "torch: the install from PyTorch's CPU index failed; falling back to the default index"
else
  echo "torch: PyTorch's CPU index $INDEX cannot be reached (one try, ${TIMEOUT} s, no retries);" \
       "installing $TORCH from the default index instead"
fi
"$PYTHON" -m pip install $TORCH && echo "torch: installed from the default index"

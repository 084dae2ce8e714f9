PYTHON ?= python3
# On a machine without an NVIDIA GPU, take PyTorch's CPU build (a few hundred MB instead of several GB).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo "torch --index-url https://download.pytorch.org/whl/cpu")

.PHONY: install test demo

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[dev]"

test:
	$(PYTHON) -m pytest -q

demo:
	ddpmkit demo

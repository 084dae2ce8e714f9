PYTHON ?= python3
# PyTorch, installed only when missing (tools/install_torch.sh: the CPU build where there is no NVIDIA GPU, from
# PyTorch's CPU index tried once, else from the default index). To choose yourself: make install TORCH="torch==2.5.1"
TORCH ?= torch
DEMO_ARGS ?=
PYTEST_ARGS ?= -q
# `make demo` and `make test` install what is missing first, once per interpreter: this stamp says it is done (and
# is redone when pyproject.toml changes, or for another Python or virtual environment).
STAMP := .make/installed-$(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha256(sys.prefix.encode()).hexdigest()[:12])" 2>/dev/null || echo none)

.PHONY: install test test-fast lint docs demo

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "installing: ddpmkit and what it needs into $$($(PYTHON) -c 'import sys; print(sys.prefix)'), once (marked by $(STAMP))"
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" bash tools/install_torch.sh
	$(PYTHON) -m pip install -e ".[dev]"
	@mkdir -p .make && touch $@

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# the inner loop: the suite without the tests marked slow (pytest.mark.slow)
test-fast: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS) -m "not slow"

# ruff, with the settings in pyproject.toml ([tool.ruff]); installed by `make install` with the dev extra
lint: $(STAMP)
	$(PYTHON) -m ruff check ddpmkit tests bench tools/mkdocs_hooks.py

# the docs site, into site/: MkDocs with the Material theme from README.md and docs/, the API reference from the
# docstrings (mkdocs.yml, tools/mkdocs_hooks.py); --strict: a broken link, anchor or reference fails it
docs: $(STAMP)
	$(PYTHON) -m mkdocs build --strict

demo: $(STAMP)
	$(PYTHON) -m ddpmkit demo $(DEMO_ARGS)

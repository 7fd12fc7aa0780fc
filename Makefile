# The two set-up-and-run commands of the README. Each installs what it needs first, into .venv:
# torch before the rest (a torch already in the venv is kept; GPU users may pre-install their
# CUDA build or pass TORCH_SPEC), then raylm itself with its dev extra.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.raylm-installed

.PHONY: install demo test bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/raylm demo $(ARGS)

# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python bench/prepare.py && $(BIN)/python bench/train.py --peer && $(BIN)/python bench/serve.py

clean-venv:
	rm -rf $(VENV)

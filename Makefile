# The two set-up commands of README.md. PYTHON may point at a virtualenv's interpreter.
PYTHON ?= python3

.PHONY: demo test install install-test

# torch is pinned first: vLLM 0.32.0 pins exactly torch 2.13.0, and an unpinned torch pulls the
# newest CUDA build (gigabytes) where pip can find no local build.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e .

# vLLM's PyPI wheel drags in CUDA builds of torchvision/torchaudio/torchcodec; with the CPU torch
# they break `import transformers`, and text models never need them, so they are removed.
install-test:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[serve,test]"
	$(PYTHON) -m pip uninstall -y torchvision torchaudio torchcodec
	bash scripts/install_chart_tools.sh

# `python -m converters` (the `latentkv` command), not the script: PYTHON may be a virtualenv that is not activated.
demo: install
	$(PYTHON) -m converters demo

test: install-test
	$(PYTHON) -m pytest

# langchain-localllms — `make demo` and `make test` are all a new user needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export LOCALLLMS_CACHE ?= $(HOME)/.cache/langchain-localllms
# llama-cpp-python compiles from source; the multimodal part is not used here.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
KIT_MODELS := gemma-gguf gemma-hf gemma-ct2 gemma-ct2-int8 gemma-ov gemma-ov-int8 tiny-hf tiny-gguf tiny-ct2 tiny-ov tiny-chat-hf tiny-chat-gguf
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: help install openvino-env models llama-server schema-suite demo test unit integration bench lint format clean

help: ## Show the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

# llama-cpp-python is not left to pip: pip builds it with -march=native, which on an
# AMX CPU compiles llama.cpp kernels that crash, and its wheel cache ignores compiler
# flags. modelkit.native builds it for this CPU without AMX (cached per CPU) and
# decodes a few tokens in a child process before anything else uses it.
$(VENV)/.installed: pyproject.toml constraints.txt modelkit/native.py
	@echo "== creating $(VENV) and installing (first time: ~10 min, llama-cpp-python compiles)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[ctranslate2,huggingface,gpt4all,classic]" \
		--group test --group lint --group kit
	$(PY) -m modelkit.native llama-cpp-python
	@touch $@

install: $(VENV)/.installed ## Create .venv with every runtime and the test tools

# OpenVINO needs its own environment: optimum-intel 2.2.0 caps transformers (see
# constraints-openvino.txt); its torchvision dependency breaks against torch 2.13.0
# ("operator torchvision::nms does not exist") and nothing here needs it.
OV_VENV ?= .venv-openvino
$(OV_VENV)/.installed: pyproject.toml constraints-openvino.txt
	@echo "== creating $(OV_VENV) (OpenVINO, transformers 5.0.0)"
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install -q --upgrade pip
	$(OV_VENV)/bin/python -m pip install -q -c constraints-openvino.txt -e ".[openvino,classic]" --group test
	$(OV_VENV)/bin/python -m pip uninstall -q -y torchvision
	@touch $@

openvino-env: $(OV_VENV)/.installed ## Create .venv-openvino (optimum-intel, its own transformers)

models: install openvino-env ## Build the offline models (cached in $LOCALLLMS_CACHE)
	$(PY) -m modelkit prepare $(KIT_MODELS)

# The official JSON Schema Test Suite ships in the jsonschema sdist (PyPI).
SCHEMA_SUITE := $(LOCALLLMS_CACHE)/json-schema-test-suite/draft2020-12
$(SCHEMA_SUITE):
	@mkdir -p $(LOCALLLMS_CACHE)/src
	$(PYTHON) -m pip download -q --no-deps --no-binary :all: jsonschema==4.26.0 -d $(LOCALLLMS_CACHE)/src
	rm -rf $(LOCALLLMS_CACHE)/.suite && mkdir -p $(LOCALLLMS_CACHE)/.suite
	tar xzf $(LOCALLLMS_CACHE)/src/jsonschema-4.26.0.tar.gz -C $(LOCALLLMS_CACHE)/.suite
	mkdir -p $(dir $@) && mv $(LOCALLLMS_CACHE)/.suite/jsonschema-4.26.0/json/tests/draft2020-12 $@
	rm -rf $(LOCALLLMS_CACHE)/.suite

schema-suite: $(SCHEMA_SUITE) ## Unpack the JSON Schema Test Suite (from the jsonschema sdist)
export LOCALLLMS_SCHEMA_SUITE := $(SCHEMA_SUITE)

llama-server: install ## Build llama.cpp's HTTP server for this CPU from the llama-cpp-python sdist (cached, smoke-checked)
	@$(PY) -m modelkit.native llama-server >/dev/null

demo: install ## Stream an answer from Gemma-3-270M through PromptTemplate | LlamaCpp
	@$(PY) -m modelkit prepare gemma-gguf >/dev/null
	@$(PY) scripts/demo.py

unit: install schema-suite ## Unit tests (no network, no models)
	$(PYTEST) tests/unit_tests --disable-socket --allow-unix-socket

integration: install models llama-server ## Integration tests on real models and loopback servers
	$(PYTEST) tests/integration_tests --ignore=tests/integration_tests/test_openvino.py \
		--ignore=tests/integration_tests/test_chat_openvino.py
	LOCALLLMS_DOCS_ENV=openvino $(OV_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/integration_tests/test_openvino.py tests/integration_tests/test_chat_openvino.py \
		tests/integration_tests/test_docs.py

test: install models llama-server schema-suite ## Everything: unit + integration (real models) + docs
	$(PYTEST) tests/unit_tests --disable-socket --allow-unix-socket
	$(PYTEST) tests/integration_tests --ignore=tests/integration_tests/test_openvino.py \
		--ignore=tests/integration_tests/test_chat_openvino.py
	LOCALLLMS_DOCS_ENV=openvino $(OV_VENV)/bin/python -m pytest -p no:cacheprovider \
		tests/integration_tests/test_openvino.py tests/integration_tests/test_chat_openvino.py \
		tests/integration_tests/test_docs.py

# The bench environment is .venv plus langchain_community and matplotlib, which stay
# out of .venv: a .pth file adds .venv's packages behind the bench venv's own, so pip
# installs only what those two add (seconds instead of a second copy of every runtime).
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: $(VENV)/.installed
	rm -rf $(BENCH_VENV)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -c 'import site, sys; open(site.getsitepackages()[0] + "/localllms-main-venv.pth", "w").write(f"import site; site.addsitedir({sys.argv[1]!r})\n")' \
		"$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(BENCH_VENV)/bin/python -m pip install -q -c constraints.txt langchain-community matplotlib
	@touch $@

bench: models llama-server $(BENCH_VENV)/.installed ## Wrapper cost vs raw runtimes and langchain_community (writes docs/benchmarks.md)
	$(BENCH_VENV)/bin/python scripts/bench.py

lint: install ## ruff + mypy
	$(PY) -m ruff check langchain_localllms tests modelkit scripts
	$(PY) -m ruff format --check langchain_localllms
	$(PY) -m mypy langchain_localllms

format: install ## Format the code
	$(PY) -m ruff format langchain_localllms tests modelkit scripts
	$(PY) -m ruff check --fix langchain_localllms tests modelkit scripts

clean: ## Remove the virtualenvs (the model cache stays)
	rm -rf $(VENV) $(BENCH_VENV) $(OV_VENV)

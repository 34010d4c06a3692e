# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= work

.PHONY: install benchmark-data demo test test-fast mlflow-ui cluster-up cluster-down gpu-check clean

# uv installs the same packages as pip, from pip's own sources (tools/uv_args.py), in about 40 s
# where pip takes 3.5 min on the demo machine; where uv cannot be had or fails, pip installs.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	( $(PY) -m pip install -qq --disable-pip-version-check uv==0.13.9 && \
	  $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) $$($(PY) tools/uv_args.py) -e '.[dev]' ) || \
	  $(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The quality benchmark's real images (and its tests'): an npm package, checked against its hash.
EMOJI_TGZ := data/emoji-datasource-twitter-16.0.0.tgz
$(EMOJI_TGZ): | $(STAMP)
	$(PY) -m pipeline.data.emoji fetch data

benchmark-data: $(EMOJI_TGZ)

# The whole workflow on the embedded demo; the last line printed is the path of summary.json.
demo: install
	$(PY) jobs/train_ldm.py workdir=$(WORKDIR)

test: install $(EMOJI_TGZ)
	$(PY) -m pytest -q --durations=40

# The lane to run while changing code: everything but the tests marked slow (CI runs `make test`).
test-fast: install $(EMOJI_TGZ)
	$(PY) -m pytest -q -m "not slow" --durations=10

# Browse the runs of the local store the demo writes (<workdir>/mlflow.db).
mlflow-ui: install
	@echo "open http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning (the model-training view)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(WORKDIR))/mlflow.db --host 127.0.0.1 --port 5000

# A head with no CPUs and three one-CPU worker nodes on this machine (README, "On a cluster").
CLUSTER_DIR ?= /tmp/ldm-local-cluster
cluster-up: install
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pipeline.localcluster up --dir $(CLUSTER_DIR)

cluster-down:
	$(PY) -m pipeline.localcluster down --dir $(CLUSTER_DIR)

# On a GPU machine with the project's dependencies installed (no install step: such machines may
# have no package index): the workflow through the GPU paths, then the medium and sd bf16 steps.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) jobs/gpu_check.py

clean:
	rm -rf $(WORKDIR) out

# The two commands a newcomer needs: `make dev` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test unit lint bench crds assets clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

# Control-plane binaries, built once per machine and cached outside the repo.
assets:
	@bash hack/k8s-assets.sh >/dev/null

dev: $(STAMP) assets
	KUBEBUILDER_ASSETS="$$(bash hack/k8s-assets.sh)" $(BIN)/workerqueue-operator dev $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check operator tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest -m "not integration" -q

test: $(STAMP) assets lint
	KUBEBUILDER_ASSETS="$$(bash hack/k8s-assets.sh)" $(BIN)/pytest -q $(PYTEST_ARGS)

bench: $(STAMP) assets
	KUBEBUILDER_ASSETS="$$(bash hack/k8s-assets.sh)" $(BIN)/python -m bench $(ARGS)

crds: $(STAMP)
	$(BIN)/workerqueue-operator crds -o crds/agentcontrol.dev_workerqueues.yaml
	$(BIN)/workerqueue-operator crds --chart -o charts/workerqueue-operator/templates/crds/workerqueues.yaml

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

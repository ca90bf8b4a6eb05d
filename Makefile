# The two commands a newcomer needs: `make dev` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test unit lint bench crds assets real-worker image image-lock constraints clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --upgrade pip
	$(BIN)/pip install --quiet --constraint constraints.txt -e '.[test,lint]'
	touch $(STAMP)

# The newest versions pyproject.toml allows, pinned in constraints.txt (then run `make test`).
constraints:
	rm -rf build/constraints && $(PYTHON) -m venv build/constraints
	build/constraints/bin/pip install --quiet --upgrade pip
	build/constraints/bin/pip install --quiet -e '.[test,lint]'
	{ sed -n '1,2p' constraints.txt; build/constraints/bin/pip freeze --all --exclude-editable | grep -v '^workerqueue'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

# Control-plane binaries, built once per machine and cached outside the repo.
assets: $(STAMP)
	@bash hack/k8s-assets.sh >/dev/null

# The real worker from PyPI, installed once per machine outside the repo (tests/integration/test_real_worker.py).
real-worker:
	@bash hack/real-worker.sh >/dev/null

dev: $(STAMP) assets
	KUBEBUILDER_ASSETS="$$(bash hack/k8s-assets.sh)" $(BIN)/workerqueue-operator dev $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check operator tests bench image
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(STAMP)
	$(BIN)/pytest -m "not integration" -q

test: $(STAMP) assets real-worker lint
	KUBEBUILDER_ASSETS="$$(bash hack/k8s-assets.sh)" $(BIN)/pytest -q $(PYTEST_ARGS)

bench: $(STAMP) assets
	KUBEBUILDER_ASSETS="$$(bash hack/k8s-assets.sh)" $(BIN)/python -m bench $(ARGS)

crds: $(STAMP)
	$(BIN)/workerqueue-operator crds -o crds/agentcontrol.dev_workerqueues.yaml
	$(BIN)/workerqueue-operator crds --chart -o charts/workerqueue-operator/templates/crds/workerqueues.yaml
	$(BIN)/workerqueue-operator crds --values-schema charts/workerqueue-operator/values.schema.json

# The operator's image, built without Docker (image/build.py): OCI and docker archives in build/image.
image:
	@bash hack/image-tools.sh
	$(PYTHON) image/build.py $(ARGS)

# Re-resolves the image's locks: Python packages (with hashes, for every platform's wheels) and the
# Debian package versions the mirror has today. pip-compile runs in a throwaway venv; the lock's
# environment markers are evaluated for the running Python, which must be the image's (3.11).
image-lock:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "image-lock needs Python 3.11, the image'"'"'s")'
	rm -rf build/pip-tools && $(PYTHON) -m venv build/pip-tools
	build/pip-tools/bin/pip install --quiet pip-tools
	CUSTOM_COMPILE_COMMAND="make image-lock" build/pip-tools/bin/pip-compile --quiet --upgrade --generate-hashes \
		--allow-unsafe --all-build-deps --strip-extras --no-emit-index-url --no-emit-find-links \
		--output-file=image/requirements.lock pyproject.toml
	@bash hack/image-tools.sh
	$(PYTHON) image/build.py --update-debian-lock

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build

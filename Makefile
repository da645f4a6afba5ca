# forgeline: `make run` and `make test` each set everything up on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install run test test-fast lint mlflow-ui prefect-server deploy clean

# The venv's bundled pip (23.x) skips lxml's html-clean extra that trafilatura needs,
# so pip is upgraded first. torch's range in pyproject.toml admits the CPU wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/forgeline run

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check flows tasks models tests benchmarks

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/work/mlflow.db --host 127.0.0.1 --port 5000

prefect-server: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

deploy: $(STAMP)
	FORGELINE_HOME=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml

clean:
	rm -rf work .pytest_cache

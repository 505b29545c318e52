# One-command entry points. Each target creates .venv (if missing) and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint type bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.demo  ## the email service on the local lane: no servers needed
	$(BIN)/python examples/email_service.py $(ARGS)

# Two test processes: most tests wait on workers and brokers, not the CPU. The chaos
# runs share one process (their xdist_group), one after another.
test: $(VENV)/.dev  ## the whole suite (Redis and RabbitMQ tests skip when unreachable)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: $(VENV)/.dev
	$(BIN)/ruff check celery_ext tests examples benchmarks
	$(BIN)/ruff format --check celery_ext tests examples benchmarks

type: $(VENV)/.dev
	$(BIN)/mypy

bench: $(VENV)/.dev  ## side-by-side benchmarks against stock Celery
	$(BIN)/python benchmarks/local_lane.py

clean:
	rm -rf $(VENV) build *.egg-info

# The two commands of the quickstart: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-test demo test lint format prism clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .

# The other redis-py lines the project allows, beside the installed one, for the worker-stop tests
# (tests/test_worker_stop.py runs a worker with each on PYTHONPATH).
REDIS_PY := 5.3.1 6.4.0 7.4.1

# The MySQL driver (mysqlclient) builds against the MariaDB/MySQL client library: without its
# headers the driver is left out and the MariaDB tests skip (CI installs them: .ci/run).
install-test: $(BIN)/python
	@if pkg-config --exists libmariadb 2>/dev/null || pkg-config --exists mysqlclient 2>/dev/null; then \
		$(BIN)/python -m pip install --quiet -e '.[test,mysql]'; \
	else echo "no MySQL client headers (Debian: apt-get install libmariadb-dev pkg-config):" \
		"the MariaDB tests will be skipped"; $(BIN)/python -m pip install --quiet -e '.[test]'; fi
	@for v in $(REDIS_PY); do [ -d $(VENV)/redis-py/$$v/redis ] || \
		$(BIN)/python -m pip install --quiet --no-deps --target $(VENV)/redis-py/$$v "redis==$$v"; done

# Prism serves Twilio's own OpenAPI spec for the contract tests (skipped without npm, required in CI).
prism:
	@if command -v npm >/dev/null 2>&1; then \
		if [ -f tests/package-lock.json ]; then npm ci --prefix tests --no-audit --no-fund --loglevel=error; fi; \
	else echo "npm not found: the Twilio contract tests will be skipped"; fi

demo: install
	$(BIN)/reminders demo

# The storm test (workers killed every half second) first and on its own, then everything else.
test: install-test prism
	$(BIN)/python -m pytest -m storm $(PYTEST_ARGS) tests/test_reconcile.py
	$(BIN)/python -m pytest -m "not storm" $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check reminders
	$(BIN)/mypy

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) tests/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis

# make run   - set up a virtual environment, start the demo downstream and the relay
# make test  - set up the virtual environment, run ruff and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install run test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

run: install
	@mkdir -p var
	@export RELAY_UNSUBSCRIBE_SECRET="$${RELAY_UNSUBSCRIBE_SECRET:-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(32))')}"; \
	$(BIN)/relay demo-sink --listen 127.0.0.1:2526 --dir var/demo-mail & sink=$$!; \
	trap 'kill $$sink 2>/dev/null' EXIT INT TERM; \
	echo "relay: SMTP on 127.0.0.1:2525 -> demo downstream on 127.0.0.1:2526 (saves to var/demo-mail/)"; \
	echo "relay: try: swaks --server 127.0.0.1:2525 --from app@example.com --to you@example.net"; \
	$(BIN)/relay serve --config relay.toml

test: install
	@# mailauth, the DKIM verifier that knows ed25519-sha256 (tests/js/verify.mjs)
	@if command -v npm >/dev/null 2>&1 && { [ ! -f tests/js/node_modules/.package-lock.json ] || \
	    [ tests/js/package-lock.json -nt tests/js/node_modules/.package-lock.json ]; }; then \
	    echo "npm ci (tests/js)"; cd tests/js && npm ci --silent --no-audit --no-fund; fi
	$(BIN)/ruff check relay tests bench
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run_e2e.py -n 10000 -c 10 --size 5120

clean:
	rm -rf $(VENV) var .pytest_cache

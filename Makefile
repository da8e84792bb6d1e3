# One entry point for people and CI. Every target sets up what it needs first (idempotent).
#   make run    supervise a real llama-server on the real small model behind the front door
#               (clients: 127.0.0.1:8080, API: 127.0.0.1:8084; Ctrl-C stops both); its last
#               good config is kept in .corral/config.toml
#   make serve  corral serve: two names (alpha, beta) for the real model, room for one at a
#               time (clients: 127.0.0.1:8080, API: 127.0.0.1:8085)
#   make test   set up (incl. etcd) and run every test, real llama-server included
#   make bench  benchmarks, Corral next to supervisord; writes bench/results/latest.json
#   make soak   a bounded chaos soak (SOAK_SECONDS, default 120)
#   make sim-slow  the fleet simulation's random schedules, 3,000 of them (make test runs 200)
#   make lint   ruff + mypy --strict
#   make page-png  refresh the web page's screenshots in docs/ from a real run

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
API ?= 127.0.0.1:8084
LISTEN ?= 127.0.0.1:8080
PYTEST_ARGS ?=
TEST_WORKERS ?= 3

.PHONY: setup setup-system setup-test run serve test bench soak sim-slow lint clean page-png

setup:
	@scripts/setup.sh

setup-system:
	@scripts/setup.sh --system

setup-test:
	@scripts/setup.sh --system-test

# No --binary: Corral runs the llama-server packaged with it (the [server] extra, in .venv).
run: setup-system
	@eval "$$($(PY) scripts/llama_paths.py)"; \
	echo "Supervising the packaged llama-server on $$MODEL (clients: http://$(LISTEN), API $(API))"; \
	echo "Try: curl -s $(API)/v1/status; curl --json '{\"args\": {\"-np\": 2}}' $(API)/v1/params"; \
	exec $(VENV)/bin/corral supervise --supervisor-addr $(API) --listen $(LISTEN) \
	  --model "$$MODEL" --allow-model-dir "$$(dirname "$$MODEL")" \
	  --config-file $(CURDIR)/.corral/config.toml --state-dir $(CURDIR)/.corral/state

serve: setup-system
	@eval "$$($(PY) scripts/llama_paths.py)"; mkdir -p .corral/models; \
	ln -f "$$MODEL" .corral/models/alpha.gguf 2>/dev/null || cp "$$MODEL" .corral/models/alpha.gguf; \
	ln -f "$$MODEL" .corral/models/beta.gguf 2>/dev/null || cp "$$MODEL" .corral/models/beta.gguf; \
	echo "Serving alpha and beta (room for one) on http://$(LISTEN); API 127.0.0.1:8085"; \
	echo "Try: curl -s $(LISTEN)/v1/models; .venv/bin/corral status --supervisor-addr 127.0.0.1:8085"; \
	exec $(VENV)/bin/corral serve --listen $(LISTEN) --supervisor-addr 127.0.0.1:8085 \
	  --models-dir $(CURDIR)/.corral/models --max-models 1 \
	  --config-file $(CURDIR)/.corral/serve.toml --state-dir $(CURDIR)/.corral/state -- -c 2048

# Two passes: what does not measure time runs on TEST_WORKERS processes at once (most of it
# waits on subprocesses); the tests marked timing (durations, probes every 50 ms, latency
# and load figures) run alone afterwards, so the load of the first pass cannot make them
# flaky. Exit code 5 (no test selected, e.g. with PYTEST_ARGS="-k ...") is not a failure.
# Between the passes, alone too, a short chaos soak (fake llama-server): SOAK_TEST_SECONDS
# with the fixed seed SOAK_TEST_SEED, then as long with a random seed it prints; any
# violation fails make test. SOAK_TEST_SECONDS=0 leaves it out.
SOAK_TEST_SECONDS ?= 15
SOAK_TEST_SEED ?= 618756824
test: setup-test
	@rc=0; \
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) -m "not timing" $(PYTEST_ARGS) \
	  || { r=$$?; [[ $$r == 5 ]] || rc=$$r; }; \
	if [[ "$(SOAK_TEST_SECONDS)" != 0 ]]; then \
	  $(PY) -m bench.soak --seconds $(SOAK_TEST_SECONDS) --seed $(SOAK_TEST_SEED) || rc=1; \
	  $(PY) -m bench.soak --seconds $(SOAK_TEST_SECONDS) || rc=1; \
	fi; \
	$(PY) -m pytest -q --durations=15 -m timing $(PYTEST_ARGS) \
	  || { r=$$?; [[ $$r == 5 ]] || rc=$$r; }; \
	exit $$rc

# refresh docs/page.png and docs/page-390.png from a run (real llama-server and model); not a test
page-png: setup-test
	@eval "$$($(PY) scripts/llama_paths.py)"; \
	$(PY) -m scripts.page_screenshot --binary "$$LLAMA_SERVER" --model "$$MODEL" --out docs/page.png

bench: setup-test
	$(PY) -m bench.run_all

soak: setup
	$(PY) -m bench.soak --seconds $${SOAK_SECONDS:-120}

sim-slow: setup
	CORRAL_SIM_SEEDS=$${CORRAL_SIM_SEEDS:-3000} $(PY) -m pytest -q -n $(TEST_WORKERS) \
	  --timeout 3600 tests/test_fleet_sim.py -k random_schedules

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

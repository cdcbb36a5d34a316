# Two commands for a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
SYSTEM_PACKAGES := espeak-ng sox chromium
PYTEST_ARGS ?=

.PHONY: run test install install-test system-deps lint unit integration bench k8s clean bench-gpu soak bench-peers bench-overhead

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[models]'
	@touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(PIP) install -q -e '.[models,test]'
	@touch $@

install: $(STAMP)

install-test: $(TEST_STAMP) system-deps

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "Installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "Missing system packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; \
	fi

run: $(STAMP)
	$(PY) -m serve_app run

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check serve_app deployments tests bench examples

test: install-test
	$(VENV)/bin/ruff check serve_app deployments tests bench examples
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

unit: $(TEST_STAMP)
	$(PY) -m pytest -q tests/unit

integration: install-test
	$(PY) -m pytest -q tests/integration

# The long soak: 10,000 requests under chaos, and 100 load/offload/restore/release cycles.
soak: install-test
	GPU_SERVE_SOAK_REQUESTS=10000 GPU_SERVE_SOAK_S=3600 GPU_SERVE_FAULT_CYCLES=100 \
	  $(PY) -m pytest -q -s -m soak tests/integration/test_soak.py tests/integration/test_faults.py

bench: $(TEST_STAMP)
	$(PY) bench/policy_decide.py

# Regenerates the RayService's serveConfigV2 (k8s/base/rayservice.yaml) from serve_config.yaml.
k8s: $(STAMP)
	$(PY) -m serve_app.k8s

# Needs a CUDA build of torch and an NVIDIA GPU; exits 2 without one, 1 when a target is missed.
bench-gpu: $(TEST_STAMP)
	$(PY) bench/gpu_tier.py

# Side by side with infinity-emb and faster-whisper-server (installed once under .bench/venvs).
bench-peers: install-test
	$(PY) bench/peers.py

# This service against a plain Serve deployment of the same model: the price of management.
bench-overhead: install-test
	$(PY) bench/overhead.py

# Realtime transcription: latency, real-time factor, concurrent sessions; WhisperLiveKit beside it
# (its venv, .bench/venvs/whisperlivekit, is made once; it needs ffmpeg).
.PHONY: bench-realtime
bench-realtime: install-test
	@test -x .bench/venvs/whisperlivekit/bin/wlk || { python3 -m venv .bench/venvs/whisperlivekit && \
	  .bench/venvs/whisperlivekit/bin/python -m pip install -q torch==2.13.0 whisperlivekit==0.2.26 faster-whisper; }
	$(PY) bench/realtime.py --whisperlivekit

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Trace-driven policy simulator: every committed trace, both scenarios; table and plot in bench/results/;
# exits 1 when one of the issue-12 targets is missed.
.PHONY: bench-policy
bench-policy: $(TEST_STAMP)
	$(PY) bench/policy_sim.py --report bench/results

# The same targets on fresh seeds of the trace generator (1-16; the committed traces are 1-3):
# how well they hold on traces the policy was not tuned on.
.PHONY: bench-policy-seeds
bench-policy-seeds: $(TEST_STAMP)
	$(PY) bench/policy_seeds.py --seeds 1-16

# The same seeds with the hindsight references (gpu-serve@knows=...): how much of the gap to
# Belady-Size knowing whether a session goes on, or when the next one starts, would close.
.PHONY: bench-policy-hindsight
bench-policy-hindsight: $(TEST_STAMP)
	$(PY) bench/policy_seeds.py --seeds 1-16 --hindsight

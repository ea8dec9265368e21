# tollgate: the single entry point. `make run` (demo gateway on localhost:10000) and `make test`
# install what they need themselves: the wasm32-wasip1 target and a local Envoy in .venv.
SHELL := /bin/bash
.DEFAULT_GOAL := help

TARGET   := wasm32-wasip1
WASM     := target/$(TARGET)/release/tollgate.wasm
MOCK     := target/release/mock-provider
VENV     := .venv
PY       := $(VENV)/bin/python
ENVOY    := $(VENV)/bin/envoy
PYTEST_ARGS ?=

.PHONY: help
help:
	@echo "make run        build and start the demo gateway on localhost:10000 (Ctrl-C stops it)"
	@echo "make run-rotation  the same with keys, listener and clusters from files changed without a restart (envoy/rotation/)"
	@echo "make test       clippy (wasm target), unit tests, end-to-end tests against a real Envoy (shipped configs validated there)"
	@echo "make build      build $(WASM)"
	@echo "make size       size-tuned build after wasm-opt"
	@echo "make bench      the cost goals: tollgate against bare Envoy, an empty module, the previous module (BENCH_PREVIOUS=$(BENCH_PREVIOUS)), a 16 KiB body, host calls, a fleet-wide budget, 10,000 consumers, the response cache, Envoy's own instructions per request (Callgrind on Envoy) and the module's per callback (BENCHMARKS.md, ~22 min on 2 cores)"
	@echo "make profile    host calls and callbacks per request and per SSE event, by role, counted and timed inside the VM"
	@echo "make instructions  instructions per callback of both roles (Valgrind's Callgrind), checked against tests/bench/instructions-baseline.json (~5 min)"
	@echo "make lint       rustfmt check, clippy for the wasm target and the host"

.PHONY: toolchain
toolchain:
	@rustup target list --installed 2>/dev/null | grep -qx $(TARGET) || rustup target add $(TARGET)
	@cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
	@cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt

$(VENV)/.installed: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

.PHONY: venv
venv: $(VENV)/.installed

# The features rustc emits for wasm32-wasip1 (SIMD from .cargo/config.toml): with `-all`, wasm-opt may
# use others, and Envoy then refuses to load the module.
WASM_OPT_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int --enable-mutable-globals --enable-simd

.PHONY: build
build: toolchain
	cargo build --release --target $(TARGET) -p tollgate
	@$(MAKE) --no-print-directory optimize

# wasm-opt -O3 on the module cargo built, in place: ~15% smaller, no slower. The stamp holds the
# checksum of the module it wrote, so a module cargo wrote since (whatever its mtime) is optimized
# again, and an optimized one is left alone. Without binaryen the module stays as cargo built it.
.PHONY: optimize
optimize:
	@command -v wasm-opt >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -qq binaryen || (apt-get update -qq && apt-get install -y -qq binaryen)) >/dev/null 2>&1; } || true
	@if ! command -v wasm-opt >/dev/null 2>&1; then echo "wasm-opt not found: $(WASM) left as cargo built it"; \
	elif [ -f $(WASM).optimized ] && sha256sum --check --status $(WASM).optimized 2>/dev/null; then :; \
	else wasm-opt $(WASM_OPT_FEATURES) -O3 $(WASM) -o $(WASM).tmp && mv $(WASM).tmp $(WASM) && \
	  sha256sum $(WASM) > $(WASM).optimized && echo "wasm-opt -O3: $$(stat -c %s $(WASM)) bytes"; fi

.PHONY: mock
mock:
	cargo build --release -p mock-provider


.PHONY: size
size: toolchain
	cargo build --profile release-small --target $(TARGET) -p tollgate
	@command -v wasm-opt >/dev/null || (apt-get install -y binaryen >/dev/null 2>&1 || true)
	wasm-opt $(WASM_OPT_FEATURES) -Oz target/$(TARGET)/release-small/tollgate.wasm -o target/tollgate.small.wasm
	@ls -l $(WASM) target/tollgate.small.wasm | awk '{print $$5, $$9}'

.PHONY: lint
lint: toolchain
	cargo fmt --check
	cargo clippy --release --target $(TARGET) -p tollgate -- -D warnings
	cargo clippy --workspace --all-targets -- -D warnings

.PHONY: unit
unit:
	cargo test --workspace --quiet

.PHONY: e2e
e2e: build mock venv fleet-deps
	$(PY) -m pytest -q tests/e2e $(PYTEST_ARGS)

# Debian tools some checks use (promtool for the Prometheus files). Best effort: without root or a
# package mirror the tests that need them say they skipped and why.
.PHONY: tools
tools:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
	  || echo "promtool not installed: the Prometheus checks will be skipped"; }

.PHONY: test
test: toolchain tools lint unit e2e

.PHONY: run
run: build mock venv
	$(PY) envoy/run_demo.py

# The same mocks behind envoy/rotation/: keys, listener and clusters from files Envoy watches.
.PHONY: run-rotation
run-rotation: build mock venv
	$(PY) envoy/run_demo.py envoy/rotation/envoy.yaml

# The module `make bench` compares tollgate against in the same rounds (A/B): built from this commit's
# sources (git archive) into $(BENCH_PREV_DIR), with its own target dir so that it never touches
# tollgate's build. Any commit or ref: `make bench BENCH_PREVIOUS=<rev>`.
# f36ba78: main before waiting, pacing and the second cost round.
BENCH_PREVIOUS  ?= f36ba78
BENCH_PREV_DIR  := target/bench-previous
BENCH_PREV_WASM := $(BENCH_PREV_DIR)/tollgate.wasm

.PHONY: bench
bench: build mock venv profiled instructions-deps
	@command -v wrk >/dev/null || apt-get install -y wrk; command -v wasm-opt >/dev/null || apt-get install -y binaryen
	@command -v perf >/dev/null || apt-get install -y linux-perf >/dev/null 2>&1 || echo "perf not installed: the benchmark's perf samples will say skipped"
	@$(MAKE) --no-print-directory fleet-deps || echo "make fleet-deps failed: the benchmark's fleet-wide budget rows will say skipped"
	@$(MAKE) --no-print-directory bench-previous || echo "building $(BENCH_PREVIOUS) failed: the benchmark runs without the previous module and says so"
	$(PY) tests/bench/bench.py --previous $(BENCH_PREV_WASM) --previous-label "$$(cat $(BENCH_PREV_DIR)/COMMIT 2>/dev/null || echo '$(BENCH_PREVIOUS)')"
	@$(MAKE) --no-print-directory instructions INSTRUCTIONS_ARGS=--write

# Instructions per callback of both roles, counted by Valgrind's Callgrind through gungraun
# (tests/instructions, tests/bench/instructions.py): the table, and a case more than 2% above
# tests/bench/instructions-baseline.json fails. Deterministic, but toolchain-specific and ~5 min from
# a fresh clone (the runner's install and the benchmark's build): not part of `make test`.
# INSTRUCTIONS_ARGS=--write puts the table in BENCHMARKS.md; --save-baseline writes the baseline.
GUNGRAUN_VERSION := 0.20.0
TOOLS            := target/tools
GUNGRAUN_RUNNER  := $(CURDIR)/$(TOOLS)/bin/gungraun-runner
INSTRUCTIONS_ARGS ?=

.PHONY: instructions instructions-deps
instructions-deps:
	@command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
	@[ "$$($(GUNGRAUN_RUNNER) --version 2>/dev/null)" = "gungraun-runner $(GUNGRAUN_VERSION)" ] || \
	  cargo install --quiet --locked --root $(TOOLS) gungraun-runner --version $(GUNGRAUN_VERSION)

instructions: instructions-deps
	GUNGRAUN_RUNNER=$(GUNGRAUN_RUNNER) python3 tests/bench/instructions.py $(INSTRUCTIONS_ARGS)

# Sources are extracted again only when the commit changes (COMMIT holds it), with fresh mtimes (tar
# -m: cargo must not take an older commit's sources for up to date). The module is removed first, so
# a failed build leaves none and bench.py reports the previous variant skipped.
.PHONY: bench-previous
bench-previous: toolchain
	@set -e; rm -f $(BENCH_PREV_WASM); \
	rev=$$(git rev-parse --verify --quiet '$(BENCH_PREVIOUS)^{commit}') || { echo "BENCH_PREVIOUS=$(BENCH_PREVIOUS) is not a commit"; exit 1; }; \
	if [ "$$(cat $(BENCH_PREV_DIR)/COMMIT 2>/dev/null)" != "$$(git rev-parse --short $$rev)" ]; then \
	  rm -rf $(BENCH_PREV_DIR) && mkdir -p $(BENCH_PREV_DIR)/src && git archive $$rev | tar -x -m -C $(BENCH_PREV_DIR)/src && \
	  git rev-parse --short $$rev > $(BENCH_PREV_DIR)/COMMIT; fi; \
	echo "building the previous module ($(BENCH_PREVIOUS) = $$(cat $(BENCH_PREV_DIR)/COMMIT)) in $(BENCH_PREV_DIR)/src"; \
	cd $(BENCH_PREV_DIR)/src && CARGO_TARGET_DIR=$(CURDIR)/target/bench-previous-build \
	  cargo build --quiet --release --target $(TARGET) -p tollgate; \
	cp $(CURDIR)/target/bench-previous-build/$(TARGET)/release/tollgate.wasm $(CURDIR)/$(BENCH_PREV_WASM)
	@# Optimized as `make build` optimizes the module under test: the A/B compares like with like.
	@if command -v wasm-opt >/dev/null 2>&1; then wasm-opt $(WASM_OPT_FEATURES) -O3 $(BENCH_PREV_WASM) -o $(BENCH_PREV_WASM).tmp && \
	  mv $(BENCH_PREV_WASM).tmp $(BENCH_PREV_WASM) && echo "previous module after wasm-opt -O3: $$(stat -c %s $(BENCH_PREV_WASM)) bytes"; fi

# Where the module's time goes per request: host calls and callbacks, counted and timed in the VM
# (the streams with events one by one come from the mock provider). `make bench` counts the same.
.PHONY: profile
profile: build mock venv profiled
	$(PY) tests/bench/profile.py

# The module with the `profile` feature, in its own cargo profile: the module under test is left alone.
# Built before `make bench` starts its clock (bench.py only finds it up to date).
.PHONY: profiled
profiled: toolchain
	cargo build --profile profiling --features profile --target $(TARGET) -p tollgate

.PHONY: demo-traffic
demo-traffic: venv
	$(PY) tests/demo_traffic.py --gateway http://localhost:10000

# A long mixed run through one real Envoy (default 200k requests, ~5 min on 2 cores): totals, RSS, VM health. Writes SOAK.md.
.PHONY: soak
soak: build mock venv
	$(PY) tests/soak.py

# Fleet-wide budgets (tests/e2e/test_fleet.py, deploy/fleet/README.md): the test RLS server and Redis.
.PHONY: fleet-deps
fleet-deps:
	python3 tests/rls-server/patch_limitador.py
	cargo build --release --manifest-path tests/rls-server/Cargo.toml
	@command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null 2>&1 \
	  || echo "redis-server not installed (needs root and Debian's packages): the fleet-wide budget test will be skipped"

# Fuzzing (see fuzz/README.md): each target runs FUZZ_SECONDS from the seeds in fuzz/corpus/<target>;
# new inputs go to fuzz/corpus-new/<target> and crashes to fuzz/artifacts/<target> (both ignored by
# git). Stable Rust: `--sanitizer none` needs no nightly flag; FUZZ_SANITIZER=address also works, via
# RUSTC_BOOTSTRAP=1. Overflow checks and debug assertions are on either way.
FUZZ_SECONDS   ?= 30
FUZZ_SANITIZER ?= none
FUZZ_TARGETS   ?= config request usage_json sse usage_stream_diff retry_headers translate
FUZZ_ENV       := $(if $(filter none,$(FUZZ_SANITIZER)),,RUSTC_BOOTSTRAP=1)
FUZZ_MAX_LEN_config        := 4096
FUZZ_MAX_LEN_request       := 8192
FUZZ_MAX_LEN_usage_json    := 4096
FUZZ_MAX_LEN_sse           := 4096
FUZZ_MAX_LEN_usage_stream_diff := 4096
FUZZ_MAX_LEN_retry_headers := 1024
FUZZ_MAX_LEN_translate     := 8192

.PHONY: fuzz fuzz-install
fuzz: $(FUZZ_TARGETS:%=fuzz-%)

fuzz-install:
	@cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked

fuzz-%: fuzz-install
	@mkdir -p fuzz/corpus-new/$*
	$(FUZZ_ENV) cargo fuzz run --sanitizer $(FUZZ_SANITIZER) $* fuzz/corpus-new/$* fuzz/corpus/$* -- \
	  -max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN_$*) -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
	  $(if $(wildcard fuzz/dict/$*.dict),-dict=fuzz/dict/$*.dict)

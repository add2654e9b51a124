# kvsync developer targets. CI (.ci/run) uses the same ones.
.DEFAULT_GOAL := help
PYTHON ?= python
IMAGE ?= kvsync:dev
KIND ?= kind
KIND_CLUSTER ?= kvsync-e2e
E2E_KUBECONFIG ?= .kind-kubeconfig
MATURIN ?= maturin
FUZZ_CASES ?= 2000000
STREAM_CASES ?= 200000

.PHONY: help
help: ## list the targets (make TARGET; PYTHON=... picks the interpreter)
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

.PHONY: install
install: ## build the extension (release) and install kvsync with its dependencies
	$(PYTHON) -m pip install .

.PHONY: test
test: ## install with test extras and run the Python test layers (the README command)
	$(PYTHON) -m pip install '.[test]' && $(PYTHON) -m pytest

.PHONY: test-rust
test-rust: ## Rust unit tests, proptests and the bounded fuzz run
	cargo test -p kvsync-core

.PHONY: lint
lint: lint-rust lint-python ## all linters

.PHONY: lint-rust
lint-rust: ## rustfmt check and clippy with -D warnings
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings

.PHONY: lint-python
lint-python: ## ruff, mypy over the package, stubtest of kvsync._core (needs the extension built)
	ruff check python tests bench tools chaos
	ruff format --check python tests bench tools chaos
	mypy
	$(PYTHON) -m mypy.stubtest kvsync._core --allowlist rust/py/stubtest-allowlist.txt

.PHONY: bench
bench: ## install kvsync with the bench extra, run the pytest-benchmark suite and criterion
	$(PYTHON) -m pip install '.[bench]'
	$(PYTHON) -m pytest bench -m benchmark --benchmark-enable
	cargo bench -p kvsync-core --bench index -- --warm-up-time 1 --measurement-time 3

.PHONY: bench-peers
bench-peers: ## kvsync vs Dynamo and SMG indexes, 1M holdings (PEERS_ARGS='--holdings 10M --json peers.json')
	cargo run --release --manifest-path bench/peers/Cargo.toml -- $(PEERS_ARGS)

.PHONY: fuzz
fuzz: ## long proptest runs: decoder and index fuzz, stream model (FUZZ_CASES=..., STREAM_CASES=...)
	PROPTEST_CASES=$(FUZZ_CASES) cargo test --release -p kvsync-core --test fuzz
	PROPTEST_CASES=$(STREAM_CASES) cargo test --release -p kvsync-core --test stream_model

.PHONY: chaos
chaos: ## every chaos scenario (root: network namespaces); writes chaos-report.json and .md
	$(PYTHON) -m pytest chaos -m chaos -v

.PHONY: chaos-lite
chaos-lite: ## the bounded chaos subset CI runs (under 3 minutes); writes the same reports
	KVSYNC_CHAOS_LITE=1 $(PYTHON) -m pytest chaos -m chaos -v

.PHONY: ci
ci: ## what CI runs
	bash .ci/run

.PHONY: mutants
MUTANTS_JOBS ?= 2
mutants: ## mutation testing of the stream, holders and index modules (cargo-mutants + nextest; ~1.5 h with 2 jobs); fails under 85%
	PROPTEST_CASES=48 cargo mutants -p kvsync-core --no-shuffle -j $(MUTANTS_JOBS) --test-tool nextest \
		-f 'rust/core/src/stream/*.rs' -f 'rust/core/src/holders/*.rs' -f 'rust/core/src/index/*.rs' \
		-e 'rust/core/src/**/tests.rs' -e rust/core/src/index/testutil.rs -e rust/core/src/index/check_tests.rs; \
	case $$? in 0|2|3) ;; *) exit 1;; esac  # 2, 3: survivors or timeouts, which the score counts
	$(PYTHON) tools/mutants_score.py mutants.out --equivalent docs/mutants-equivalent.txt --fail-under 85

.PHONY: coverage
coverage: ## line coverage, HTML + summary in coverage/: Rust core (cargo-tarpaulin), Python (pytest-cov); COV_FAIL_UNDER=90 enforces a floor
	mkdir -p coverage/rust
	PROPTEST_CASES=64 cargo tarpaulin -p kvsync-core --skip-clean --engine ptrace \
		--exclude-files 'bench/*' --exclude-files 'rust/py/*' --exclude-files 'rust/core/tests/*' \
		--exclude-files 'rust/core/benches/*' \
		--out Html --out Json --output-dir coverage/rust $(if $(COV_FAIL_UNDER),--fail-under $(COV_FAIL_UNDER))
	$(PYTHON) -m pytest --cov --cov-report=term --cov-report=html:coverage/python \
		--cov-report=json:coverage/python.json $(if $(COV_FAIL_UNDER),--cov-fail-under=$(COV_FAIL_UNDER))
	$(PYTHON) tools/coverage_summary.py coverage $(if $(COV_FAIL_UNDER),--fail-under $(COV_FAIL_UNDER)) \
		> coverage/summary.md; status=$$?; cat coverage/summary.md; exit $$status


.PHONY: image
image: ## build the container image (Dockerfile) as $(IMAGE)
	docker build -t $(IMAGE) .

.PHONY: e2e
e2e: image ## with Docker and kind: create a cluster, load the image, run pytest -m e2e (deploys deploy/overlays/sim), delete the cluster
	$(KIND) create cluster --name $(KIND_CLUSTER) --config deploy/kind-config.yaml \
		--kubeconfig $(E2E_KUBECONFIG) --wait 120s
	status=0; \
	$(KIND) load docker-image $(IMAGE) --name $(KIND_CLUSTER) \
		&& KUBECONFIG=$(E2E_KUBECONFIG) KVSYNC_E2E_IMAGE=$(IMAGE) $(PYTHON) -m pytest -m e2e tests/e2e \
		|| status=$$?; \
	$(KIND) delete cluster --name $(KIND_CLUSTER) --kubeconfig $(E2E_KUBECONFIG); \
	rm -f $(E2E_KUBECONFIG); \
	exit $$status
.PHONY: wheel
wheel: ## one abi3 manylinux2014 wheel (CPython >= 3.11) into dist/ (maturin --zig; zig from the dev extra's ziglang)
	@command -v zig >/dev/null || { mkdir -p build/zig && printf '#!/bin/sh\nexec "%s" -m ziglang "$$@"\n' \
		"$$(command -v $(PYTHON))" > build/zig/zig && chmod +x build/zig/zig; }
	PATH="$(CURDIR)/build/zig:$$PATH" $(MATURIN) build --release --zig --compatibility manylinux2014 \
		--features abi3 -i $(PYTHON) -o dist

.PHONY: nightly
nightly: ## the nightly benchmark run (quick), compared with bench/baseline_metrics.json
	$(PYTHON) -m bench.nightly --quick --out nightly-out
	$(PYTHON) -m bench.compare bench/baseline_metrics.json nightly-out/results.json

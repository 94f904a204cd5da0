# Everything a fresh machine needs: `make demo` runs the main job, `make test` the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow coverage lm-quality lint docs bench fuzz-long gpu-check clean

# torch is pinned in its own step: an open range would pull the CUDA build (several GB).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln export resnet --dynamic-batch -o out/resnet

# Two pytest-xdist workers (one per core on CI's 2-core machines): the suite is mostly small models,
# whose single calls do not keep two cores busy (17 min serial -> 8.5 min for the same tests there).
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow" --durations=30

# The long cases CI leaves out (the ONNX Runtime model-coverage matrix beyond one model per family).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m slow

# Trains the standard-library LM and checks held-out perplexity of every artifact precision (~5 min).
lm-quality: $(STAMP)
	$(BIN)/python -m pytest -m slow -s tests/test_lm_quality.py

# The whole model- and generation-coverage matrices; rewrite docs/coverage.md's two tables from what they measured.
coverage: $(STAMP)
	TORCHKILN_WRITE_COVERAGE=1 $(BIN)/python -m pytest tests/test_model_coverage.py tests/test_generation_coverage.py

# The documentation site (docs/ + mkdocs.yml) into site/; --strict: a broken link, anchor or API reference fails.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check torchkiln tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/bench_zoo.py
	$(BIN)/python bench/bench_quant.py
	$(BIN)/python bench/bench_compress.py
	$(BIN)/python bench/bench_inductor.py
	$(BIN)/python bench/bench_tune.py
	$(BIN)/python bench/bench_overhead.py

fuzz-long: $(STAMP)
	TORCHKILN_FUZZ_EXAMPLES=1000 $(BIN)/python -m pytest tests/test_fuzz.py -k random_models
	TORCHKILN_FORMAT_FUZZ_EXAMPLES=1000 $(BIN)/python -m pytest tests/test_format_fuzz.py --hypothesis-show-statistics
	TORCHKILN_API_FUZZ_EXAMPLES=1000 $(BIN)/python -m pytest -n 2 tests/test_api_fuzz.py

# On a lent GPU machine (runs from source with its own python3 + torch): GPU tests, CUDA round trip, bench rows.
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh

clean:
	rm -rf $(VENV) out site .pytest_cache .mypy_cache .ruff_cache

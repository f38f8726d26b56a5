# cellfuse: `make install && make demo` on a fresh machine; `make test` runs the test suite.
PY ?= .venv/bin/python
DATA ?=
OUT ?= outputs/demo
# RESUME=1 continues an interrupted `make demo` instead of starting over
RESUME ?=

.PHONY: install test test-slow keras-cache demo bench lint clean-outputs gpu-check

install:
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m toolkit --version

test:  # two workers; a unit of work is a file, or one recipe of the matrix (tests/conftest.py)
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder --durations=40 tests

test-slow:
	CELLFUSE_SLOW=1 $(PY) -m pytest -q tests

# Keras' weights cache for demo and bench: outputs/keras-cache, seeded from the shared weights folder
# when there is one (offline machines); with internet Keras fills it itself.
KERAS_CACHE = KERAS_HOME="$(CURDIR)/outputs/keras-cache"

keras-cache:
	@mkdir -p outputs/keras-cache/models
	@shared=$${CELLFUSE_SHARED:-../shared}; for f in "$$shared"/weights/*.h5; do \
	  [ -f "$$f" ] && [ ! -e "outputs/keras-cache/models/$${f##*/}" ] && cp "$$f" outputs/keras-cache/models/; done; true

demo: keras-cache
	$(KERAS_CACHE) $(PY) -m toolkit demo --out $(OUT) $(if $(DATA),--data $(DATA),) $(if $(RESUME),--resume,--force)

bench: keras-cache
	$(KERAS_CACHE) $(PY) -m toolkit bench

gpu-check:  # on a machine with a GPU, under 8 minutes; --dry-run checks it on the CPU
	$(PY) -m toolkit.gpucheck

lint:  # ruff, then the layers and no-cycles contracts in pyproject.toml ([tool.importlinter])
	$(PY) -m ruff check toolkit tests
	$(dir $(PY))lint-imports --no-cache

clean-outputs:  # the demo's and the benchmark's folders, when all in them is cellfuse's (a file of yours stops it)
	@printf 'from toolkit.runs import remove_own\nfrom toolkit.errors import CellfuseError\ntry:\n    [remove_own(f) for f in ("outputs/demo", "outputs/bench")]\nexcept CellfuseError as e:\n    raise SystemExit(f"Error: {e}")\n' | $(PY) -

# `make repro`: build the corpus with DVC on the embedded default corpus.
# `make test`: run the test suite. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install repro test test-fast bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on this machine it resolves to the local CPU build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# ships a trained DCGAN face generator; its metadata asks for torchvision and wandb,
	# which it does not need for inference, so it goes in without its dependencies
	$(PY) -m pip install -q --no-deps gan-face-generate==1.1.1
	# tesseract OCR for document forgeries; optional (an OpenCV fallback exists)
	-command -v tesseract >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr >/dev/null) ; } || true
	# headless Chromium for the report's browser test; optional (the test skips without it)
	-command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || true
	touch $(STAMP)

repro: $(STAMP)
	test -d .dvc || $(VENV)/bin/dvc init -q --no-scm 2>/dev/null || $(VENV)/bin/dvc init -q
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/dvc repro

test: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -p no:cacheprovider tests

# the suite minus tests marked slow (DVC, Ray, kills, training): for local iteration
test-fast: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -p no:cacheprovider -m "not slow and not gpu" tests

bench: $(STAMP)
	for b in bench/bench_*.py; do PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) $$b || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline generators tests bench

clean:
	rm -rf data metrics/*.json .dvc/tmp

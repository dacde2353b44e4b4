# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test clean

# Debian's chromium runs the demo's browser test (Playwright cannot download its own browser
# here); where apt is unavailable the setup goes on and that test skips with the reason.
setup: $(STAMP)
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "setup: chromium could not be installed; the demo's browser test will be skipped"

# Reinstall only when the dependency list changes. torch and torchvision are asked for as a
# matching pair first so the resolver never mixes a CPU torch with a CUDA torchvision.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[all,dev]"
	@# The hub package `kernels` (transformers >= 5.25 needs it) shadows our kernels/ folder; a venv
	@# that once had such a transformers keeps it after the pin in pyproject.toml brings 5.24 back.
	$(BIN)/pip uninstall --yes --quiet kernels 2>/dev/null || true
	touch $(STAMP)

run: setup
	mkdir -p runs
	$(BIN)/vidsieve annotate eval/samples/*.mp4 \
		--question "What colour is the circle?" \
		--question "Which direction does the square move?" \
		--out runs/annotations.jsonl --overwrite
	@$(BIN)/python -c 'import json, sys; [print(r["video"] + ": " + r["question"] + " -> " + str(r["answer"])) for r in map(json.loads, open(sys.argv[1]))]' runs/annotations.jsonl
	@echo "records written to runs/annotations.jsonl"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs

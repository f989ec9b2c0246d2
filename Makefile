# sdnode: every target sets up what it needs. INVENTORY= points the fleet targets at an inventory.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        ?= .venv
BIN         := $(VENV)/bin
PYTHON      ?= python3
INVENTORY   ?= inventory
OS          ?= debian-12
PLAYBOOK_ARGS ?=
SMOKE_ARGS    ?=

export SDNODE_STATE_DIR ?= $(CURDIR)/.sdnode
export ANSIBLE_CONFIG   := $(CURDIR)/ansible.cfg
# testinfra and the day-2 tools call ansible-inventory, so the venv's tools come first.
export PATH             := $(CURDIR)/$(BIN):$(PATH)
# Caches that outlive a clone; a fresh machine simply fills them.
export PIP_CACHE_DIR    ?= /var/cache/sdnode/pip

# Before a fleet target: a missing, unparsable or empty INVENTORY stops it, naming the path.
CHECK_INVENTORY  = $(BIN)/sdnode hosts -i $(INVENTORY) >/dev/null
CONTROLLER_LOCKS := service/requirements/cpu-py311.txt ansible/requirements.txt
SETUP_STAMP      := $(VENV)/.sdnode-setup

.PHONY: help setup host-setup lint test test-fast unit integration demo demo-clean demo-fleet demo-fleet-clean deploy smoke verify rollback lock gpu-bundle

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

setup: $(SETUP_STAMP) ## controller venv from the pinned, hash-checked locks

$(SETUP_STAMP): $(CONTROLLER_LOCKS) service/pyproject.toml scripts/sdnode/pyproject.toml
	@echo "==> setup: controller virtualenv in $(VENV)"
	@mkdir -p $(PIP_CACHE_DIR) 2>/dev/null || true
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# --no-compile: byte-compiling torch and friends up front was two thirds of this step; each module
	@# is compiled (and cached) when first imported instead.
	$(BIN)/python -m pip install --quiet --no-compile --require-hashes $(addprefix -r ,$(CONTROLLER_LOCKS))
	$(BIN)/python -m pip install --quiet --no-compile --no-deps -e service -e scripts/sdnode
	@touch $@

host-setup: setup ## host packages the throwaway nodes and promtool need (root)
	$(BIN)/testnode host-setup

lint: setup ## ansible-lint (production profile), yamllint, ruff
	@echo "==> lint"
	$(BIN)/yamllint -s -c ansible/yamllint.yml .
	$(BIN)/ansible-lint -q -c ansible/ansible-lint.yml playbooks roles
	$(BIN)/ruff check service scripts tests playbooks ansible
	$(BIN)/ruff format --check service scripts tests playbooks ansible

unit: setup ## the service's suite and the controller-side unit tests
	@echo "==> unit tests"
	cd service && ../$(BIN)/pytest -q
	$(BIN)/pytest -q tests/unit

integration: host-setup ## converge, idempotence and verify on throwaway nodes
	@echo "==> integration suite on throwaway nodes"
	$(BIN)/testnode gc
	$(BIN)/pytest -v -m integration tests/integration

test: host-setup lint unit integration ## everything CI runs (host-setup first: the unit phase runs promtool)

test-fast: lint unit ## lint and unit tests only (no nodes)

# When make started, so the demo's summary counts the set-up its prerequisites took.
demo: export SDNODE_MAKE_STARTED := $(shell date +%s.%N)
demo: host-setup ## the main job on a local throwaway node (OS=ubuntu-22.04|ubuntu-24.04; default Debian 12)
	$(BIN)/python -m sdnode.demo --os $(OS)

demo-clean: setup ## remove the demo node (the same OS=)
	$(BIN)/python -m sdnode.demo --clean --os $(OS)

demo-fleet: export SDNODE_MAKE_STARTED := $(shell date +%s.%N)
demo-fleet: host-setup ## two serving nodes behind a gateway with monitoring, on local throwaway nodes
	$(BIN)/python -m sdnode.demo_fleet

demo-fleet-clean: setup ## remove the demo fleet's nodes
	$(BIN)/python -m sdnode.demo_fleet --clean

deploy: setup ## site.yml against INVENTORY
	$(CHECK_INVENTORY)
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/site.yml $(PLAYBOOK_ARGS)

smoke: setup ## sdnode smoke $(SMOKE_ARGS): one generation per instance, PNGs and grid.png in .sdnode/smoke
	$(BIN)/sdnode smoke -i $(INVENTORY) $(SMOKE_ARGS)

verify: setup ## the testinfra suite against INVENTORY (and its monitor hosts, if any)
	$(CHECK_INVENTORY)
	$(BIN)/pytest -p no:cacheprovider -v tests/node --hosts=ansible://sdnodes --ansible-inventory=$(INVENTORY)
	@# The monitoring's own checks (Prometheus, every target up) where the inventory has sdmonitor hosts.
	if $(BIN)/ansible-inventory -i $(INVENTORY) --graph sdmonitor 2>/dev/null | grep -q -- "--[^@]"; then \
	  $(BIN)/pytest -p no:cacheprovider -v tests/node/test_monitor.py --hosts=ansible://sdmonitor --ansible-inventory=$(INVENTORY); fi

rollback: setup ## go back one release on every node of INVENTORY
	$(CHECK_INVENTORY)
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/rollback.yml $(PLAYBOOK_ARGS)

lock: setup ## regenerate the pinned, hash-checked locks
	$(BIN)/python scripts/tools/lock_requirements.py

gpu-bundle: setup ## hash-checked wheels for scripts/tools/gpu_checks.sh on an offline GPU machine (.gpu-bundle/)
	$(BIN)/python scripts/tools/gpu_bundle.py

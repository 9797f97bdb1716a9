# The two commands of the README. Both create ./.venv from requirements.lock first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bootstrap

bootstrap:
	@scripts/bootstrap.sh

# The main job: the gRPC server on the bundled demo model (Ctrl-C drains and stops).
run: bootstrap
	@$(VENV)/bin/bitserve serve

# The whole test suite.
test: bootstrap
	$(PY) -m pytest -q

# The two commands of the README. Both create ./.venv from requirements.lock first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bootstrap

bootstrap:
	@scripts/bootstrap.sh

# The main job: the gRPC server on the bundled demo model (Ctrl-C drains and stops).
run: bootstrap
	@$(VENV)/bin/bitserve serve

EXAMPLE_PLUGIN := examples/bitserve-ternary-int8

# The whole test suite, plus the example third-party plugin (installed as its own package).
test: bootstrap
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e $(EXAMPLE_PLUGIN)
	$(PY) -m pytest -q tests $(EXAMPLE_PLUGIN)/tests

# The two commands of the README. Both create ./.venv from requirements.lock first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test bootstrap

bootstrap:
	@scripts/bootstrap.sh

# The main job on the bundled demo model (interactive chat on a terminal,
# one answer per line when stdin is piped).
run: bootstrap
	@$(VENV)/bin/bitserve chat

# The whole test suite.
test: bootstrap
	$(PY) -m pytest -q

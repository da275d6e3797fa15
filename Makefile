# sharp-fpn: `make test` and `make demo` each set up .venv first when it is missing or stale.
PYTHON ?= python3
VENV_PY := .venv/bin/python

.PHONY: venv test demo bench clean-venv

venv:
	@$(PYTHON) tools/bootstrap.py

test: venv
	$(VENV_PY) -m pytest -q tests

demo: venv
	$(VENV_PY) tools/demo.py

bench: venv
	$(VENV_PY) tools/benchmark.py

clean-venv:
	rm -rf .venv

# sharp-fpn: `make test` and `make demo` each set up .venv first when it is missing or stale.
PYTHON ?= python3
VENV_PY := .venv/bin/python

.PHONY: venv system test demo bench clean-venv

venv:
	@$(PYTHON) tools/bootstrap.py

# Xvfb and Mesa's OpenGL for the napari plugin's tests (apt-get, only when missing; as root or
# with sudo)
system:
	@bash tools/install_system_packages.sh

test: venv system
	$(VENV_PY) -m pytest -q tests

demo: venv
	$(VENV_PY) tools/demo.py

bench: venv
	$(VENV_PY) tools/benchmark.py

clean-venv:
	rm -rf .venv

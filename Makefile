# `make venv` builds .venv with pinned packages (idempotent: re-runs only when requirements or setup.py change).
# `make test` runs the whole suite; `make demo` runs the main job on the embedded default.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv .venv
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m vllm2.cli chat --config configs/tiny.yaml --image data/samples/shapes.png \
		--prompt "What do you see in this image?" --max-new-tokens 16

clean:
	rm -rf .venv

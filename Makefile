# `make venv` builds .venv with pinned packages (idempotent: re-runs only when requirements or setup.py change).
# `make test` runs the whole suite (installing chromium for the browser test when missing); `make demo` runs the main
# job on the embedded default.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: venv browser test demo clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv .venv
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Headless Chromium for the browser test of the web demo (Debian's package; playwright never downloads one).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

test: venv browser
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m vllm2.cli chat --config configs/tiny.yaml --image data/samples/shapes.png \
		--prompt "What do you see in this image?" --max-new-tokens 16

clean:
	rm -rf .venv

.PHONY: setup demo test test-fast bench lint clean

PY := .venv/bin/python

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m lakelens.cli demo --conf conf/local.yaml

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/embed.py
	$(PY) bench/search.py
	$(PY) bench/serve.py
	$(PY) bench/finetune.py
	$(PY) bench/engines_eval.py

lint: setup
	.venv/bin/ruff check lib jobs bench tests

clean:
	rm -rf build .pytest_cache

.PHONY: setup demo test test-fast bench bench-smoke lint clean wheel

PY := .venv/bin/python

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m lakelens.cli demo --conf conf/local.yaml

# the whole suite on a classic session, then the job tests again through a Spark Connect server; each half
# ends with its 25 slowest steps, to see where the suite's time goes
test: setup
	$(PY) -m pytest -q --durations=25 tests
	LAKELENS_TEST_SPARK=connect $(PY) -m pytest -q --durations=25 tests

# the quick lane (pyproject.toml's markers): every test that starts no JVM (no Spark session, no Spark
# process) and no browser, less the few marked slow
test-fast: setup
	LAKELENS_TEST_SPARK=fast $(PY) -m pytest -q -m "not spark and not browser and not slow" tests

bench: setup
	$(PY) bench/embed.py
	$(PY) bench/search.py
	$(PY) bench/serve.py
	$(PY) bench/finetune.py
	$(PY) bench/engines_eval.py

# every benchmark behind a claim at a tiny size, into a temp folder (bench/README.md): none can rot unseen
bench-smoke: setup
	$(PY) bench/smoke.py

# the installable package (README "Install"): build/dist/lakelens-VERSION-py3-none-any.whl
wheel: setup
	rm -rf build/dist build/lib build/bdist.*
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w build/dist .

lint: setup
	.venv/bin/ruff check lib jobs bench tests scripts

clean:
	rm -rf build .pytest_cache

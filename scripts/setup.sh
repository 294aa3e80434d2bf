#!/usr/bin/env bash
# One-time set-up on a fresh machine: system tools (Java, Maven), the .venv with pinned Python
# packages, the Delta Lake jars and the s3a jars. Re-running skips whatever is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need java || ! need mvn; then
  echo "[setup] installing Java and Maven from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless maven
fi
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Fashion-MNIST (Debian's dataset-fashion-mnist) for the second demo and its tests"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "[setup] installing Chromium and its driver from Debian's packages (the web page's browser tests)"
  as_root=""; [ "$(id -u)" -eq 0 ] || as_root="sudo -n"  # non-interactive: fail rather than prompt
  $as_root apt-get update -qq
  $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lakelens-requirements
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned Python packages into .venv"
  .venv/bin/pip install -q --upgrade pip
  # torch, torchvision and open_clip in one command, so pip cannot swap torch for another build
  .venv/bin/pip install -q -r requirements.txt
  # pyproject.toml, built by the pinned setuptools; its dependencies are the pins above
  .venv/bin/pip install -q --no-deps --no-build-isolation -e .
  .venv/bin/python -c "import torch, torchvision, open_clip, pyspark, delta, faiss"
  echo "$want" > "$stamp"
fi

if ! ls build/jars/delta-spark_*.jar >/dev/null 2>&1; then
  echo "[setup] fetching the Delta Lake jars into build/jars"
  mvn -B -q dependency:copy-dependencies -DoutputDirectory=build/jars
fi
# s3a:// support (hadoop-aws and the AWS SDK v2 modules it uses, pom.xml profile s3) in a folder of its
# own: lakelens adds it to a Spark session only when the session's config uses s3a
if ! ls build/jars/s3/hadoop-aws-*.jar >/dev/null 2>&1; then
  echo "[setup] fetching the s3a jars (hadoop-aws, AWS SDK v2) into build/jars/s3"
  rm -rf build/jars/s3.tmp
  mvn -B -q -Ds3 dependency:copy-dependencies -DoutputDirectory=build/jars/s3.tmp
  rm -rf build/jars/s3 && mv build/jars/s3.tmp build/jars/s3  # a run killed half-way leaves no partial set
fi
# a class-data-sharing archive of the Spark and Delta classes (lakelens.jvm): every Spark JVM lakelens
# starts maps it instead of loading them again (seconds per command); rebuilt when the JDK or jars change
if [ -z "$(.venv/bin/python -m lakelens.cli jvm-options)" ]; then  # none built for this JDK and these jars
  echo "[setup] building the JVM class archive (build/cds, about 40 s)"
  .venv/bin/python -m lakelens.jvm
fi
echo "[setup] ready: .venv, build/jars, build/jars/s3, build/cds"

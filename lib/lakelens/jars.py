"""Where the Delta jars (and the s3a ones) are: the configured folder, $LAKELENS_JARS_DIR, or a checkout's
build/jars (`make setup`); none found means sessions take them from Maven (spark.jars.packages)."""

from __future__ import annotations

import glob
import os
import re
import sys
from pathlib import Path

from lakelens.errors import ConfigError

# hadoop-aws with its AWS SDK modules, kept out of build/jars itself so that sessions without s3a (which
# ship spark.jars to every executor of a cluster) do not carry them
S3_JARS_SUBDIR = "s3"


def find_jars(jars_dir: str = "") -> list[str]:
    """Delta jars from the configured folder, $LAKELENS_JARS_DIR, or a checkout's build/jars; [] when there
    is none (then sessions take them from Maven: spark.jars.packages)."""
    folder = jars_folder(jars_dir)
    return sorted(glob.glob(os.path.join(folder, "*.jar"))) if folder else []


def jars_folder(jars_dir: str = "") -> str | None:
    """The first folder of `_jar_folders` that holds a delta-spark jar. A configured folder without one is
    a config error, not a reason to look elsewhere."""
    for folder in _jar_folders(jars_dir):
        if glob.glob(os.path.join(folder, "delta-spark*.jar")):
            return folder
        if folder == jars_dir:
            raise ConfigError(f"spark.jars_dir: no delta-spark jar in {jars_dir}")
    return None


def find_s3_jars(jars_dir: str = "") -> list[str]:
    """The s3a jars (hadoop-aws and the AWS SDK v2 modules it uses) from the s3/ folder beside the Delta
    jars (`make setup` fetches them into build/jars/s3); [] when there is none."""
    for folder in _jar_folders(jars_dir):
        jars = sorted(glob.glob(os.path.join(folder, S3_JARS_SUBDIR, "*.jar")))
        if any(os.path.basename(j).startswith("hadoop-aws-") for j in jars):
            return jars
    return []


def _jar_folders(jars_dir: str) -> list[str]:
    checkout = checkout_root()
    repo_jars = str(checkout / "build" / "jars") if checkout else ""
    return [f for f in (jars_dir, os.environ.get("LAKELENS_JARS_DIR", ""), repo_jars) if f]


def checkout_root() -> Path | None:
    """The lakelens source checkout that holds the current folder or this interpreter's venv (a folder
    with a pyproject.toml naming lakelens), where `make setup` put build/jars; None for an installed
    wheel used elsewhere. Never found from this file's location: that is site-packages once installed."""
    for start in (Path.cwd(), Path(sys.prefix)):
        for folder in (start, *start.parents):
            project = folder / "pyproject.toml"
            if project.is_file() and _PROJECT_NAME.search(project.read_text(errors="replace")):
                return folder
    return None


_PROJECT_NAME = re.compile(r'^name\s*=\s*"lakelens"\s*$', re.M)

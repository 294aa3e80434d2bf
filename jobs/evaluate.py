"""spark-submit entry point: `spark-submit jobs/evaluate.py --conf conf/local.yaml ...` (the flags of `lakelens eval`)."""

import sys

from lakelens.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))

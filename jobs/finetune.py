"""spark-submit entry point: `spark-submit jobs/finetune.py --conf conf/local.yaml ...` (the flags of `lakelens finetune`)."""

import sys

from lakelens.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))

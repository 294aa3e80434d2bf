"""spark-submit entry point of the dedup job: `spark-submit $(lakelens jars) jobs/dedup.py --table T --out DUPS [--index I]`."""

import sys

from lakelens.cli import main

if __name__ == "__main__":
    sys.exit(main(["dedup", *sys.argv[1:]]))

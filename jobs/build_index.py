"""spark-submit entry point of the index job: `spark-submit $(lakelens jars) jobs/build_index.py --table T --index I`."""

import sys

from lakelens.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))

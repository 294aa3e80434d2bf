"""spark-submit entry point of the tag job: `spark-submit $(lakelens jars) jobs/tag.py --table T --vocab V.csv --tags TAGS`."""

import sys

from lakelens.cli import main

if __name__ == "__main__":
    sys.exit(main(["tag", *sys.argv[1:]]))

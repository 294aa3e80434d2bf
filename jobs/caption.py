"""spark-submit entry point of the caption job: `spark-submit $(lakelens jars) jobs/caption.py --table T --tags TAGS`."""

import sys

from lakelens.cli import main

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))

"""spark-submit entry point of refresh (embed, then index):
`spark-submit $(lakelens jars) jobs/refresh.py --conf conf/local.yaml --images I --table T --index X`."""

import sys

from lakelens.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))

"""spark-submit entry point of the embed job: `spark-submit jobs/embed_images.py --conf conf/local.yaml --images ...`."""

import sys

from lakelens.cli import main

if __name__ == "__main__":
    # Same flags as `lakelens embed`; the parser lives in the library so the two cannot drift.
    sys.exit(main(["embed", *sys.argv[1:]]))

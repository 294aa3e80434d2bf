#!/usr/bin/env bash
# The one command cron and Airflow run (docs/scheduling.md): embed new and changed images of IMAGES into
# TABLE, then bring INDEX up to date. Prints one JSON line at the end; exit 0 when done or nothing
# changed, 2 on an expected failure (another refresh running, bad config), 1 on anything else.
#   scripts/refresh.sh IMAGES TABLE INDEX [more lakelens refresh flags]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 IMAGES TABLE INDEX [lakelens refresh flags]" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/.venv/bin/lakelens" refresh --conf "${LAKELENS_CONF:-$root/conf/local.yaml}" \
  --images "$1" --table "$2" --index "$3" "${@:4}"

#!/usr/bin/env bash
# Run the interop suite against real Dynamo releases (after scripts/setup-dynamo.sh):
#   scripts/dynamo-interop.sh                 # every release set up in .dynamo-venvs
#   scripts/dynamo-interop.sh 0.7.1 1.0.2     # chosen releases
# 0.6/0.7 and 1.1-1.5 advertise a non-loopback address, so they run inside a
# private network namespace (`unshare -n`, needs root) where only loopback
# exists; 0.8-1.0 and 1.6 are pinned to 127.0.0.1 by environment variables
# instead (and 1.0 refuses to start in a namespace without a non-loopback interface).
# Results are appended to .dynamo-venvs/results.jsonl and printed as a table.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${WORKERMON_DYNAMO_VENVS:-.dynamo-venvs}"
export WORKERMON_DYNAMO_VENVS="$(cd "$root" && pwd)"
py="${PYTHON:-$(command -v python)}"
releases=("$@")
if [ ${#releases[@]} -eq 0 ]; then
  for d in "$root"/*/; do [ -x "$d/bin/python" ] && releases+=("$(basename "$d")"); done
fi
status=0
for v in "${releases[@]}"; do
  major_minor=$(echo "$v" | cut -d. -f1,2)
  in_ns=no
  # 0.6/0.7 and 1.1-1.5 advertise the host's non-loopback address (1.1-1.5 take only an interface
  # name for their response stream): they run where lo is the only interface.
  if [ "$(printf '%s\n' "$major_minor" 0.8 | sort -V | head -1)" != "0.8" ]; then in_ns=yes; fi
  case "$major_minor" in 1.1|1.2|1.3|1.4|1.5) in_ns=yes ;; esac
  if [ "$in_ns" = yes ]; then
    if unshare -n true 2>/dev/null; then
      unshare -n sh -c "ip link set lo up && WORKERMON_DYNAMO_RELEASES=$v '$py' -m pytest -m dynamo tests/dynamo -q -p no:cacheprovider" || status=1
    else
      echo "Dynamo $v needs a private network namespace (unshare -n as root); skipped" >&2
    fi
  else
    WORKERMON_DYNAMO_RELEASES=$v "$py" -m pytest -m dynamo tests/dynamo -q -p no:cacheprovider || status=1
  fi
done
"$py" -m tests.dynamo.report "$WORKERMON_DYNAMO_VENVS/results.jsonl"
exit $status

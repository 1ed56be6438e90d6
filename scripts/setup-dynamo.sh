#!/usr/bin/env bash
# Make one virtual environment per Dynamo release for the interop suite:
#   scripts/setup-dynamo.sh                 # one release per minor, 0.6.1 … 1.6.1
#   scripts/setup-dynamo.sh 1.6.1 0.7.1     # chosen releases
# Environments go to $WORKERMON_DYNAMO_VENVS (default: .dynamo-venvs/<release>).
set -euo pipefail
cd "$(dirname "$0")/.."
root="${WORKERMON_DYNAMO_VENVS:-.dynamo-venvs}"
releases=("$@")
[ ${#releases[@]} -gt 0 ] || releases=(0.6.1 0.7.1 0.8.1 0.9.1 1.0.2 1.1.1 1.2.1 1.3.1 1.4.2 1.5.1 1.6.1)
mkdir -p "$root"
for v in "${releases[@]}"; do
  venv="$root/$v"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import dynamo.mocker, dynamo.frontend" 2>/dev/null; then
    echo "Dynamo $v: ready in $venv"; continue
  fi
  echo "Dynamo $v: installing into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  case "$v" in
    1.5.*|1.6.*)
      # Their aisimulate dependency does not build without nvidia-smi; the mocker runs without it.
      "$venv/bin/pip" install -q --no-deps "ai-dynamo-runtime==$v" "ai-dynamo==$v"
      "$venv/bin/pip" install -q 'pydantic>=2.10.6,<=2.13.5' uvloop 'aiohttp>=3.14.3,<4' msgspec \
        prometheus-client pyzmq 'redis>=6.2,<9' tqdm 'transformers>=4.56' typing-extensions \
        'zstandard>=0.23,<1' 'kubernetes>=32.0.1,<33' ;;
    *)
      "$venv/bin/pip" install -q "ai-dynamo==$v" ;;
  esac
  "$venv/bin/python" -c "import dynamo.mocker, dynamo.frontend" && echo "Dynamo $v: ready"
done

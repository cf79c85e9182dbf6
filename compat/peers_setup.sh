#!/usr/bin/env bash
# Creates compat/.venv-peers with the pinned peer scanners and prints its python.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-peers"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import modelaudit, c4nary, pillar_gguf_scanner" 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q -r "$here/requirements-peers.txt" >&2
fi
echo "$venv/bin/python"

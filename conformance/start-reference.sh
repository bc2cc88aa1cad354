#!/usr/bin/env bash
# Install (if needed) and start the Node reference server for benchmarks.
#   conformance/start-reference.sh --port P [--data-dir D] [--long-poll-timeout MS]
# --data-dir => file-backed mode; no data dir => memory mode. Runs in the foreground (exec),
# so the caller's PID is the server's PID.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ ! -d "$here/node_modules/@durable-streams/server" ]; then
  (cd "$here" && npm ci --no-audit --no-fund >&2)
fi
# Let the server hold many idle connections (bounded by the hard limit we are given).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec node "$here/reference-server.mjs" "$@"

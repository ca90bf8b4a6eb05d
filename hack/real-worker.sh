#!/usr/bin/env bash
# Installs, once per machine, the real Kubiya agent worker from PyPI (kubiya-control-plane-api,
# pinned with everything it imports, and hashed, in hack/real-worker.txt) into a venv cached outside the repo,
# and prints the path of its console script `kubiya-control-plane-worker` on stdout (progress goes
# to stderr). tests/integration/test_real_worker.py runs it against the operator.
#
# The package is AGPL-3.0: it is only installed and run here, never copied into this repo or its image.
# If WQ_REAL_WORKER names an executable, it is used and nothing is installed.
set -euo pipefail

log() { printf '[real-worker] %s\n' "$*" >&2; }

if [[ -n "${WQ_REAL_WORKER:-}" && -x "${WQ_REAL_WORKER}" ]]; then
  echo "$WQ_REAL_WORKER"
  exit 0
fi

HERE="$(cd "$(dirname "$0")" && pwd)"
LOCK="$HERE/real-worker.txt"
PYTHON="${PYTHON:-python3}"
CACHE_ROOT="${WQ_ASSETS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/workerqueue-operator}"
# Keyed by the lock's content and the Python that runs it: a changed pin makes a new venv.
KEY="real-worker-$("$PYTHON" -c 'import sys; print("py%d.%d" % sys.version_info[:2])')-$(sha256sum "$LOCK" | cut -c1-12)"
VENV="$CACHE_ROOT/$KEY"
WORKER="$VENV/bin/kubiya-control-plane-worker"

if [[ -x "$WORKER" && -f "$VENV/.installed" ]]; then
  echo "$WORKER"
  exit 0
fi

mkdir -p "$CACHE_ROOT"
# One install at a time per machine; the one that waited finds it installed.
exec 9>"$CACHE_ROOT/$KEY.lock"
flock 9
if [[ -x "$WORKER" && -f "$VENV/.installed" ]]; then
  echo "$WORKER"
  exit 0
fi
log "installing the real worker into $VENV (about a minute, 1.1 GB)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# The lock's hashes put pip in --require-hashes mode: a file that differs from PyPI's is refused.
"$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --require-hashes -r "$LOCK" >&2
"$VENV/bin/pip" check >&2 || log "pip check reports the package's own loose pins (above); the lock is what was tested"
touch "$VENV/.installed"
echo "$WORKER"

#!/usr/bin/env bash
# The two set-up commands. Each creates the environment (.venv from requirements.txt) when it is missing or stale.
#   ./run.sh app  [--model PATH_OR_ID] [--port N]   launch the dashboard on 127.0.0.1
#   ./run.sh test [pytest args]                      run the test suite (offline)
#   ./run.sh bench [args]                            run the benchmarks (python -m mars_viz bench ...)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP="$VENV/.requirements.sha"
want=$(sha256sum requirements.txt | cut -d' ' -f1)

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating $VENV with $PY" >&2
    "$PY" -m venv "$VENV"
  fi
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "[run.sh] installing requirements.txt into $VENV (about 2 min the first time)" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
    echo "$want" > "$STAMP"
  fi
}

ensure_chromium() {
  # Browser tests drive Debian's chromium with Playwright; install it when we can, else those tests skip.
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[run.sh] installing Debian chromium for the browser tests" >&2
    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) \
      || echo "[run.sh] could not install chromium; browser tests will be skipped" >&2
  fi
}

cmd=${1:-}
shift || true
export TOKENIZERS_PARALLELISM=false
case "$cmd" in
  app)
    ensure_venv
    export GRADIO_ANALYTICS_ENABLED=False
    exec "$VENV/bin/python" app.py "$@" ;;
  test)
    ensure_venv
    ensure_chromium
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
    exec "$VENV/bin/python" -m pytest "$@" ;;
  bench)
    ensure_venv
    export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
    exec "$VENV/bin/python" -m mars_viz bench "$@" ;;
  *)
    echo "usage: ./run.sh {app|test|bench} [args]" >&2; exit 2 ;;
esac

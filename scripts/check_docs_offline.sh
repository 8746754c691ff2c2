#!/usr/bin/env bash
# Does the Rx's /docs render with no internet? Starts an Rx on free ports, screenshots /docs and
# /redoc with headless Chromium (apt-get install chromium), and lists every URL the pages asked
# for that is not the Rx itself (there must be none).
#   bash scripts/check_docs_offline.sh [OUT_DIR]     # writes OUT_DIR/docs.png, OUT_DIR/redoc.png
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/splitvlm-docs}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/splitvlm rx serve --grpc-port 0 --http-port "$port" --log-level warning 2>"$out/rx.log" &
rx=$!
trap 'kill $rx 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  sleep 1
done
for page in docs redoc; do
  # --virtual-time-budget lets the page's scripts run and fetch /openapi.json before the shot.
  chromium --headless --no-sandbox --disable-gpu --window-size=1280,1000 --virtual-time-budget=8000 \
    --screenshot="$out/$page.png" "http://127.0.0.1:$port/$page" >/dev/null 2>&1
  external=$(curl -s "http://127.0.0.1:$port/$page" | grep -Eo '(src|href)="[^"]*"' | grep -E '"(https?:)?//' || true)
  echo "$page: screenshot $out/$page.png; external asset URLs: ${external:-none}"
done

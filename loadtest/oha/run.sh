#!/usr/bin/env bash
# Raw throughput and latency with oha (closed model: N connections as fast as they go),
# then a fixed-rate run (open model) for latency at a load the target can sustain.
#
#   loadtest/oha/run.sh                                    # http://127.0.0.1:8000/api/data/products
#   URL=http://127.0.0.1:8000/api/data/underlying/NIFTY CONNS=64 DURATION=15 RATE=2000 loadtest/oha/run.sh
#
# oha is installed with `cargo install oha` when missing. Only 127.0.0.1 targets are allowed.
set -euo pipefail
URL=${URL:-http://127.0.0.1:8000/api/data/products}
CONNS=${CONNS:-64}
SECONDS_=${DURATION:-15}
RATE=${RATE:-2000}
CPU=${CPU:-}            # e.g. CPU=0 pins oha to core 0 (taskset)

case $URL in
    http://127.0.0.1:*|http://localhost:*) ;;
    *) echo "refusing to load $URL: only 127.0.0.1 / localhost" >&2; exit 2 ;;
esac
command -v oha >/dev/null || { echo "installing oha (cargo install oha)" >&2; cargo install oha --locked; }
pin=()
[ -n "$CPU" ] && pin=(taskset -c "$CPU")

echo "== closed model: $CONNS connections, ${SECONDS_}s"
"${pin[@]}" oha --no-tui -c "$CONNS" -z "${SECONDS_}s" "$URL"
echo
echo "== open model: $RATE req/s, ${SECONDS_}s"
"${pin[@]}" oha --no-tui -c "$CONNS" -q "$RATE" -z "${SECONDS_}s" --latency-correction "$URL"

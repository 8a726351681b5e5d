# Shared by loadtest/profile, cpu-per-request and instructions-per-request (sourced): a free
# port, the static nginx backend they proxy to, and the one-route gateway config of a variant.
# The caller sets WORK (a scratch directory), HERE (loadtest/) and PIDS (pids to kill on exit).

# A free loopback port.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_backend [CPU]: nginx answering {"ok":true} from memory on a free port (BP), pinned to
# CPU when one is given; also on BP2 and BP3 (the `lb` variant's other two instances).
start_backend() {
    BP=$(port); BP2=$(port); BP3=$(port)
    cat >"$WORK/b.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/b.pid; error_log $WORK/b.err warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK;
  uwsgi_temp_path $WORK; scgi_temp_path $WORK; keepalive_requests 10000000;
  server { listen 127.0.0.1:$BP; listen 127.0.0.1:$BP2; listen 127.0.0.1:$BP3; location / { default_type application/json; return 200 '{"ok":true}'; } } }
CONF
    if [ -n "${1:-}" ]; then
        taskset -c "$1" nginx -p "$WORK" -c "$WORK/b.conf" -e "$WORK/b.err" &
    else
        nginx -p "$WORK" -c "$WORK/b.conf" -e "$WORK/b.err" &
    fi
    PIDS+=($!)
}

# gateway_config VARIANT PORT ADMIN_PORT: the bench's one-route config to the backend on
# stdout (`cache`: the route caches, so every request after the first is a HIT; `lb`: the
# upstream is 3 instances, the backend's 3 ports; `limiter`: an in-process rate-limit policy
# that never denies). EXTRA_CONFIG, when set, is appended (it lands inside the [[routes]]
# entry, so route keys such as `retries = 0` work, and so do whole tables such as
# `[upstreams.backend.breaker]`): for measuring what one setting costs.
gateway_config() {
    local cache='' rate_limit='[]' extra=${EXTRA_CONFIG:-}
    local upstream="url = \"http://127.0.0.1:$BP\""
    case $1 in
        cache) cache='cache = { ttl = "1h" }' ;;
        lb) upstream="urls = [\"http://127.0.0.1:$BP\", \"http://127.0.0.1:$BP2\", \"http://127.0.0.1:$BP3\"]" ;;
        limiter)
            rate_limit='["bench"]'
            extra="$extra
[[rate_limit.policies]]
name = \"bench\"
limit = 1000000000
window = \"60s\"" ;;
    esac
    sed -e "s|@PORT@|$2|" -e "s|@ADMIN@|$3|" -e "s|@UPSTREAM@|$upstream|" -e "s|@VARIANT@|$1|" \
        -e "s|@RATE_LIMIT@|$rate_limit|" -e "s|@CACHE@|$cache|" "$HERE/bench.d/gateway.toml.in" |
        awk -v extra="$extra" '{ if ($0 == "@EXTRA@") print extra; else print }'
}

# Shared by loadtest/profile, cpu-per-request and instructions-per-request (sourced): a free
# port, the static nginx backend they proxy to, and the one-route gateway config of a variant.
# The caller sets WORK (a scratch directory), HERE (loadtest/) and PIDS (pids to kill on exit).

# A free loopback port.
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_backend [CPU]: nginx answering {"ok":true} from memory on a free port (BP), pinned to
# CPU when one is given.
start_backend() {
    BP=$(port)
    cat >"$WORK/b.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/b.pid; error_log $WORK/b.err warn;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK;
  uwsgi_temp_path $WORK; scgi_temp_path $WORK; keepalive_requests 10000000;
  server { listen 127.0.0.1:$BP; location / { default_type application/json; return 200 '{"ok":true}'; } } }
CONF
    if [ -n "${1:-}" ]; then
        taskset -c "$1" nginx -p "$WORK" -c "$WORK/b.conf" -e "$WORK/b.err" &
    else
        nginx -p "$WORK" -c "$WORK/b.conf" -e "$WORK/b.err" &
    fi
    PIDS+=($!)
}

# gateway_config VARIANT PORT ADMIN_PORT: the bench's one-route config to the backend on
# stdout (`cache`: the route caches, so every request after the first is a HIT).
gateway_config() {
    local cache=''
    [ "$1" = cache ] && cache='cache = { ttl = "1h" }'
    sed -e "s|@PORT@|$2|" -e "s|@ADMIN@|$3|" -e "s|@BACKEND@|$BP|" -e "s|@VARIANT@|$1|" \
        -e "s|@RATE_LIMIT@|[]|" -e "s|@CACHE@|$cache|" -e "s|@EXTRA@||" "$HERE/bench.d/gateway.toml.in"
}

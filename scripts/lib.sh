# Shared by scripts/stack-* and chaos/run (sourced, not executed).
# Compose: `docker compose` (v2 plugin) when present, else `docker-compose` (1.29 here).
# The project name and file list come from COMPOSE_PROJECT_NAME / COMPOSE_FILE, which both
# implementations read.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-deltastream}"
export COMPOSE_FILE="${COMPOSE_FILE:-$ROOT/docker-compose.yml}"

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  echo "neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi

compose() { (cd "$ROOT" && "${COMPOSE[@]}" "$@"); }

# Waits until every container of the project reports healthy (or has no health check and
# is running). $1: timeout in seconds.
wait_healthy() {
  local deadline=$((SECONDS + ${1:-120})) ids states bad
  while :; do
    ids=$(compose ps -q)
    if [ -n "$ids" ]; then
      states=$(docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' $ids)
      bad=$(echo "$states" | awk '!($2=="running" && ($3=="healthy" || $3=="none"))')
      if [ -z "$bad" ]; then
        echo "$states" | sed 's/^/  /'
        return 0
      fi
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "not healthy after ${1:-120}s:" >&2
      echo "${bad:-no containers}" | sed 's/^/  /' >&2
      return 1
    fi
    sleep 1
  done
}

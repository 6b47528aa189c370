#!/usr/bin/env bash
# Usage: bash scripts/start_coordinator.sh [fedmoe coordinator flags, e.g. --port 5000 --base-model tiny]
#
# Starts `fedmoe coordinator` in the background (own session, survives this shell), appends
# its output to logs/coordinator.log, writes run/coordinator.pid and waits until
# GET /healthz answers (FEDMOE_START_TIMEOUT seconds, default 120).
# Host and port come from --host/--port, else FEDMOE_HOST/FEDMOE_PORT, else 127.0.0.1:5000.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

PIDFILE="$RUN_DIR/coordinator.pid"
URLFILE="$RUN_DIR/coordinator.url"
LOGFILE="$LOG_DIR/coordinator.log"
START_TIMEOUT="${FEDMOE_START_TIMEOUT:-120}"
[[ "$START_TIMEOUT" =~ ^[0-9]+$ ]] || die "FEDMOE_START_TIMEOUT must be whole seconds"

host="${FEDMOE_HOST:-}"
port="${FEDMOE_PORT:-5000}"
scheme=http
[[ -n "${FEDMOE_SSL_CERTFILE:-}" ]] && scheme=https
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    next="${args[i + 1]:-}"
    case "${args[i]}" in
        --host) host="$next" ;;
        --host=*) host="${args[i]#--host=}" ;;
        --port) port="$next" ;;
        --port=*) port="${args[i]#--port=}" ;;
        --ssl-certfile | --ssl-certfile=*) scheme=https ;;
        -h | --help) exec "${FEDMOE[@]}" coordinator --help ;;
    esac
done
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

# Where to reach it from this machine: a wildcard listen address is reached on loopback.
url_for() {
    local h="$1"
    case "$h" in
        "" | 0.0.0.0) h=127.0.0.1 ;;
        "::" | "[::]") h="[::1]" ;;
        *:*) [[ "$h" == \[* ]] || h="[$h]" ;;
    esac
    printf '%s://%s:%s' "$scheme" "$h" "$2"
}

healthy() {
    local url="$1/healthz"
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -k --max-time 2 -o /dev/null "$url" 2>/dev/null
    else
        local py=python3
        [[ -x "$ROOT/.venv/bin/python" ]] && py="$ROOT/.venv/bin/python"
        "$py" - "$url" <<'EOF' 2>/dev/null
import ssl
import sys
import urllib.request

context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
with urllib.request.urlopen(sys.argv[1], timeout=2, context=context) as response:
    sys.exit(0 if response.status == 200 else 1)
EOF
    fi
}

claim_pidfile "$PIDFILE" coordinator
URL="$(url_for "$host" "$port")"
if [[ "$port" != 0 ]] && healthy "$URL"; then
    die "something already answers at $URL/healthz (another coordinator?); use another --port"
fi

mkdir -p "$LOG_DIR"
offset="$(file_size "$LOGFILE")"
launch "$PIDFILE" "$LOGFILE" "${FEDMOE[@]}" coordinator "$@"
PID="$(read_pidfile "$PIDFILE")"
where="$URL/healthz"
[[ "$port" == 0 ]] && where="/healthz on the port the OS picks"
log "coordinator: starting (pid $PID), waiting up to ${START_TIMEOUT}s for $where"

deadline=$((SECONDS + START_TIMEOUT))
while :; do
    if ! is_our_process "$PID"; then
        rm -f "$PIDFILE"
        log "coordinator: the process exited during start-up"
        log_tail "$LOGFILE" "$offset" 30 >&2
        exit 1
    fi
    if [[ "$port" == 0 ]]; then
        # --port 0: the OS picked the port; uvicorn logs it
        line="$(tail -c "+$((offset + 1))" "$LOGFILE" | grep -o 'Uvicorn running on [^ ]*' | tail -n 1 || true)"
        [[ -n "$line" ]] && URL="$(url_for "$host" "${line##*:}")"
    fi
    if { [[ "$port" != 0 ]] || [[ "$URL" != *:0 ]]; } && healthy "$URL"; then
        break
    fi
    if ((SECONDS >= deadline)); then
        log "coordinator: not healthy after ${START_TIMEOUT}s; still running as pid $PID" >&2
        log "  wait longer (bash scripts/status.sh) or stop it (bash scripts/stop_coordinator.sh)" >&2
        log_tail "$LOGFILE" "$offset" 30 >&2
        exit 1
    fi
    sleep 0.5
done

printf '%s\n' "$URL" >"$URLFILE"
log "coordinator: running at $URL"
log "  pid $PID ($PIDFILE)"
log "  log $LOGFILE"

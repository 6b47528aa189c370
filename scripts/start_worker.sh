#!/usr/bin/env bash
# Usage: bash scripts/start_worker.sh --worker-id ID --specialty NAME --dataset FILE.jsonl \
#            [--coordinator-url URL] [--sync-interval 10.0] [...any fedmoe worker flags]
#
# Starts `fedmoe worker` in the background (own session, survives this shell), appends its
# output to logs/worker-ID.log and writes run/worker-ID.pid. It then watches the start-up
# (up to FEDMOE_WORKER_CHECK_TIMEOUT seconds, default 30): a worker that exits (bad
# dataset line, bad flag, ...) makes this script print the log tail and exit 1. The
# worker writes run/worker-ID.ready (--ready-file) once it is registered and has pulled
# its expert, and removes it when it exits.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CHECK_TIMEOUT="${FEDMOE_WORKER_CHECK_TIMEOUT:-30}"
[[ "$CHECK_TIMEOUT" =~ ^[0-9]+$ ]] || die "FEDMOE_WORKER_CHECK_TIMEOUT must be whole seconds"

worker_id=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --worker-id) worker_id="${args[i + 1]:-}" ;;
        --worker-id=*) worker_id="${args[i]#--worker-id=}" ;;
        -h | --help) exec "${FEDMOE[@]}" worker --help ;;
    esac
done
[[ -n "$worker_id" ]] || die "--worker-id is required (usage: $0 --worker-id ID --specialty NAME --dataset FILE [...])"
# the same rule as the worker itself; it also keeps the id safe as a file name
[[ "$worker_id" =~ ^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$ ]] ||
    die "--worker-id must match ^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}\$, got '$worker_id'"

NAME="worker $worker_id"
PIDFILE="$RUN_DIR/worker-$worker_id.pid"
LOGFILE="$LOG_DIR/worker-$worker_id.log"
READYFILE="$RUN_DIR/worker-$worker_id.ready"

claim_pidfile "$PIDFILE" "$NAME"
mkdir -p "$LOG_DIR"
offset="$(file_size "$LOGFILE")"
rm -f "$READYFILE"
launch "$PIDFILE" "$LOGFILE" "${FEDMOE[@]}" worker "$@" --ready-file "$READYFILE"
PID="$(read_pidfile "$PIDFILE")"
log "$NAME: starting (pid $PID), checking its start-up for up to ${CHECK_TIMEOUT}s"

# Done when the worker has written its ready file (data loaded, registered, expert pulled),
# or after CHECK_TIMEOUT seconds alive (e.g. still waiting for the coordinator, which it
# retries).
started=$SECONDS
state="still starting up"
while :; do
    if ! is_our_process "$PID"; then
        rm -f "$PIDFILE" "$READYFILE"
        log "$NAME: the process exited during start-up" >&2
        log_tail "$LOGFILE" "$offset" 30 >&2
        exit 1
    fi
    elapsed=$((SECONDS - started))
    if [[ -s "$READYFILE" ]]; then
        state="training"
        break
    fi
    ((elapsed >= CHECK_TIMEOUT)) && break
    sleep 0.5
done

log "$NAME: running ($state)"
if [[ "$state" != training ]]; then
    last="$(tail -c "+$((offset + 1))" "$LOGFILE" 2>/dev/null | tail -n 1 || true)"
    if [[ -n "$last" ]]; then
        log "  last log line: $last"
    fi
fi
log "  pid $PID ($PIDFILE)"
log "  log $LOGFILE"

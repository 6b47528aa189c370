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
#
# --nproc-per-node N (N > 1) trains on N processes of this machine with PyTorch DDP: the
# worker runs under `torchrun --standalone --nproc-per-node N -m fedmoe worker ...` (one
# rank per GPU, or N CPU processes); the pid file holds torchrun's pid, and stopping it
# stops every rank after rank 0's final upload.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

CHECK_TIMEOUT="${FEDMOE_WORKER_CHECK_TIMEOUT:-30}"
[[ "$CHECK_TIMEOUT" =~ ^[0-9]+$ ]] || die "FEDMOE_WORKER_CHECK_TIMEOUT must be whole seconds"

worker_id=""
nproc=1
args=("$@")
worker_args=()
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --worker-id) worker_id="${args[i + 1]:-}" ;;
        --worker-id=*) worker_id="${args[i]#--worker-id=}" ;;
        --nproc-per-node)
            nproc="${args[i + 1]:-}"
            i=$((i + 1))
            continue
            ;;
        --nproc-per-node=*)
            nproc="${args[i]#--nproc-per-node=}"
            continue
            ;;
        -h | --help) exec "${FEDMOE[@]}" worker --help ;;
    esac
    worker_args+=("${args[i]}")
done
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a whole number >= 1, got '$nproc'"
WORKER=("${FEDMOE[@]}" worker)
if ((nproc > 1)); then
    python="python3"
    [[ -x "$ROOT/.venv/bin/python" ]] && python="$ROOT/.venv/bin/python"
    WORKER=("$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m fedmoe worker)
fi
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
launch "$PIDFILE" "$LOGFILE" "${WORKER[@]}" "${worker_args[@]}" --ready-file "$READYFILE"
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

# shellcheck shell=bash disable=SC2034
# Shared helpers for the FedMoE start/stop/status scripts.
# Usage (from another script): source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
#
# Environment:
#   FEDMOE_RUN_DIR   where pid files go   (default: <repo>/run)
#   FEDMOE_LOG_DIR   where logs go        (default: <repo>/logs)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${FEDMOE_RUN_DIR:-$ROOT/run}"
LOG_DIR="${FEDMOE_LOG_DIR:-$ROOT/logs}"

# The fedmoe command line, as an array: the repo's virtualenv, else `fedmoe` on PATH,
# else `python3 -m fedmoe` from the repo checkout.
if [[ -x "$ROOT/.venv/bin/fedmoe" ]]; then
    FEDMOE=("$ROOT/.venv/bin/fedmoe")
elif command -v fedmoe >/dev/null 2>&1; then
    FEDMOE=("$(command -v fedmoe)")
else
    FEDMOE=(python3 -m fedmoe)
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

log() { printf '%s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# The command line of PID as one string ("" when it is gone or a zombie).
cmdline_of() {
    local pid="$1"
    if [[ -r "/proc/$pid/cmdline" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true
    else
        ps -p "$pid" -o command= 2>/dev/null || true
    fi
}

# True when PID is alive and is a fedmoe process (so a recycled pid is never signalled).
is_our_process() {
    local pid="$1"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(cmdline_of "$pid")" == *fedmoe* ]]
}

# True while PID has not finished exiting. An exiting process loses its cmdline before it
# is gone, so waiting on is_our_process alone could report "stopped" a moment too early.
still_exists() {
    local pid="$1" stat=""
    kill -0 "$pid" 2>/dev/null || return 1
    if [[ -r "/proc/$pid/stat" ]]; then
        read -r stat <"/proc/$pid/stat" 2>/dev/null || true
        stat="${stat##*) }"
        [[ "${stat%% *}" != Z ]] # a zombie has exited (its parent may never reap it)
    fi
}

# The pid stored in FILE, or "" when the file is missing or holds no number.
read_pidfile() {
    local pid=""
    if [[ -f "$1" ]]; then
        read -r pid <"$1" 2>/dev/null || true
    fi
    if [[ "$pid" =~ ^[0-9]+$ ]]; then
        printf '%s' "$pid"
    fi
}

# True when FILE names a live fedmoe process.
pidfile_running() {
    local pid
    pid="$(read_pidfile "$1")"
    [[ -n "$pid" ]] && is_our_process "$pid"
}

# Refuse to start NAME if FILE names a live fedmoe process; remove it when stale.
claim_pidfile() {
    local file="$1" name="$2" pid
    [[ -e "$file" ]] || return 0
    pid="$(read_pidfile "$file")"
    if [[ -n "$pid" ]] && is_our_process "$pid"; then
        die "$name is already running (pid $pid, pid file $file); stop it first"
    fi
    log "$name: removing stale pid file $file${pid:+ (pid $pid is not a running fedmoe process)}"
    rm -f "$file"
}

# stop_pidfile FILE NAME TIMEOUT: SIGTERM the process in FILE, wait up to TIMEOUT seconds,
# SIGKILL only as a last resort; the pid file is removed in every case.
stop_pidfile() {
    local file="$1" name="$2" timeout="$3" pid waited=0
    [[ "$timeout" =~ ^[0-9]+$ ]] || die "$name: the stop timeout must be whole seconds, got '$timeout'"
    if [[ ! -e "$file" ]]; then
        log "$name: not running (no pid file)"
        return 0
    fi
    pid="$(read_pidfile "$file")"
    if [[ -z "$pid" ]] || ! is_our_process "$pid"; then
        log "$name: not running; removed stale pid file $file${pid:+ (pid $pid is not a running fedmoe process)}"
        rm -f "$file"
        return 0
    fi
    log "$name: stopping pid $pid (SIGTERM, waiting up to ${timeout}s)"
    kill -TERM "$pid" 2>/dev/null || true
    # poll every 0.2 s: 5 polls a second
    while still_exists "$pid" && ((waited < timeout * 5)); do
        sleep 0.2
        waited=$((waited + 1))
    done
    if is_our_process "$pid"; then
        log "$name: still running after ${timeout}s; sending SIGKILL to pid $pid"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    else
        log "$name: stopped"
    fi
    rm -f "$file"
}

# launch PIDFILE LOGFILE CMD...: run CMD in the background, detached from this shell
# (own session, SIGHUP ignored, stdin from /dev/null), output appended to LOGFILE.
# The child writes its own pid to PIDFILE before exec'ing CMD (so it is CMD's pid).
launch() {
    local pidfile="$1" logfile="$2" i
    shift 2
    mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
    rm -f "$pidfile"
    local detach=()
    command -v setsid >/dev/null 2>&1 && detach=(setsid)
    # COLUMNS: rich wraps messages at 80 columns when writing to a file; keep them whole.
    # shellcheck disable=SC2016  # $$ and "$@" are for the inner bash
    COLUMNS="${FEDMOE_LOG_COLUMNS:-200}" ${detach[@]+"${detach[@]}"} nohup bash -c \
        'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pidfile" "$@" \
        </dev/null >>"$logfile" 2>&1 &
    for ((i = 0; i < 100; i++)); do
        [[ -s "$pidfile" ]] && return 0
        sleep 0.05
    done
    die "the process did not start (no pid file $pidfile); see $logfile"
}

# Print the last LINES lines of LOGFILE written since byte OFFSET (default: whole file).
log_tail() {
    local logfile="$1" offset="${2:-0}" lines="${3:-30}"
    log "---- last lines of $logfile ----"
    tail -c "+$((offset + 1))" "$logfile" 2>/dev/null | tail -n "$lines" || true
    log "----"
}

file_size() {
    if [[ -f "$1" ]]; then wc -c <"$1" | tr -d ' '; else echo 0; fi
}

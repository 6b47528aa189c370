#!/usr/bin/env bash
# Usage: bash scripts/status.sh [fedmoe status flags, e.g. --json or --coordinator-url URL]
#
# Lists the processes started by the start scripts (running/stopped), then runs
# `fedmoe status`. The coordinator URL is --coordinator-url, else FEDMOE_COORDINATOR_URL,
# else the URL start_coordinator.sh recorded for the running coordinator, else
# http://127.0.0.1:${FEDMOE_PORT:-5000}. FEDMOE_AUTH_TOKEN is used when set.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

json=0
has_url=0
for arg in "$@"; do
    case "$arg" in
        --json) json=1 ;;
        --coordinator-url | --coordinator-url=*) has_url=1 ;;
        -h | --help) exec "${FEDMOE[@]}" status --help ;;
    esac
done

if ((!json)); then
    shopt -s nullglob
    files=("$RUN_DIR"/coordinator.pi[d] "$RUN_DIR"/worker-*.pid)
    if ((${#files[@]} == 0)); then
        log "no processes started by the scripts ($RUN_DIR has no pid files)"
    fi
    for file in ${files[@]+"${files[@]}"}; do
        name="${file##*/}"
        name="${name%.pid}"
        pid="$(read_pidfile "$file")"
        if [[ -n "$pid" ]] && is_our_process "$pid"; then
            printf '%-32s running  pid %s\n' "$name" "$pid"
        else
            printf '%-32s stopped  (stale pid file %s)\n' "$name" "$file"
        fi
    done
    echo
fi

if ((!has_url)) && [[ -z "${FEDMOE_COORDINATOR_URL:-}" ]]; then
    url="http://127.0.0.1:${FEDMOE_PORT:-5000}"
    if [[ -s "$RUN_DIR/coordinator.url" ]] && pidfile_running "$RUN_DIR/coordinator.pid"; then
        read -r url <"$RUN_DIR/coordinator.url"
    fi
    export FEDMOE_COORDINATOR_URL="$url"
fi
exec "${FEDMOE[@]}" status "$@"

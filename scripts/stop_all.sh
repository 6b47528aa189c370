#!/usr/bin/env bash
# Usage: bash scripts/stop_all.sh
#
# Stops every worker started by start_worker.sh (all at once, each making its final
# upload; FEDMOE_STOP_TIMEOUT seconds each, default 60), then the coordinator.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

(($# == 0)) || die "usage: $0 (no arguments)"
shopt -s nullglob
pids=()
for file in "$RUN_DIR"/worker-*.pid; do
    id="${file##*/worker-}"
    stop_pidfile "$file" "worker ${id%.pid}" "${FEDMOE_STOP_TIMEOUT:-60}" &
    pids+=("$!")
done
status=0
for pid in ${pids[@]+"${pids[@]}"}; do
    wait "$pid" || status=1
done
((${#pids[@]})) || log "no workers to stop"
bash "$ROOT/scripts/stop_coordinator.sh" || status=1
exit "$status"

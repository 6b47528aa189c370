#!/usr/bin/env bash
# Usage: bash scripts/stop_worker.sh --worker-id ID
#
# Stops the worker started by start_worker.sh with that id: SIGTERM (the worker finishes
# its step, makes one final upload and exits), then waits up to FEDMOE_STOP_TIMEOUT
# seconds (default 60); SIGKILL only if it is still running after that.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

worker_id=""
while (($#)); do
    case "$1" in
        --worker-id)
            worker_id="${2:-}"
            shift
            ;;
        --worker-id=*) worker_id="${1#--worker-id=}" ;;
        -h | --help)
            sed -n 2p "$0"
            exit 0
            ;;
        *) die "unknown argument '$1' (usage: $0 --worker-id ID)" ;;
    esac
    shift
done
[[ -n "$worker_id" ]] || die "--worker-id is required (usage: $0 --worker-id ID)"
[[ "$worker_id" != */* ]] || die "invalid worker id '$worker_id'"

stop_pidfile "$RUN_DIR/worker-$worker_id.pid" "worker $worker_id" "${FEDMOE_STOP_TIMEOUT:-60}"
rm -f "$RUN_DIR/worker-$worker_id.ready" # the worker removes it itself unless it was killed

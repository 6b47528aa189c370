#!/usr/bin/env bash
# Usage: bash scripts/stop_coordinator.sh
#
# Stops the coordinator started by start_coordinator.sh: SIGTERM (it saves its state and
# exits), waits up to FEDMOE_COORDINATOR_STOP_TIMEOUT seconds (default 30), SIGKILL only
# if it is still running after that. Stop the workers first (stop_all.sh does) so that
# their final uploads reach it.
set -euo pipefail
# shellcheck source=scripts/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

(($# == 0)) || die "usage: $0 (no arguments)"
stop_pidfile "$RUN_DIR/coordinator.pid" coordinator "${FEDMOE_COORDINATOR_STOP_TIMEOUT:-30}"
rm -f "$RUN_DIR/coordinator.url"

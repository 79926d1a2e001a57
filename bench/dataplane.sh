#!/bin/sh
# Data-plane benchmark on a throwaway namespace lab (root; iperf3, ping, bridge).
# Not run in CI. Usage:
#   bench/dataplane.sh [--debug] [--hosts N] [--endpoints N] [--remote N]
#                      [--scale-endpoints N] [--rounds N]
# Builds the workspace (release by default) and runs overlay-bench, which prints a table
# (progress on stderr). What each figure measures: tests/src/bin/overlay-bench.rs.
set -eu
cd "$(dirname "$0")/.."
exec ./bench/build-and-run.sh overlay-bench "$@"

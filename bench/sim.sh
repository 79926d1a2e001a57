#!/bin/sh
# Control-plane scale simulation: N simulated agents (TLS, each with its own agent
# certificate) against a real 3-member controller cluster on loopback. No root needed.
# Not run in CI. Usage:
#   bench/sim.sh [--debug] [--agents N] [--endpoints N] [--networks N] [--span N]
#                [--changes N] [--steady-secs N] [--silence N] [--restart 0|1]
# Builds the workspace (release by default) and runs overlay-sim, which prints a table
# (progress on stderr). What each figure measures: tests/src/bin/overlay-sim.rs.
set -eu
cd "$(dirname "$0")/.."
exec ./bench/build-and-run.sh overlay-sim "$@"

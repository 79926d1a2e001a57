#!/bin/sh
# build-and-run.sh BIN [--debug] ARGS...: builds the workspace (release unless --debug)
# and runs target/PROFILE/BIN with ARGS. Shared by the bench scripts.
set -eu
cd "$(dirname "$0")/.."
bin="$1"
shift
profile=release
if [ "${1:-}" = "--debug" ]; then profile=debug; shift; fi
if [ "$profile" = release ]; then
    cargo build --release --workspace --bins
else
    cargo build --workspace --bins
fi
exec "${CARGO_TARGET_DIR:-target}/$profile/$bin" "$@"

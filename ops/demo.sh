#!/usr/bin/env bash
# The demo, end to end: the Kingdee simulator with 10,000 sales orders → fetcher → RabbitMQ →
# transformer → RabbitMQ → two writers → PostgreSQL, then a summary, the next steps and a clean stop.
# Extra arguments go to `conveyor-dev demo` (see `conveyor-dev demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/services.sh
echo "demo: building the release binaries (the first build compiles about 420 crates: about 5½ minutes on 2 cores; later builds take seconds)" >&2
cargo build --release --locked --workspace --bins
# Wherever cargo puts them: CARGO_TARGET_DIR, a build.target-dir of a cargo config, or target/.
target_dir="$(cargo metadata --format-version 1 --no-deps --locked | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
exec "$target_dir/release/conveyor-dev" demo "$@"

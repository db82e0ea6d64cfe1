#!/usr/bin/env bash
# The demo, end to end: the Kingdee simulator with 10,000 sales orders → fetcher → RabbitMQ →
# transformer → RabbitMQ → two writers → PostgreSQL, then a summary and a clean stop.
# Extra arguments go to `conveyor-dev demo` (see `conveyor-dev demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
ops/services.sh
cargo build --release --locked --workspace --bins
exec target/release/conveyor-dev demo "$@"

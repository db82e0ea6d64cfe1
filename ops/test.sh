#!/usr/bin/env bash
# All the tests, on a fresh machine as on a developer's: makes sure RabbitMQ and PostgreSQL are
# installed and running and that promtool and docker-compose are there (ops/services.sh), then runs
# every test of the workspace against them. Extra arguments go to `cargo test` (e.g. a test's name).
# This is the README's test command, and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ops/services.sh --remove-test-queues
exec cargo test --workspace --locked "$@"

#!/bin/sh
# Makes the Docker secrets docker-compose.yml mounts, in ops/secrets/ (ignored by git and by the image's
# build context), each only when its file is missing: random passwords for RabbitMQ, PostgreSQL and
# Grafana, the console's users, the broker and database URLs the workers read (built from those passwords), and the Kingdee
# app's client secret (the simulator's, until you put the real one in its file). Idempotent.
# To change a password later: edit its file and the URL that carries it (or delete both and run this
# again), then recreate the containers (ops/RUNBOOK.md, "Rotate credentials").
set -eu

dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
chmod 700 "$dir"

# 24 URL-safe characters, so that a password needs no escaping inside a URL.
random() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }

# Writes $2 into $dir/$1 unless the file exists. Readable by the containers' users (uid 10001, and the
# database's and broker's own), which see only the file, not the private directory.
make() {
  [ -s "$dir/$1" ] && return 0
  printf '%s' "$2" >"$dir/$1"
  chmod 644 "$dir/$1"
  echo "secrets: created ops/secrets/$1" >&2
}

make rabbitmq_password.txt "$(random)"
make postgres_password.txt "$(random)"
make grafana_admin_password.txt "$(random)"
make kingdee_client_secret.txt "sim-client-secret-7f3a9c2e51b04d68"
make amqp_url.txt "amqp://conveyor:$(cat "$dir/rabbitmq_password.txt")@rabbitmq:5672/%2f"
# For docker-compose.cluster.yml: the Erlang cookie its three RabbitMQ nodes share, and their URLs.
make rabbitmq_cookie.txt "$(random)$(random)"
rabbit_password="$(cat "$dir/rabbitmq_password.txt")"
make amqp_cluster_url.txt "amqp://conveyor:$rabbit_password@rabbitmq:5672/%2f,amqp://conveyor:$rabbit_password@rabbitmq-2:5672/%2f,amqp://conveyor:$rabbit_password@rabbitmq-3:5672/%2f"
make pg_url.txt "postgres://conveyor:$(cat "$dir/postgres_password.txt")@postgres:5432/conveyor"
# The console's users (name:role:password a line): an operator, who replays and purges, and a viewer.
make console_users.txt "operator:operator:$(random)
viewer:viewer:$(random)
"

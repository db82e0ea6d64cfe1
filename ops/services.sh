#!/usr/bin/env bash
# Makes sure the services conveyor's tests and demo need are installed and running on this machine:
# RabbitMQ on 127.0.0.1:5672 and PostgreSQL on 127.0.0.1:5432 with a database "test"; and that the
# tools the tests call (promtool, docker-compose, chromium) are installed.
# Installs them with apt-get when missing (needs root), starts them when down. Idempotent.
# With --remove-test-queues it also deletes the queues that killed test runs left in the local
# RabbitMQ (named like the harness's namespaces, `{prefix}_{10 hex digits}.…`, of a namespace none
# of whose queues has a consumer):
# ops/test.sh does, before the tests start; a test run going on at the same time would lose its
# queues, so run one ops/test.sh at a time per broker.
set -euo pipefail

remove_test_queues=
[ "${1:-}" = --remove-test-queues ] && remove_test_queues=1

log() { printf 'services: %s\n' "$*" >&2; }

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    log "cannot install $* without root; install it yourself"
    exit 1
  fi
  log "installing $*"
  if [ -z "${CONVEYOR_APT_UPDATED:-}" ]; then
    apt-get update -qq
    export CONVEYOR_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
  local name=$1 port=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  log "$name did not start listening on port $port"
  exit 1
}

# RabbitMQ
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  if ! port_open 5672; then
    log "starting RabbitMQ"
    if [ "$(id -u)" = 0 ] && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
      # Debian's wrapper starts it through su, which resets the open-files limit to 1024: each
      # quorum queue holds files open, and a broker out of file handles stops taking connections.
      (cd /var/lib/rabbitmq &&
        su rabbitmq -s /bin/sh -c 'ulimit -n "$(ulimit -Hn)" ||
          echo "services: RabbitMQ keeps an open-files limit of $(ulimit -n)" >&2
          exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached')
    else
      rabbitmq-server -detached
    fi
  fi
  wait_for_port RabbitMQ 5672
fi
# The port opens before the broker accepts work; wait until it answers.
if command -v rabbitmqctl >/dev/null; then
  for _ in $(seq 1 60); do
    rabbitmqctl -q await_startup >/dev/null 2>&1 && break
    sleep 1
  done
fi

if [ -n "$remove_test_queues" ] && [ -z "${CONVEYOR_AMQP_URL:-}" ] && command -v rabbitmqctl >/dev/null; then
  # A test deletes its queues when it ends, also when it fails; a test process that was killed
  # cannot. One call to the node, as rabbitmqctl starts slowly.
  # A namespace any of whose queues has a consumer is in use (a test, a demo or a bench running).
  removed=$(rabbitmqctl -q eval '
    Name = fun(Q) -> element(4, amqqueue:get_name(Q)) end,
    Namespace = fun(Q) -> hd(binary:split(Name(Q), <<".">>)) end,
    Tests = [Q || Q <- rabbit_amqqueue:list(),
                  re:run(Name(Q), "^[a-z0-9_]+_[0-9a-f]{10}\\.") =/= nomatch],
    % A queue that cannot say (being deleted as it is asked) counts as in use.
    InUse = [Namespace(Q) || Q <- Tests, (catch rabbit_amqqueue:consumers(Q)) =/= []],
    Leftover = [Q || Q <- Tests, not lists:member(Namespace(Q), InUse)],
    [catch rabbit_amqqueue:delete(Q, false, false, <<"conveyor-tests">>) || Q <- Leftover],
    length(Leftover).' 2>&1) || {
    log "could not remove queues left by earlier test runs: $removed"
    removed=0
  }
  if [ "${removed:-0}" != 0 ]; then log "removed $removed queues left by earlier test runs"; fi
fi

# PostgreSQL
if ! port_open 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
    # Our own fresh install: let local TCP clients in without a password, as on the project's machines.
    hba="$(ls -d /etc/postgresql/*/main | sort -V | tail -n 1)/pg_hba.conf"
    sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  fi
  log "starting PostgreSQL"
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  # An install may have started it already (then reload, for the authentication change).
  pg_ctlcluster --skip-systemctl-redirect "$version" main start ||
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  wait_for_port PostgreSQL 5432
fi
if [ "$(id -u)" = 0 ] && command -v psql >/dev/null; then
  # A fresh install only has the postgres role, with peer authentication on the socket.
  if ! su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" 2>/dev/null | grep -q 1; then
    log "creating database test"
    su postgres -c "createdb test"
  fi
fi
# Tools the tests and CI call: promtool (checks the dashboard's queries and the alert rules),
# docker-compose (validates docker-compose.yml; no Docker engine is needed for that), and a headless
# Chromium with its WebDriver (the console's browser tests).
command -v promtool >/dev/null || apt_install prometheus
command -v docker-compose >/dev/null || apt_install docker-compose
command -v chromedriver >/dev/null || apt_install chromium chromium-driver
# A CJK font, so that screenshots of Chinese names show the names (1.6 MB).
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || apt_install fonts-wqy-microhei
log "RabbitMQ and PostgreSQL are up; promtool, docker-compose and chromium are installed"

#!/usr/bin/env bash
# Installs everything the project and its tests need on a fresh machine (Debian, Python 3.11),
# and starts Redis if it is not up. Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
# the review console's tests: a real PostgreSQL server (initdb + pg_ctl), Chromium headless
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # The prometheus package starts a server on :9090 under systemd-less machines only by
  # its init script; the tests run their own, so stop any the install started.
  pkill -x prometheus 2>/dev/null || true
fi

# Python packages: the dev lock (every extra's closure, each pinned: `python -m tests.lockfile`
# writes it from one resolution), then the project itself, editable, with nothing resolved, so
# what the tests run with does not depend on what the index serves today. The project builds
# with the lock's setuptools (no build isolation: nothing unpinned is fetched).
echo "== pip install -r tests/locks/dev.lock, then -e . (no deps)"
python3 -m pip install -q -r tests/locks/dev.lock
python3 -m pip install -q --no-deps --no-build-isolation -e .

# Apache Kafka for the tests' second broker lane, the bench and `demo --broker kafka`: its
# jars from Maven Central into ~/.cache/fraudstream (nothing is fetched when they are there).
echo "== Apache Kafka (Maven Central)"
python3 -m training.ops.services.apache_kafka install

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "== starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

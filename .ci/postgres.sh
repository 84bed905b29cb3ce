#!/usr/bin/env bash
# CI: make sure PostgreSQL's server binaries are on this machine (Debian's package on a fresh one), then
# start a throwaway server once and print how long it took to come up. The tests start their own the same
# way (tests/test_tune_concurrency.py: initdb into a temporary folder, 127.0.0.1 on a free port, as a
# non-root user because initdb refuses root).
set -euo pipefail

bindir() {  # initdb on PATH, else Debian's versioned folder (which is not on PATH)
  if command -v initdb >/dev/null; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
  find /usr/lib/postgresql -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname
}

dir=$(bindir)
if [ -z "$dir" ]; then
  echo "postgres.sh: no PostgreSQL server here; installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
  dir=$(bindir)
fi

base=$(mktemp -d /tmp/competition-pg-ci.XXXXXX)
as=()
if [ "$(id -u)" = 0 ]; then
  user=postgres
  id "$user" >/dev/null 2>&1 || user=nobody
  chown "$user" "$base"
  as=("$(command -v runuser || echo /usr/sbin/runuser)" -u "$user" --)  # sbin may not be on PATH
fi
trap '"${as[@]}" "$dir/pg_ctl" -D "$base/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$base"' EXIT
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

t0=$(date +%s.%N)
"${as[@]}" "$dir/initdb" -D "$base/data" -A trust -U postgres -E UTF8 --locale=C --no-sync >/dev/null
if ! "${as[@]}" "$dir/pg_ctl" -D "$base/data" -l "$base/server.log" -w -t 60 \
     -o "-h 127.0.0.1 -p $port -k $base -c fsync=off" start >/dev/null; then
  tail -n 30 "$base/server.log" >&2
  exit 1
fi
t1=$(date +%s.%N)
echo "PostgreSQL server start-up: $(awk "BEGIN {printf \"%.2f\", $t1 - $t0}") s (initdb + start on 127.0.0.1:$port;" \
     "$("$dir/postgres" --version))"

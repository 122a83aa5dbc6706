#!/usr/bin/env bash
# Install Debian's PostgreSQL server binaries for `harness tracking-server` and its test
# (tests/test_tracking_server.py) when they are missing. Idempotent; never fails the CI: without
# PostgreSQL that test is skipped, with the reason.
# The harness runs its own cluster under <results>/postgres: the Debian cluster/service that the
# package starts is stopped again and set to manual start, but only when this script installed it.
set -u
have_pg() { ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; }
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }
if have_pg; then
  echo "install-postgres: present ($("$(pg_bin)/postgres" --version 2>/dev/null) in $(pg_bin))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-postgres: no apt-get here; install PostgreSQL's server (initdb, pg_ctl) yourself (the tracking-server test will be skipped)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install-postgres: not root and no password-less sudo; skipping (the tracking-server test will be skipped)"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || ! have_pg; then
  echo "install-postgres: apt-get could not install postgresql (offline or no package); the tracking-server test will be skipped"
  exit 0
fi
echo "install-postgres: installed $("$(pg_bin)/postgres" --version 2>/dev/null)"
# The package creates and starts a `main` cluster on port 5432: the harness does not use it.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters --no-header 2>/dev/null | while read -r ver name port status _; do
    if [ "$status" = "online" ]; then
      $SUDO pg_ctlcluster "$ver" "$name" stop && echo "install-postgres: stopped the Debian cluster $ver/$name (port $port)"
    fi
    if [ -f "/etc/postgresql/$ver/$name/start.conf" ]; then
      echo manual | $SUDO tee "/etc/postgresql/$ver/$name/start.conf" >/dev/null
    fi
  done
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now postgresql >/dev/null 2>&1 && echo "install-postgres: disabled the postgresql service"
fi
exit 0

#!/usr/bin/env bash
# Debian packages some tests need: Chromium for the browser test of `serve`, PostgreSQL for the shared
# Optuna study. Installed only when missing; without apt or root the tests that need them skip and say why.
set -uo pipefail
want=()
command -v chromium >/dev/null 2>&1 || want+=(chromium chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || want+=(postgresql)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: cannot install ${want[*]} (needs apt-get as root); the tests that need them will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null 2>&1; } \
  || echo "note: apt-get could not install ${want[*]}; the tests that need them will skip" >&2
exit 0

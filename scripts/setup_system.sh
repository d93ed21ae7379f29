#!/usr/bin/env bash
# System packages the tests use (Debian): redis-server, openssl, prometheus (promtool), iproute2, util-linux;
# libtcmalloc-minimal4 for `bench/rollout.py --preload` (docs/benchmarks.md).
# Idempotent: installs only what is missing; needs root (CI and the dev machines run as root).
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# the cluster test bed (tests/cluster): network namespaces, nsenter, mount
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 || need+=(libtcmalloc-minimal4)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_system: missing ${need[*]}: install them (Debian/Ubuntu: apt-get install ${need[*]})" >&2
  exit 1
fi
echo "setup_system: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null

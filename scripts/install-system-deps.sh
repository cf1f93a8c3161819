#!/usr/bin/env bash
# System packages the test suite needs: Debian's Bazel 4.2.3 (bazel-bootstrap) with its Java
# rules for the end-to-end tests, openssl for the TLS tests, bubblewrap (bwrap) which confines
# every action, busybox-static for the BuildStream end-to-end test's sysroot, and chromium for
# the web UI's browser tests, and redis-server for the Redis-backed action cache and scheduler
# state (tests start their own on a unix socket; the system service is left stopped). Idempotent.
set -euo pipefail

need=()
command -v bazel >/dev/null 2>&1 || need+=(bazel-bootstrap)
[ -d /usr/share/bazel/rules/java ] || need+=(bazel-rules-java)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
[ -x /bin/busybox ] || need+=(busybox-static)
# Headless Chromium drives the web UI's browser tests (tests/web/); DejaVu gives it a font.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to apt-get install ${need[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "installing ${need[*]} with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
# Debian starts and enables redis-server's system service on install; the tests start their
# own servers, so a system one would only hold port 6379 and memory.
if [[ " ${need[*]} " == *" redis-server "* ]] && command -v systemctl >/dev/null 2>&1 \
    && [ -d /run/systemd/system ]; then
  $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

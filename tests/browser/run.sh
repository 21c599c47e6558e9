#!/usr/bin/env bash
# Browser sub-suite: unit tests of clients/js (node --test), then the Playwright
# test of the --dev chat page (playwright-core + Debian's chromium, never a
# downloaded browser) against $WSGATE_BIN nodes and a private redis-server.
#
#   WSGATE_BIN=/abs/path/to/wsgate bash tests/browser/run.sh
#
# The nginx test (nginx.test.mjs) runs the real nginx (Debian package) with the
# repo's nginx/nginx.conf in front of three nodes; sse.test.mjs runs it with
# WebSocket upgrades refused (403), and the page must fall back to SSE. publish.test.mjs runs
# clients/js in Node (no browser) against two nodes: idempotent publish retry.
#
# Output (logs, screenshots): tests/output/browser/.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export WSGATE_BIN="${WSGATE_BIN:-$repo/target/release/wsgate}"
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

# --- system packages, only when missing
pkgs=()
command -v node >/dev/null 2>&1 || pkgs+=(nodejs)
command -v npm >/dev/null 2>&1 || pkgs+=(npm)
[ -x /usr/bin/chromium ] || pkgs+=(chromium)
command -v redis-server >/dev/null 2>&1 || pkgs+=(redis-server)
{ command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; } || pkgs+=(nginx)
if [ "${#pkgs[@]}" -gt 0 ]; then
  echo "browser suite: installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' services (nginx on :80, redis on :6379) from starting:
  # the tests start their own instances on free loopback ports.
  added_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && added_policy=1
  fi
  apt-get update -qq && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null
  rc=$?
  [ -z "$added_policy" ] || rm -f /usr/sbin/policy-rc.d
  if [[ " ${pkgs[*]} " == *" nginx "* ]]; then
    # Should the distro's nginx service have started anyway, stop it.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
      systemctl stop nginx >/dev/null 2>&1 || true
    elif [ -s /run/nginx.pid ] && kill -0 "$(cat /run/nginx.pid)" 2>/dev/null; then
      /usr/sbin/nginx -s quit >/dev/null 2>&1 || true
    fi
  fi
  if [ "$rc" -ne 0 ]; then
    echo "browser suite: apt-get install ${pkgs[*]} failed" >&2
    exit 1
  fi
fi

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "browser suite: needs Node >= 20, found $(node --version)" >&2
  exit 1
fi

mkdir -p "$repo/tests/output/browser"
status=0

# --- 1. unit tests of the JS client (backoff, seq/dedup, reconnect logic)
echo "== clients/js unit tests"
node --test --test-reporter=spec "$repo"/clients/js/test/*.test.mjs || status=1

# --- 2. the browser test
echo "== browser test (chat page, chromium)"
if [ ! -x "$WSGATE_BIN" ]; then
  echo "browser suite: WSGATE_BIN is not an executable: $WSGATE_BIN" >&2
  exit 1
fi
cd "$here"
if [ ! -f node_modules/playwright-core/package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error || { echo "browser suite: npm ci failed" >&2; exit 1; }
fi
# One file at a time: each starts its own chromium, nodes and redis.
node --test --test-concurrency=1 --test-reporter=spec chat.test.mjs nginx.test.mjs sse.test.mjs || status=1

# --- 3. clients/js in Node against real nodes (idempotent publish retry);
# Node 20 has its WebSocket behind a flag, Node 22 has it built in.
echo "== clients/js in Node against real nodes"
ws_flag=()
[ "$node_major" -ge 22 ] || ws_flag=(--experimental-websocket)
node "${ws_flag[@]}" --test --test-concurrency=1 --test-reporter=spec publish.test.mjs || status=1

if [ "$status" -eq 0 ]; then
  echo "browser suite: all passed (screenshots: tests/output/browser/chat.png, nginx.png, sse.png)"
else
  echo "browser suite: FAILED (logs in tests/output/browser/)" >&2
fi
exit "$status"

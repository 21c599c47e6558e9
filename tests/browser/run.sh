#!/usr/bin/env bash
# Browser sub-suite: unit tests of clients/js (node --test), then the Playwright
# test of the --dev chat page (playwright-core + Debian's chromium, never a
# downloaded browser) against $WSGATE_BIN nodes and a private redis-server.
#
#   WSGATE_BIN=/abs/path/to/wsgate bash tests/browser/run.sh
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
if [ "${#pkgs[@]}" -gt 0 ]; then
  echo "browser suite: installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null || {
    echo "browser suite: apt-get install ${pkgs[*]} failed" >&2
    exit 1
  }
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
node --test --test-reporter=spec chat.test.mjs || status=1

if [ "$status" -eq 0 ]; then
  echo "browser suite: all passed (screenshot: tests/output/browser/chat.png)"
else
  echo "browser suite: FAILED (logs in tests/output/browser/)" >&2
fi
exit "$status"

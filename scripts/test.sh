#!/usr/bin/env bash
# The whole wsgate test suite, as CI runs it. Installs what it needs when
# missing (redis-server here; nginx, prometheus, chromium, node packages in
# the sub-suites), then runs: format and lint checks, every Rust test of the
# workspace (unit, integration against real redis-server, doc tests), and the
# deployment, browser and doc-example sub-suites against the release binary.
#
#   scripts/test.sh            everything
#   scripts/test.sh --rust     only the Rust checks and tests
set -uo pipefail
cd "$(dirname "$0")/.."

only_rust=false
[ "${1:-}" = "--rust" ] && only_rust=true

apt_updated=false
apt_install() {
  if ! $apt_updated; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
    apt_updated=true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

command -v redis-server >/dev/null || apt_install redis-server
command -v openssl >/dev/null || apt_install openssl   # the wss:// test makes its certificate
command -v cc >/dev/null || apt_install gcc libc6-dev    # ring and the allocator (jemalloc) compile C
command -v make >/dev/null || apt_install make          # tikv-jemalloc-sys builds jemalloc with make
command -v cargo >/dev/null || { echo "cargo is required (rustup)"; exit 2; }

failed=()
passed=()
step() {
  local name=$1; shift
  echo "==> $name"
  if "$@"; then passed+=("$name"); else failed+=("$name"); echo "!!! $name failed"; fi
}

step "cargo fmt" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo test" cargo test --workspace
if ! $only_rust; then
  if cargo build --release -p wsgate --quiet; then
    export WSGATE_BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/wsgate"
    for suite in tests/deploy tests/browser tests/docs; do
      [ -f "$suite/run.sh" ] && step "$suite" bash "$suite/run.sh"
    done
  else
    failed+=("release build")
  fi
  # docker-compose.yml for real, in podman containers (builds its own images).
  step "tests/compose" bash tests/compose/run.sh
fi

echo
echo "passed: ${passed[*]:-none}"
[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "suites: ${#passed[@]} passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]

#!/usr/bin/env bash
# Doc examples: runs every `sh run` block of the docs against real nodes on
# free loopback ports (tests/docs/run_examples.py), and checks that nothing
# links outside the repository. Needs curl and openssl.
#
#   WSGATE_BIN=/abs/path/to/wsgate bash tests/docs/run.sh [FILE.md ...]
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for tool in curl openssl python3; do
  command -v "$tool" >/dev/null || { echo "doc examples: $tool is required" >&2; exit 1; }
done
exec python3 "$here/run_examples.py" "$@"

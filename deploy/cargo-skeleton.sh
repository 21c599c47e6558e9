#!/bin/sh
# cargo-skeleton.sh SRC DEST
#
# Copies the workspace at SRC to DEST with every Cargo.toml and Cargo.lock
# kept and every Rust source file replaced by the stub `fn main() {}`. A
# `cargo build` in DEST then compiles all the dependencies and only trivial
# workspace crates. DEST changes only when a manifest, the lockfile or the set
# of .rs files changes, never when code inside a .rs file does: that keeps
# the Dockerfile's dependency layer cached across code edits (the idea of
# cargo-chef, in a few lines of sh and without an extra tool to install).
#
# Stubbing every .rs file, not only the known target paths, keeps every
# target cargo may discover or that a manifest declares (src/lib.rs,
# src/main.rs, src/bin/*, build.rs, tests, benches, examples) present.
set -eu
src=$1
dest=$2
mkdir -p "$dest"
cd "$src"
find . \( -path ./target -o -path ./.git -o -name node_modules -o -name .venv \) -prune \
    -o -type f \( -name Cargo.toml -o -name Cargo.lock -o -name '*.rs' \) -print |
while IFS= read -r f; do
    mkdir -p "$dest/$(dirname "$f")"
    case "$f" in
        *.rs) printf 'fn main() {}\n' > "$dest/$f" ;;
        *) cp "$f" "$dest/$f" ;;
    esac
done

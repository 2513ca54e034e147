#!/usr/bin/env bash
# The benchmark, against the yardstick: builds the release binaries and the
# thin ideal (a tonic server whose Debit is one small Lua script: the floor
# for "a gRPC call that debits a Redis counter"), then runs inmail-bench,
# which drives the thin ideal, billing's scripts, Debit and SendMessage
# (secured and in plaintext) in one run and prints the ratios.
#
#   THIN_IDEAL_SRC=/path/to/thin-ideal ./scripts/bench.sh [inmail-bench args]
#
# The thin ideal is not part of this repository: it is the team's fixed
# yardstick (THIN_IDEAL_SRC, by default ../shared/bench/thin-ideal beside the
# clone). Without it the bench runs every other scenario. Building it needs
# protoc (Debian: protobuf-compiler; installed when missing and root).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --release --bins
src="${THIN_IDEAL_SRC:-../shared/bench/thin-ideal}"
if [ -f "$src/Cargo.toml" ]; then
  if ! command -v protoc >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
  fi
  out="$PWD/target/thin-ideal"
  # Built from a copy: the source may be read-only, cargo writes a lockfile;
  # the copy is its own workspace, not a member of ours.
  mkdir -p "$out" && rm -rf "$out/src" && cp -r "$src" "$out/src" && chmod -R u+w "$out/src"
  grep -q '^\[workspace\]' "$out/src/Cargo.toml" || printf '\n[workspace]\n' >> "$out/src/Cargo.toml"
  (cd "$out/src" && CARGO_TARGET_DIR="$out" cargo build --release -q)
  export THIN_IDEAL_DIR="$out/release"
else
  echo "note: no thin ideal at $src (set THIN_IDEAL_SRC); its row is skipped" >&2
fi
exec target/release/inmail-bench "$@"

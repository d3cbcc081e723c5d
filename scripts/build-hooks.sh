#!/usr/bin/env bash
# Builds the small hooks (pitr-archive-push, pitr-archive-get) as they ship: statically linked.
#
# Why static: on this kind of VM a dynamically linked Rust program starts about 0.4 ms slower
# than /bin/true (the loader maps libc and libgcc_s and resolves their symbols), a statically
# linked one about 0.3 ms faster; the hook's whole budget above /bin/true is 0.3 ms (issue 17).
# The hooks use the standard library only (no name service, no dlopen), so static glibc is safe.
# `cargo build --workspace` still builds dynamic copies into target/{debug,release}/; these go to
# target/<host>/{release,debug}/ with their own flags, so neither build disturbs the other.
#
# usage: scripts/build-hooks.sh [--debug] [--target-dir DIR]
# prints the directory that holds the two hooks.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release target_dir=target
while [ $# -gt 0 ]; do
  case $1 in
    --debug) profile=debug ;;
    --target-dir) target_dir=$2; shift ;;
    *) echo "build-hooks.sh: unknown option $1 (use --debug or --target-dir DIR)" >&2; exit 2 ;;
  esac
  shift
done
host=$(rustc -vV | sed -n 's/^host: //p')
release=(--release); [ "$profile" = debug ] && release=()
cargo build --quiet --locked "${release[@]}" --target "$host" --target-dir "$target_dir" \
  --config "target.$host.rustflags = ['-C', 'target-feature=+crt-static']" \
  -p pitr-archive-push -p pitr-archive-get
dir=$target_dir/$host/$profile
for hook in pitr-archive-push pitr-archive-get; do
  # A dynamic hook would still work, only slower: say so rather than ship it silently.
  if readelf -d "$dir/$hook" | grep -q NEEDED; then
    echo "build-hooks.sh: $dir/$hook came out dynamically linked; is glibc's libc.a (libc6-dev) installed?" >&2
    exit 1
  fi
done
echo "$dir"

#!/usr/bin/env bash
# daemon_profile.sh - where the pitr daemon spends its CPU while it archives a whole corpus and
# then restores it (prefetch on): per-thread CPU and a `perf` profile, for one archive_concurrency.
#
#     bench/daemon_profile.sh                 # CONC=2, the pgbench corpus, file:// repository
#     CONC=8 BL=/tmp/bl2 bench/daemon_profile.sh
#
# Same staging and driver as daemon_bench.sh (hard-linked pg_wal + .ready files, one
# archive-push per segment as user postgres, .ready -> .done after each success), without
# pgBackRest. Needs root, perf (linux-perf), and a pitr binary (PITR_BIN).
# Output in OUTDIR (default /tmp/pitr-bench/profile-c$CONC)/{push,get}/: threads.txt (per-thread
# CPU, peak memory), perf.data, perf-self.txt (self time by symbol), perf-children.txt (inclusive
# time by symbol; Rust frames without frame pointers, so callers are partial). PERF=0: no perf.
# Knobs: BL=/tmp/bl CONC=2 PREFETCH=16 PITR_BIN WORK OUTDIR HTTP_ADDR=127.0.0.1:19852 TOP=25
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BL=${BL:-/tmp/bl}
CONC=${CONC:-2}
PITR_BIN=${PITR_BIN:-$ROOT/target/release/pitr}
WORK=${WORK:-/tmp/pitr-bench/pwork}
OUTDIR=${OUTDIR:-/tmp/pitr-bench/profile-c$CONC}
HTTP_ADDR=${HTTP_ADDR:-127.0.0.1:19852}
CORPUS=$BL/corpus SRC=$BL/src
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
busy() { pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null; }
[ "$(id -u)" = 0 ] || { log "run as root"; exit 1; }
command -v perf >/dev/null || { log "perf is not installed (apt-get install linux-perf)"; exit 1; }

rm -rf "$WORK"; mkdir -p "$WORK/bin" "$WORK/repo" "$WORK/stage/global" "$WORK/stage/pg_wal/archive_status" "$OUTDIR"
install -m 755 "$PITR_BIN" "$WORK/bin/pitr"
(cd "$CORPUS" && ls | grep -E '^[0-9A-F]{24}$' | sort) >"$WORK/segs.txt"
cp "$SRC/global/pg_control" "$WORK/stage/global/"; cp "$SRC/PG_VERSION" "$WORK/stage/"
while read -r s; do ln "$CORPUS/$s" "$WORK/stage/pg_wal/$s"; : >"$WORK/stage/pg_wal/archive_status/$s.ready"; done <"$WORK/segs.txt"
chown -R postgres: "$WORK"; chmod 700 "$WORK/stage"
runuser -u postgres -- "$WORK/bin/pitr" keygen --output "$WORK/keyring" >/dev/null
cat >"$WORK/pitr.toml" <<EOF
repo = 'file://$WORK/repo'
key_file = '$WORK/keyring'
pgdata = '$WORK/stage'
compression_level = 1
compression_threads = 0
archive_concurrency = $CONC
prefetch = ${PREFETCH:-16}
http_addr = '$HTTP_ADDR'
pg_url = 'postgresql://postgres@127.0.0.1:1/postgres'
EOF
chown postgres: "$WORK/pitr.toml"
(cd "$CORPUS" && xargs cat <"$WORK/segs.txt" >/dev/null)

# profile MODE: run the daemon for MODE (push: archive the staged corpus; get: restore it from
# the repository the push left, prefetch on), with perf attached when PERF=1
DPID=
trap '[ -z "$DPID" ] || kill -TERM "$DPID" 2>/dev/null || true' EXIT   # never leave a daemon behind
profile() {
  local mode=$1 pgdata=$WORK/stage out=$OUTDIR/$1 pid job perf_pid t0 t1
  [ "$mode" = get ] && pgdata=$WORK/gstage
  mkdir -p "$out"
  sed "s#^pgdata = .*#pgdata = '$pgdata'#" "$WORK/pitr.toml" >"$WORK/pitr-$mode.toml"
  chown postgres: "$WORK/pitr-$mode.toml"
  while busy; do log "waiting for cargo/rustc to finish"; sleep 5; done
  prewarm_memory "${PREWARM_MIB:-4096}"
  t0=$EPOCHREALTIME
  runuser -u postgres -- sh -c 'echo $$ >"$1"; exec "$2" --config "$3" daemon' sh \
    "$WORK/daemon.pid" "$WORK/bin/pitr" "$WORK/pitr-$mode.toml" >"$out/daemon.log" 2>&1 &
  job=$!
  until [ -S "$pgdata/pitr.sock" ] && [ -s "$WORK/daemon.pid" ]; do sleep 0.005; done
  pid=$(cat "$WORK/daemon.pid"); rm -f "$WORK/daemon.pid"; DPID=$pid
  perf_pid=
  if [ "${PERF:-1}" = 1 ]; then
    perf record -F 499 -g -p "$pid" -o "$out/perf.data" 2>"$out/perf-record.log" &
    perf_pid=$!
  fi
  (
    cd "$pgdata"
    while read -r s; do
      if [ "$mode" = push ]; then
        runuser -u postgres -- "$WORK/bin/pitr" --config "$WORK/pitr-$mode.toml" archive-push "pg_wal/$s"
        mv "pg_wal/archive_status/$s.ready" "pg_wal/archive_status/$s.done"
      else
        runuser -u postgres -- "$WORK/bin/pitr" --config "$WORK/pitr-$mode.toml" archive-get "$s" "$WORK/get/$s"
      fi
    done <"$WORK/segs.txt"
  )
  t1=$EPOCHREALTIME
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
  busy && log "WARNING: cargo/rustc ran during the $mode profile"
  {
    echo "$mode, archive_concurrency=$CONC  wall $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}') s" \
      " daemon CPU $(awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14+$15)/hz}' "/proc/$pid/stat") s" \
      " (threads that exited count in the total but are not listed)"
    for t in /proc/"$pid"/task/*; do
      awk -v hz="$(getconf CLK_TCK)" -v c="$(cat "$t/comm")" -v t="${t##*/}" \
        '{printf "  tid %-8s %-18s user %5.2f s  sys %5.2f s\n", t, c, $14/hz, $15/hz}' "$t/stat"
    done
    grep -E '^(Threads|VmHWM|RssAnon|RssFile)' "/proc/$pid/status"
  } >"$out/threads.txt"
  cat "$out/threads.txt"
  kill -TERM "$pid"; wait "$job" || true; DPID=
  if [ -n "$perf_pid" ]; then
    perf report -i "$out/perf.data" --no-children --sort dso,sym --stdio -g none >"$out/perf-self.txt" 2>/dev/null
    perf report -i "$out/perf.data" --children --sort sym --stdio -g none >"$out/perf-children.txt" 2>/dev/null
    echo "$mode: top of the profile (inclusive %, of the daemon's samples):"
    grep -E '^ +[0-9.]+%' "$out/perf-children.txt" | awk -v n="${TOP:-25}" 'NR <= n'
  fi
}

profile push
mkdir -p "$WORK/gstage/global" "$WORK/gstage/pg_wal/archive_status" "$WORK/get"
cp "$SRC/global/pg_control" "$WORK/gstage/global/"; cp "$SRC/PG_VERSION" "$WORK/gstage/"
chown -R postgres: "$WORK/gstage" "$WORK/get"; chmod 700 "$WORK/gstage"
profile get

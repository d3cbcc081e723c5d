#!/usr/bin/env bash
# daemon_bench.sh - the pitr sidecar daemon against pgBackRest 2.45 async archiving, in one run,
# on fixed WAL corpora, driven the way PostgreSQL drives archive_command / restore_command
# (one hook process per segment, in WAL order, as user postgres, cwd = PGDATA).
#
# For every corpus (CORPORA) and every repository kind (REPOS: local directory, and optionally
# an S3 server on loopback behind a TCP proxy that adds DELAY_MS in each direction):
#   push   all segments staged in pg_wal with archive_status/*.ready, then one archive-push per
#          segment in order; the driver renames .ready -> .done after each success, as the
#          archiver does. Timed from the start of the daemon (pitr) / the first hook
#          (pgBackRest, whose first call forks its async process) until the last hook returns.
#            pgbr-async  archive-async=y process-max=2 zst-1 aes-256-cbc spool-path
#            pitr-c2     pitr daemon, archive_concurrency=2 (= process-max), compression_threads=0
#            pitr-c<HI>  the same with archive_concurrency=CONC_HI (default 8): the RSS check
#            walrus-c2   (with WALRUS_BIN) WAL-RUS's daemon, WALG_UPLOAD_CONCURRENCY=2, zstd level
#                        1, libsodium encryption; hooks `walrus daemon-client wal-push`
#          every run starts from an empty repository; the object count is checked after each run
#   get    one archive-get per segment into an empty directory (same filesystem as pg_wal):
#            pgbr-async  archive-async=y process-max=2 archive-get-queue-max=1GiB
#            pitr-c2     daemon on a fresh stage PGDATA, prefetch=PREFETCH, concurrency 2
#            pitr-c<HI>  the same with concurrency CONC_HI
#            walrus-c2   WAL-RUS's daemon, WALG_DOWNLOAD_CONCURRENCY=2 (its in-process prefetch)
#          timed from daemon start / first hook to the last hook; run 1 is checked with cmp
#   lat    archive-push of an already-archived segment, LAT_CALLS calls (+1 warm-up dropped):
#          the small hook `pitr-archive-push` and `pitr archive-push` through the daemon
#          (alternating, LAT_ROUNDS rounds each), pitr without daemon (direct), pgBackRest async;
#          and the process-start floors /bin/true, `pitr --version`, `pgbackrest version`
#   rss    VmHWM of the daemon process at the end of each push / get run, and the peaks of
#          RssAnon / RssFile sampled every 50 ms (RssFile: page cache the daemon has mmapped)
#   limits (per corpus, one measurement in every round, beside the tools' runs of that round)
#          zstd -1 on one and two cores on the concatenated corpus (push limit: two cores), a
#          copy of every segment with fsync of file and directory, one and two at a time (get
#          limit: the faster), zstd -d (informational)
# The daemon's /status and /metrics are saved after every run (OUTDIR/snap/), its log per label.
#
# cpu_s is machine-wide busy time (/proc/stat) during the timed window, so it includes
# pgBackRest's detached async process and the daemon alike.
#
# Usage (root, Debian bookworm, pgbackrest + zstd + curl + python3 installed):
#     bench/daemon_bench.sh
#     REPOS="local s3" CORPORA="pgbench:/tmp/bl realistic:/tmp/bl2" bench/daemon_bench.sh
# Knobs (environment):
#   CORPORA="pgbench:/tmp/bl realistic:/tmp/bl2"   TAG:BL pairs; BL has corpus/, src/ (wal_corpus*.sh
#                               layout); pairs whose corpus is missing are skipped with a note
#   REPOS=local                 "local", "s3" or "local s3"
#   PITR_BIN=target/release/pitr   copied into WORK before anything is timed
#   WALRUS_BIN=                 WAL-RUS's `walrus` binary (`cargo install wal-rus --version 0.4.1`);
#                               unset: WAL-RUS is not run
#   RUNS=3  LAT_CALLS=50  CONC=2  CONC_HI=8  PREFETCH=16
#   HTTP_ADDR=127.0.0.1:19851   the daemon's HTTP API (for /status and /metrics)
#   S3_PORT=19700 PROXY_PORT=19701 TLS_PORT=19702 DELAY_MS=10
#   WORK=/tmp/pitr-bench/dwork  OUTDIR=/tmp/pitr-bench/daemon-results
#   WAIT_IDLE=1                 before every timed phase, wait until the machine is idle: no
#                               process named in BUSY_PROCS="cargo rustc postgres" and less than
#                               IDLE_MAX_CORES=0.3 cores busy; at most WAIT_MAX=900 s
#   DAEMON_ENV=                 extra VAR=value words for the daemon's environment only, for
#                               what-if runs, e.g. MALLOC_ARENA_MAX=2 or LD_PRELOAD=<shim>.so
#   SUMMARY_ONLY=1              only print the summary of the results already in OUTDIR
#   SMALL_PUSH_BIN=target/<host>/release/pitr-archive-push   the small hook as it ships (static,
#                               scripts/build-hooks.sh), installed beside pitr; "none": no small
#                               hook rows (for a pitr from before the small hooks)
#   LAT_ONLY=1                  the short form: per corpus and repository one pitr push run (the
#                               daemon kept up), then the hook-latency phase and the floors; no
#                               get phase, no limits. pgBackRest rows are skipped when it is not
#                               installed (always allowed with LAT_ONLY=1)
#   LAT_ROUNDS=1                the daemon rows alternate small hook / pitr this many times
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
ROOT=$(cd "$HERE/.." && pwd)
CORPORA=${CORPORA:-pgbench:/tmp/bl realistic:/tmp/bl2}
REPOS=${REPOS:-local}
PITR_BIN=${PITR_BIN:-$ROOT/target/release/pitr}
WALRUS_BIN=${WALRUS_BIN:-}
RUNS=${RUNS:-3}
LAT_CALLS=${LAT_CALLS:-50}
LAT_ROUNDS=${LAT_ROUNDS:-1}
LAT_ONLY=${LAT_ONLY:-0}
SMALL_PUSH_BIN=${SMALL_PUSH_BIN:-$ROOT/target/$(rustc -vV | sed -n "s/^host: //p")/release/pitr-archive-push}   # scripts/build-hooks.sh
CONC=${CONC:-2}
CONC_HI=${CONC_HI:-8}
PREFETCH=${PREFETCH:-16}
HTTP_ADDR=${HTTP_ADDR:-127.0.0.1:19851}
WORK=${WORK:-/tmp/pitr-bench/dwork}
OUTDIR=${OUTDIR:-/tmp/pitr-bench/daemon-results}
CIPHER_PASS=${CIPHER_PASS:-bench-passphrase-0123456789abcdef}
WALRUS_KEY=${WALRUS_KEY:-$(openssl rand -hex 32)}   # WAL-RUS's libsodium key (32 bytes, hex)
PY=/usr/bin/python3

STAGE=$WORK/stage          # push PGDATA: global/pg_control, PG_VERSION, pg_wal/ (+ .ready)
GSTAGE=$WORK/gstage        # get PGDATA: global/pg_control, PG_VERSION, empty pg_wal/
GETDIR=$WORK/get           # archive-get destinations (same filesystem as pg_wal)
RUN=$WORK/run              # daemon pid files
RES=$OUTDIR/results.tsv    # label run wall_s cpu_s busy (1: a BUSY_PROCS process seen at start or end)
DRES=$OUTDIR/daemon.tsv    # label run vmhwm_kb daemon_cpu_s hits misses durable waited failed
                           #   + sampled peaks: vmrss_kb rssanon_kb rssfile_kb
LRES=$OUTDIR/latency.tsv   # label call seconds exit_status
S3DATA=$WORK/s3data

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
as_pg() { runuser -u postgres -- "$@"; }
# The machine is shared: before every timed phase wait until nothing else runs (WAIT_IDLE=0: don't).
# busy = a process named in BUSY_PROCS (a compiler, or a PostgreSQL server: these benches never
# start one, so it belongs to someone else's test or benchmark) is running; at the start of a
# phase the machine must also be idle (< IDLE_MAX_CORES busy over half a second). After WAIT_MAX
# seconds of waiting the phase runs anyway and is flagged. Waits are reported in the summary.
BUSY_PROCS=${BUSY_PROCS:-cargo rustc postgres}
busy() { local p; for p in $BUSY_PROCS; do pgrep -x "$p" >/dev/null && return 0; done; return 1; }
machine_busy() {   # more than IDLE_MAX_CORES cores busy over 0.5 s?
  local a b
  a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat); sleep 0.5
  b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat)
  awk -v a="$a" -v b="$b" -v hz="$(getconf CLK_TCK)" -v m="${IDLE_MAX_CORES:-0.3}" 'BEGIN{exit !((b-a)/hz/0.5 > m)}'
}
WAITED_S=0 BUSY_SEEN=0
wait_idle() {
  [ "${WAIT_IDLE:-1}" = 1 ] || return 0
  local t0=$SECONDS
  while busy || { [ "${WAIT_LOAD:-1}" = 1 ] && machine_busy; }; do
    [ $((SECONDS - t0)) -lt "${WAIT_MAX:-900}" ] || { log "WARNING: still busy after ${WAIT_MAX:-900} s; measuring anyway"; BUSY_SEEN=1; break; }
    sleep 5
  done
  if [ $((SECONDS - t0)) -gt 0 ]; then
    WAITED_S=$((WAITED_S + SECONDS - t0))
    local who; who=$(for p in $BUSY_PROCS; do pgrep -x "$p" >/dev/null && printf '%s ' "$p"; done; true)
    log "waited $((SECONDS - t0)) s for the machine to be idle (${who:-CPU load from other processes})"
  fi
  prewarm_memory "${PREWARM_MIB:-4096}"
}
cpu_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
HZ=$(getconf CLK_TCK)

[ "$(id -u)" = 0 ] || die "run as root (hooks and daemon run as postgres through runuser)"
for c in zstd curl openssl; do command -v $c >/dev/null || die "$c is not installed"; done
HAVE_PGBR=1
if ! command -v pgbackrest >/dev/null; then
  [ "$LAT_ONLY" = 1 ] || die "pgbackrest is not installed (LAT_ONLY=1 runs without it)"
  HAVE_PGBR=0
fi
pgbr_version() { if [ "$HAVE_PGBR" = 1 ]; then pgbackrest version; else echo "pgBackRest not installed (its rows skipped)"; fi; }
[ -x "$PITR_BIN" ] || die "no pitr binary at $PITR_BIN (set PITR_BIN)"
[ "$SMALL_PUSH_BIN" = none ] || [ -x "$SMALL_PUSH_BIN" ] || die "no small hook at $SMALL_PUSH_BIN (scripts/build-hooks.sh, or set SMALL_PUSH_BIN)"
[ -z "$WALRUS_BIN" ] || [ -x "$WALRUS_BIN" ] || die "no walrus binary at $WALRUS_BIN (unset WALRUS_BIN to skip WAL-RUS)"
case " $REPOS " in *" s3 "*)
  command -v s3s-fs >/dev/null || die "s3s-fs is not installed (cargo install s3s-fs --features binary)"
  command -v stunnel4 >/dev/null || die "stunnel4 is not installed";;
esac

# ---------------------------------------------------------------- scratch layout
PITR=$WORK/bin/pitr
if [ "${SUMMARY_ONLY:-0}" != 1 ]; then
rm -rf "$WORK"; mkdir -p "$WORK/bin" "$RUN" "$OUTDIR"
install -m 755 "$PITR_BIN" "$WORK/bin/pitr"     # rebuilds during the run don't change what is measured
[ "$SMALL_PUSH_BIN" = none ] || install -m 755 "$SMALL_PUSH_BIN" "$WORK/bin/pitr-archive-push"   # beside pitr, which it hands over to
[ -z "$WALRUS_BIN" ] || install -m 755 "$WALRUS_BIN" "$WORK/bin/walrus"
chown postgres: "$WORK" "$RUN"
: >"$RES"; : >"$DRES"; : >"$LRES"; : >"$OUTDIR/bench.log"; : >"$OUTDIR/sizes.txt"
as_pg "$PITR" keygen --output "$WORK/keyring" >/dev/null
fi

cat >"$WORK/driver.sh" <<'EOF'
#!/usr/bin/env bash
# driver.sh MODE LIST PGDATA HOOK-CMD...   (runs as postgres, cwd = PGDATA, like Postgres)
# The hook's verbs are PUSH_VERB (archive-push) and GET_VERB (archive-get): WAL-RUS's client
# says wal-push / wal-fetch.
set -euo pipefail
mode=$1 list=$2 dir=$3; shift 3
push_verb=${PUSH_VERB:-archive-push} get_verb=${GET_VERB:-archive-get}
cd "$dir"
case $mode in
  push)  # archive_command, then .ready -> .done as the archiver does on success (WAL-RUS renames
         # it itself, and the archiver, like this driver, skips a .ready file that is gone)
    while read -r s; do
      "$@" "$push_verb" "pg_wal/$s" || { echo "$push_verb pg_wal/$s failed" >&2; exit 1; }
      [ ! -e "pg_wal/archive_status/$s.ready" ] || mv "pg_wal/archive_status/$s.ready" "pg_wal/archive_status/$s.done"
    done <"$list" ;;
  get)   dest=$1; shift   # restore_command
    while read -r s; do "$@" "$get_verb" "$s" "$dest/$s" || { echo "$get_verb $s failed" >&2; exit 1; }; done <"$list" ;;
  lat)   # LIST is a count: run "$@" that many times, print each call's wall seconds and exit
    # status ($EPOCHREALTIME: no timer process; every row, floors included, pays the same fork+exec)
    for _ in $(seq 1 "$list"); do
      rc=0; t0=$EPOCHREALTIME; "$@" >/dev/null || rc=$?; t1=$EPOCHREALTIME
      awk -v a="$t0" -v b="$t1" -v rc="$rc" 'BEGIN{printf "%.6f %d\n", b-a, rc}'
    done ;;
esac
EOF
chmod 755 "$WORK/driver.sh"
DRIVER=$WORK/driver.sh

# ---------------------------------------------------------------- S3 (optional)
DAEMON_JOB=
cleanup() {
  stop_daemon 2>/dev/null || true
  stop_s3
}
trap cleanup EXIT
[ "${SUMMARY_ONLY:-0}" = 1 ] || case " $REPOS " in *" s3 "*) start_s3;; esac

# ---------------------------------------------------------------- per-corpus / per-repo setup
# set_corpus TAG BL: CORPUS, SRC, SEGS, NSEG, SEGBYTES, MID_SEG
set_corpus() {
  TAG=$1 CORPUS=$2/corpus SRC=$2/src
  SEGS=$WORK/segs-$TAG.txt
  (cd "$CORPUS" && ls | grep -E '^[0-9A-F]{24}$' | sort) >"$SEGS"
  NSEG=$(wc -l <"$SEGS")
  SEGBYTES=$(cd "$CORPUS" && xargs stat -c %s <"$SEGS" | awk '{s+=$1} END{printf "%.0f", s}')
  MID_SEG=$(sed -n "$(((NSEG + 1) / 2))p" "$SEGS")
}

# write_configs KIND: pitr configs (push/get x concurrency) and the pgBackRest config
write_configs() {
  local kind=$1 c store repo
  if [ "$kind" = local ]; then
    repo="file://$WORK/pitr-repo-c%C" store=
  else
    repo="s3://$BUCKET/pitr-c%C"
    store=$(pitr_s3_store)
  fi
  for c in "$CONC" "$CONC_HI"; do
    for role in push get; do
      local pg=$STAGE; [ "$role" = get ] && pg=$GSTAGE
      cat >"$WORK/pitr-$role-c$c.toml" <<EOF
repo = '${repo//%C/$c}'
key_file = '$WORK/keyring'
pgdata = '$pg'
compression_level = 1
compression_threads = 0
archive_concurrency = $c
prefetch = $PREFETCH
http_addr = '$HTTP_ADDR'
store_timeout = 60
# no Postgres here: the daemon's "recovery over?" check must not reach a real server
pg_url = 'postgresql://postgres@127.0.0.1:1/postgres'
$store
EOF
    done
  done
  {
    echo "[global]"
    if [ "$kind" = local ]; then
      echo "repo1-path=$WORK/pgbr-repo"
    else
      pgbr_s3_repo /pgbr
    fi
    cat <<EOF
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$CIPHER_PASS
compress-type=zst
compress-level=1
archive-async=y
process-max=2
spool-path=$WORK/pgbr-spool
archive-get-queue-max=1GiB
archive-timeout=120
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
log-level-console=warn
log-level-stderr=warn
log-level-file=warn

[bench]
pg1-path=$STAGE
EOF
  } >"$WORK/pgbackrest.conf"
  chown postgres: "$WORK"/*.toml "$WORK/pgbackrest.conf"; chmod 600 "$WORK/pgbackrest.conf"
}
PGBR() { echo pgbackrest "--config=$WORK/pgbackrest.conf" --stanza=bench "$@"; }

fresh_dir() { rm -rf "$1"; mkdir -p "$1"; chown postgres: "$1"; }
stage_pgdata() {   # DIR [ready]: fake PGDATA; with "ready", pg_wal holds the corpus + .ready files
  rm -rf "$1"; mkdir -p "$1/global" "$1/pg_wal/archive_status"
  cp "$SRC/global/pg_control" "$1/global/"; cp "$SRC/PG_VERSION" "$1/"
  if [ "${2:-}" = ready ]; then
    while read -r s; do ln "$CORPUS/$s" "$1/pg_wal/$s"; : >"$1/pg_wal/archive_status/$s.ready"; done <"$SEGS"
  fi
  chown -R postgres: "$1"; chmod 700 "$1"
}
fresh_pitr_repo() {   # KIND CONC
  if [ "$1" = local ]; then fresh_dir "$WORK/pitr-repo-c$2"; else s3_rm_prefix "pitr-c$2"; fi
}
pitr_objects() {   # KIND CONC -> number of WAL objects
  local d; if [ "$1" = local ]; then d=$WORK/pitr-repo-c$2/wal; else d=$S3DATA/$BUCKET/pitr-c$2/wal; fi
  find "$d" -type f -name '0*' ! -name '*.s3s*' 2>/dev/null | grep -cE '/[0-9A-F]{24}$' || true
}
pitr_bytes() {
  local d; if [ "$1" = local ]; then d=$WORK/pitr-repo-c$2/wal; else d=$S3DATA/$BUCKET/pitr-c$2/wal; fi
  find "$d" -type f | grep -E '/[0-9A-F]{24}$' | xargs stat -c %s | awk '{s+=$1} END{print s}'
}
pgbr_dir() { if [ "$1" = local ]; then echo "$WORK/pgbr-repo"; else echo "$S3DATA/$BUCKET/pgbr"; fi; }
fresh_pgbr_repo() {   # KIND
  if [ "$1" = local ]; then fresh_dir "$WORK/pgbr-repo"; else s3_rm_prefix pgbr; fi
  fresh_dir "$WORK/pgbr-spool"; fresh_dir "$WORK/pgbr-lock"; fresh_dir "$WORK/pgbr-log"
  # shellcheck disable=SC2046
  as_pg $(PGBR) --no-online stanza-create >/dev/null
}
pgbr_objects() { find "$(pgbr_dir "$1")/archive" -type f -name '0*-*' | grep -cvE '\.s3s' || true; }
pgbr_bytes() { find "$(pgbr_dir "$1")/archive" -type f -name '0*-*' | xargs stat -c %s | awk '{s+=$1} END{print s}'; }
pgbr_wait_idle() {   # the async process outlives the last hook; let it exit before anything else
  local i; for i in $(seq 1 600); do pgrep -u postgres -x pgbackrest >/dev/null || return 0; sleep 0.1; done
  die "pgBackRest's async process is still running after 60 s"
}

# ---------------------------------------------------------------- daemon control
# rss_sampler.py PID OUT: every 50 ms, the peaks of VmRSS, RssAnon (heap, stacks) and RssFile
# (file pages mapped by the process, i.e. page cache it has mmapped) until PID exits or OUT.stop
cat >"$WORK/rss_sampler.py" <<'EOF'
import os, sys, time
pid, out = sys.argv[1], sys.argv[2]
peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
while not os.path.exists(out + ".stop"):
    try:
        for line in open(f"/proc/{pid}/status"):
            key = line.split(":")[0]
            if key in peak:
                peak[key] = max(peak[key], int(line.split()[1]))
    except OSError:
        break
    time.sleep(0.05)
open(out, "w").write(f"{peak['VmRSS']} {peak['RssAnon']} {peak['RssFile']}\n")
EOF
DAEMON_PID= SAMPLER_PID=
start_daemon() {   # CONF LOG: start as postgres, wait until the hook socket exists
  local conf=$1 logf=$2 pgdata sock
  pgdata=$(sed -n "s/^pgdata = '\(.*\)'$/\1/p" "$conf"); sock=$pgdata/pitr.sock
  rm -f "$RUN/daemon.pid"
  # shellcheck disable=SC2086
  env ${DAEMON_ENV:-} runuser -u postgres -- sh -c 'echo $$ >"$1"; exec "$2" --config "$3" daemon' sh \
    "$RUN/daemon.pid" "$PITR" "$conf" >>"$logf" 2>&1 &
  DAEMON_JOB=$!
  await_daemon "$sock" "$logf"
}
await_daemon() {   # SOCK LOG: wait for the socket and pid file of DAEMON_JOB, then sample its memory
  local sock=$1 logf=$2 i
  for i in $(seq 1 2000); do
    [ -S "$sock" ] && [ -s "$RUN/daemon.pid" ] && break
    kill -0 "$DAEMON_JOB" 2>/dev/null || { cat "$logf" >&2; die "the daemon exited at start (log above)"; }
    sleep 0.005
  done
  [ -S "$sock" ] || die "no socket at $sock after 10 s (log: $logf)"
  DAEMON_PID=$(cat "$RUN/daemon.pid")
  rm -f "$RUN/rss" "$RUN/rss.stop"
  "$PY" "$WORK/rss_sampler.py" "$DAEMON_PID" "$RUN/rss" &
  SAMPLER_PID=$!
}
PEAKS="0 0 0"
stop_sampler() {   # sets PEAKS="vmrss_kb rssanon_kb rssfile_kb"
  PEAKS="0 0 0"
  [ -n "$SAMPLER_PID" ] || return 0
  : >"$RUN/rss.stop"; wait "$SAMPLER_PID" 2>/dev/null || true; SAMPLER_PID=
  [ -s "$RUN/rss" ] && PEAKS=$(cat "$RUN/rss")
  return 0
}
stop_daemon() {
  stop_sampler
  [ -n "$DAEMON_JOB" ] || return 0
  kill -TERM "$DAEMON_PID" 2>/dev/null || true
  wait "$DAEMON_JOB" 2>/dev/null || true
  DAEMON_JOB= DAEMON_PID=
}
daemon_snapshot() {   # LABEL RUN: VmHWM (-> SNAP_RSS_MIB), CPU, /metrics, /status of the running daemon
  local label=$1 run=$2 hwm cpu m
  stop_sampler
  hwm=$(awk '/^VmHWM:/{print $2}' "/proc/$DAEMON_PID/status")
  cpu=$(awk -v hz="$HZ" '{print ($14+$15)/hz}' "/proc/$DAEMON_PID/stat")
  m=$OUTDIR/snap/$label.$run; mkdir -p "$OUTDIR/snap"
  curl -fsS "http://$HTTP_ADDR/metrics" >"$m.metrics" 2>>"$OUTDIR/bench.log" || echo "metrics unavailable" >"$m.metrics"
  curl -fsS "http://$HTTP_ADDR/status" >"$m.status.json" 2>>"$OUTDIR/bench.log" || echo '{}' >"$m.status.json"
  metric() { awk -v k="$1" 'index($0, k) == 1 {v=$NF} END{print (v == "" ? 0 : v)}' "$m.metrics"; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$run" "$hwm" "$cpu" \
    "$(metric pitr_prefetch_hits_total)" "$(metric pitr_prefetch_misses_total)" \
    "$(metric 'pitr_hook_requests_total{result="durable"}')" \
    "$(metric 'pitr_hook_requests_total{result="waited"}')" \
    "$(metric 'pitr_hook_requests_total{result="failed"}')" "${PEAKS// /$'\t'}" >>"$DRES"
  SNAP_RSS_MIB=$((hwm / 1024))
}

# WAL-RUS's daemon (wal-g's model and variable names): one process per PGDATA on a Unix socket,
# look-ahead uploads of .ready files (WALG_UPLOAD_CONCURRENCY) and in-process prefetch
# (WALG_DOWNLOAD_CONCURRENCY); WALG_PREVENT_WAL_OVERWRITE=true, the safe setting that pitr and
# pgBackRest always have (an existing name is compared, never overwritten).
walrus_env() {   # KIND PGDATA: the daemon's environment, as VAR=value words
  local kind=$1 pgdata=$2
  echo PGDATA="$pgdata" WALG_COMPRESSION_METHOD=zstd WALG_COMPRESSION_LEVEL=1 \
    WALG_LIBSODIUM_KEY="$WALRUS_KEY" WALG_LIBSODIUM_KEY_TRANSFORM=hex WALG_PREVENT_WAL_OVERWRITE=true \
    WALG_UPLOAD_CONCURRENCY="$CONC" WALG_DOWNLOAD_CONCURRENCY="$CONC"
  if [ "$kind" = local ]; then
    echo WALG_FILE_PREFIX="$WORK/walrus-repo"
  else
    echo WALG_S3_PREFIX="s3://$BUCKET/walrus" AWS_ENDPOINT="http://127.0.0.1:$PROXY_PORT" \
      AWS_ACCESS_KEY_ID="$S3_AK" AWS_SECRET_ACCESS_KEY="$S3_SK" AWS_REGION=us-east-1 AWS_S3_FORCE_PATH_STYLE=true
  fi
}
walrus_dir() { if [ "$1" = local ]; then echo "$WORK/walrus-repo"; else echo "$S3DATA/$BUCKET/walrus"; fi; }
fresh_walrus_repo() { if [ "$1" = local ]; then fresh_dir "$WORK/walrus-repo"; else s3_rm_prefix walrus; fi; }
walrus_objects() { find "$(walrus_dir "$1")" -type f 2>/dev/null | grep -cE '/[0-9A-F]{24}\.zst$' || true; }
walrus_bytes() { find "$(walrus_dir "$1")" -type f | grep -E '/[0-9A-F]{24}\.zst$' | xargs stat -c %s | awk '{s+=$1} END{print s}'; }
start_walrus() {   # KIND PGDATA LOG: start as postgres, wait until the socket exists
  local kind=$1 pgdata=$2 logf=$3
  WALRUS_SOCK=$pgdata/walrus.sock
  rm -f "$RUN/daemon.pid" "$WALRUS_SOCK"
  # shellcheck disable=SC2046
  runuser -u postgres -- env $(walrus_env "$kind" "$pgdata") sh -c 'echo $$ >"$1"; exec "$2" daemon --socket "$3"' sh \
    "$RUN/daemon.pid" "$WORK/bin/walrus" "$WALRUS_SOCK" >>"$logf" 2>&1 &
  DAEMON_JOB=$!
  await_daemon "$WALRUS_SOCK" "$logf"
}
walrus_snapshot() {   # LABEL RUN: VmHWM and CPU of the running WAL-RUS daemon (no metrics)
  local hwm cpu
  stop_sampler
  hwm=$(awk '/^VmHWM:/{print $2}' "/proc/$DAEMON_PID/status")
  cpu=$(awk -v hz="$HZ" '{print ($14+$15)/hz}' "/proc/$DAEMON_PID/stat")
  printf '%s\t%s\t%s\t%s\t-\t-\t-\t-\t-\t%s\n' "$1" "$2" "$hwm" "$cpu" "${PEAKS// /$'\t'}" >>"$DRES"
  SNAP_RSS_MIB=$((hwm / 1024))
}

# timed window: tstart / tstop around a phase; records wall and machine-wide CPU
T0= C0= B0=0
tstart() { wait_idle; B0=0; busy && B0=1; C0=$(cpu_ticks); T0=$EPOCHREALTIME; }
tstop() {   # LABEL RUN
  local t1 c1 w c; t1=$EPOCHREALTIME; c1=$(cpu_ticks)
  busy && B0=1
  [ "$B0" = 1 ] && { BUSY_SEEN=1; log "WARNING: another workload ($BUSY_PROCS) ran during $1 #$2"; }
  w=$(awk -v a="$T0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')
  c=$(awk -v a="$C0" -v b="$c1" -v hz="$HZ" 'BEGIN{printf "%.2f", (b-a)/hz}')
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$w" "$c" "$B0" >>"$RES"
  LAST_WALL=$w
}
run_driver() {   # LABEL DRIVER-ARGS...: as postgres; failure shows the log
  local label=$1; shift
  if ! runuser -u postgres -- env PUSH_VERB="${PUSH_VERB:-archive-push}" GET_VERB="${GET_VERB:-archive-get}" \
      "$DRIVER" "$@" 2>>"$OUTDIR/bench.log"; then
    tail -20 "$OUTDIR/bench.log" >&2; die "$label failed (see $OUTDIR/bench.log)"
  fi
}
mibs() { awk -v b="$SEGBYTES" -v w="$1" 'BEGIN{printf "%.0f", b/1048576/w}'; }

# ---------------------------------------------------------------- phases
# The physical limits are measured in the same rounds as the tools, one measurement beside each
# round of runs: this VM's speed drifts by tens of percent within minutes (its host), and limits
# measured once at the start compared the tools with another moment's machine.
limits_prepare() {   # the concatenated corpus, its zstd -1 form and the fsync'd-copy script
  LIMIT_CAT=$WORK/corpus.cat
  log "[$TAG] limits: zstd -1 -T1/-T2 and zstd -d in each push round, fsync'd copy 1 and 2 at a time in each get round"
  (cd "$CORPUS" && xargs cat <"$SEGS") >"$LIMIT_CAT"
  zstd -q -1 -T1 -c "$LIMIT_CAT" >"$LIMIT_CAT.zst"
  sync   # the 3 GB just written must not be flushed during the fsync'd-copy runs
  echo "$TAG zstd1_bytes $(stat -c %s "$LIMIT_CAT.zst")" >>"$OUTDIR/sizes.txt"
  cat >"$WORK/fsync_copy.py" <<'EOF'
# fsync_copy.py SRC DST LIST JOBS: copy every segment, fsync it and the directory, JOBS at a time
import os, shutil, sys
from concurrent.futures import ThreadPoolExecutor
src, dst, lst, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def copy(name):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    for path in (os.path.join(dst, name), dst):
        fd = os.open(path, os.O_RDONLY); os.fsync(fd); os.close(fd)
with ThreadPoolExecutor(jobs) as pool:
    list(pool.map(copy, open(lst).read().split()))
EOF
}
push_limits() {   # RUN: the push limit (zstd -1 on one and two cores) and zstd -d
  tstart; zstd -q -1 -T1 -c "$LIMIT_CAT" >/dev/null; tstop "$TAG-limit-zstd1-T1" "$1"
  tstart; zstd -q -1 -T2 -c "$LIMIT_CAT" >/dev/null; tstop "$TAG-limit-zstd1-T2" "$1"
  tstart; zstd -q -d -c "$LIMIT_CAT.zst" >/dev/null; tstop "$TAG-limit-zstd-d" "$1"
}
get_limits() {   # RUN: the get limit, a copy of every segment fsync'd one and two at a time
  local j
  for j in 1 2; do
    fresh_dir "$WORK/cpcopy"; sync
    tstart; "$PY" "$WORK/fsync_copy.py" "$CORPUS" "$WORK/cpcopy" "$SEGS" $j; tstop "$TAG-limit-copy-fsync-j$j" "$1"
  done
  rm -rf "$WORK/cpcopy"
}

push_pgbr() {   # KIND RUN
  local kind=$1 r=$2 label=$TAG-$1-push-pgbr-async n
  stage_pgdata "$STAGE" ready; fresh_pgbr_repo "$kind"; sync
  # shellcheck disable=SC2046
  tstart; run_driver "$label" push "$SEGS" "$STAGE" $(PGBR); tstop "$label" "$r"
  pgbr_wait_idle
  n=$(pgbr_objects "$kind"); [ "$n" -eq "$NSEG" ] || die "$label: pgBackRest archived $n of $NSEG segments"
  log "$label #$r: ${LAST_WALL}s $(mibs "$LAST_WALL") MiB/s"
}
push_pitr() {   # KIND CONC RUN [keep]: with "keep" the daemon stays up (for the latency phase)
  local kind=$1 c=$2 r=$3 label=$TAG-$1-push-pitr-c$2 n rss
  stage_pgdata "$STAGE" ready; fresh_pitr_repo "$kind" "$c"; sync
  tstart
  start_daemon "$WORK/pitr-push-c$c.toml" "$OUTDIR/daemon-$label.log"
  run_driver "$label" push "$SEGS" "$STAGE" "$PITR" --config "$WORK/pitr-push-c$c.toml"
  tstop "$label" "$r"
  daemon_snapshot "$label" "$r"; rss=$SNAP_RSS_MIB
  [ "${4:-}" = keep ] || stop_daemon
  n=$(pitr_objects "$kind" "$c"); [ "$n" -eq "$NSEG" ] || die "$label: pitr stored $n of $NSEG segments"
  log "$label #$r: ${LAST_WALL}s $(mibs "$LAST_WALL") MiB/s, daemon peak RSS ${rss} MiB"
}
push_walrus() {   # KIND RUN
  local kind=$1 r=$2 label=$TAG-$1-push-walrus-c$CONC n
  stage_pgdata "$STAGE" ready; fresh_walrus_repo "$kind"; sync
  tstart
  start_walrus "$kind" "$STAGE" "$OUTDIR/daemon-$label.log"
  PUSH_VERB=wal-push run_driver "$label" push "$SEGS" "$STAGE" "$WORK/bin/walrus" daemon-client --socket "$WALRUS_SOCK"
  tstop "$label" "$r"
  walrus_snapshot "$label" "$r"; stop_daemon
  n=$(walrus_objects "$kind"); [ "$n" -eq "$NSEG" ] || die "$label: WAL-RUS stored $n of $NSEG segments"
  log "$label #$r: ${LAST_WALL}s $(mibs "$LAST_WALL") MiB/s, daemon peak RSS ${SNAP_RSS_MIB} MiB"
}
get_walrus() {   # KIND RUN
  local kind=$1 r=$2 label=$TAG-$1-get-walrus-c$CONC
  stage_pgdata "$GSTAGE"; fresh_dir "$GETDIR"; sync
  tstart
  start_walrus "$kind" "$GSTAGE" "$OUTDIR/daemon-$label.log"
  GET_VERB=wal-fetch run_driver "$label" get "$SEGS" "$GSTAGE" "$GETDIR" "$WORK/bin/walrus" daemon-client --socket "$WALRUS_SOCK"
  tstop "$label" "$r"
  walrus_snapshot "$label" "$r"; stop_daemon
  [ "$r" = 1 ] && verify_get "$label"
  log "$label #$r: ${LAST_WALL}s $(mibs "$LAST_WALL") MiB/s, daemon peak RSS ${SNAP_RSS_MIB} MiB"
}
verify_get() {   # LABEL
  local s bad=0
  while read -r s; do cmp -s "$CORPUS/$s" "$GETDIR/$s" || { log "MISMATCH: $1 $s"; bad=$((bad + 1)); }; done <"$SEGS"
  [ "$bad" -eq 0 ] || die "$1: $bad of $NSEG restored segments differ from the corpus"
  log "$1: all $NSEG restored segments identical to the corpus"
}
get_pgbr() {   # KIND RUN
  local kind=$1 r=$2 label=$TAG-$1-get-pgbr-async
  stage_pgdata "$GSTAGE"; fresh_dir "$GETDIR"; rm -rf "$WORK/pgbr-spool/archive"; sync
  # shellcheck disable=SC2046
  tstart; run_driver "$label" get "$SEGS" "$GSTAGE" "$GETDIR" $(PGBR --pg1-path="$GSTAGE"); tstop "$label" "$r"
  pgbr_wait_idle
  [ "$r" = 1 ] && verify_get "$label"
  log "$label #$r: ${LAST_WALL}s $(mibs "$LAST_WALL") MiB/s"
}
get_pitr() {   # KIND CONC RUN
  local kind=$1 c=$2 r=$3 label=$TAG-$1-get-pitr-c$2 rss
  stage_pgdata "$GSTAGE"; fresh_dir "$GETDIR"; sync
  tstart
  start_daemon "$WORK/pitr-get-c$c.toml" "$OUTDIR/daemon-$label.log"
  run_driver "$label" get "$SEGS" "$GSTAGE" "$GETDIR" "$PITR" --config "$WORK/pitr-get-c$c.toml"
  tstop "$label" "$r"
  daemon_snapshot "$label" "$r"; rss=$SNAP_RSS_MIB
  stop_daemon
  [ "$r" = 1 ] && verify_get "$label"
  log "$label #$r: ${LAST_WALL}s $(mibs "$LAST_WALL") MiB/s, daemon peak RSS ${rss} MiB"
}
lat() {   # LABEL PGDATA CMD...: LAT_CALLS+1 calls, the first dropped; a failed call stops the
          # bench unless LAT_TOLERANT=1 (then it is counted: latency.tsv column 4 = exit status)
  local label=$1 dir=$2 i=0 t rc fails; shift 2
  wait_idle; busy && { BUSY_SEEN=1; log "WARNING: another workload ($BUSY_PROCS) ran during $label"; }
  echo "== $label" >>"$OUTDIR/bench.log"
  runuser -u postgres -- "$DRIVER" lat $((LAT_CALLS + 1)) "$dir" "$@" 2>>"$OUTDIR/bench.log" >"$WORK/lat.out" \
    || { tail -5 "$OUTDIR/bench.log" >&2; die "$label failed"; }
  busy && { BUSY_SEEN=1; log "WARNING: another workload ($BUSY_PROCS) ran during $label"; }
  fails=$(awk '$2 != 0' "$WORK/lat.out" | wc -l)
  if [ "$fails" -gt 0 ]; then
    log "$label: $fails of $((LAT_CALLS + 1)) calls failed (stderr in $OUTDIR/bench.log)"
    [ "${LAT_TOLERANT:-0}" = 1 ] || die "$label failed"
  fi
  tail -n +2 "$WORK/lat.out" | while read -r t rc; do i=$((i + 1)); printf '%s\t%s\t%s\t%s\n' "$label" "$i" "$t" "$rc" >>"$LRES"; done
}
latency() {   # KIND: the stage and pitr-c$CONC repository of the last push run, daemon still up
  local kind=$1 p="pg_wal/$MID_SEG" before after
  log "[$TAG/$kind] hook latency: $LAT_CALLS calls each (+1 warm-up) on $MID_SEG"
  hook_durable() { curl -fsS "http://$HTTP_ADDR/metrics" | awk '/^pitr_hook_requests_total\{result="durable"\}/{v=$NF} END{print v+0}'; }
  # the daemon is ours and running: only the BUSY_PROCS check applies before this phase. The
  # small hook and pitr alternate, so drift on a shared machine affects both alike.
  local round
  for round in $(seq 1 "$LAT_ROUNDS"); do
    if [ "$SMALL_PUSH_BIN" != none ]; then
    before=$(hook_durable)
    WAIT_LOAD=0 lat "$TAG-$kind-lat-small-daemon" "$STAGE" "$WORK/bin/pitr-archive-push" --config "$WORK/pitr-push-c$CONC.toml" "$p"
    after=$(hook_durable)
    echo "$TAG $kind lat-small-daemon round $round durable_answers $((after - before)) of $((LAT_CALLS + 1))" >>"$OUTDIR/sizes.txt"
    fi
    before=$(hook_durable)
    WAIT_LOAD=0 lat "$TAG-$kind-lat-pitr-daemon" "$STAGE" "$PITR" --config "$WORK/pitr-push-c$CONC.toml" archive-push "$p"
    after=$(hook_durable)
    echo "$TAG $kind lat-pitr-daemon round $round durable_answers $((after - before)) of $((LAT_CALLS + 1))" >>"$OUTDIR/sizes.txt"
  done
  stop_daemon
  # without a daemon the hook pushes by itself (create-only PUT, then reads the stored object back
  # and compares); on s3s-fs the refused PUT can fail with a broken pipe (see README), so failures
  # are counted here instead of stopping the bench
  LAT_TOLERANT=1 lat "$TAG-$kind-lat-pitr-direct" "$STAGE" "$PITR" --config "$WORK/pitr-push-c$CONC.toml" archive-push "$p"
  if [ "$HAVE_PGBR" = 1 ] && [ "$LAT_ONLY" != 1 ]; then   # its repository comes from the push runs
    # shellcheck disable=SC2046
    lat "$TAG-$kind-lat-pgbr-async" "$STAGE" $(PGBR) archive-push "$p"
    pgbr_wait_idle
  fi
  if [ -n "$WALRUS_BIN" ]; then   # its repository of the last walrus push run holds the segment
    start_walrus "$kind" "$STAGE" "$OUTDIR/daemon-$TAG-$kind-lat-walrus.log"
    WAIT_LOAD=0 lat "$TAG-$kind-lat-walrus-daemon" "$STAGE" "$WORK/bin/walrus" daemon-client --socket "$WALRUS_SOCK" wal-push "$p"
    stop_daemon
  fi
}
floors() {
  lat floor-true "$STAGE" /bin/true
  lat floor-pitr-version "$STAGE" "$PITR" --version
  [ "$HAVE_PGBR" = 0 ] || lat floor-pgbackrest-version "$STAGE" pgbackrest version
  [ -z "$WALRUS_BIN" ] || lat floor-walrus-version "$STAGE" "$WORK/bin/walrus" --version
}

# ---------------------------------------------------------------- main loop
if [ "${SUMMARY_ONLY:-0}" = 1 ]; then
  DONE_CORPORA=$(awk '$2 == "corpus" {print $1}' "$OUTDIR/sizes.txt" | tr '\n' ' ')
else
log "pitr $("$PITR" --version | cut -d' ' -f2) ($(sha256sum "$PITR" | cut -c1-12)), $(pgbr_version); corpora: $CORPORA; repos: $REPOS"
FIRST=1 DONE_CORPORA=
for spec in $CORPORA; do
  tag=${spec%%:*} bl=${spec#*:}
  if [ ! -f "$bl/src/global/pg_control" ] || ! ls "$bl/corpus" 2>/dev/null | grep -qE '^[0-9A-F]{24}$'; then
    log "corpus $tag ($bl) not built; skipping it"; echo "$tag skipped: no corpus in $bl" >>"$OUTDIR/sizes.txt"; continue
  fi
  set_corpus "$tag" "$bl"
  DONE_CORPORA="$DONE_CORPORA $TAG"
  echo "$TAG corpus $CORPUS nseg $NSEG bytes $SEGBYTES" >>"$OUTDIR/sizes.txt"
  log "[$TAG] corpus $CORPUS: $NSEG segments, $SEGBYTES bytes"
  (cd "$CORPUS" && xargs cat <"$SEGS" >/dev/null)   # hot page cache, for every tool alike
  [ "$LAT_ONLY" = 1 ] || limits_prepare
  for kind in $REPOS; do
    write_configs "$kind"
    if [ "$LAT_ONLY" = 1 ]; then   # the short form: one push run keeps the daemon up for the latency phase
      log "[$TAG/$kind] LAT_ONLY: one pitr push run (daemon c$CONC), then the hook latency"
      push_pitr "$kind" "$CONC" 1 keep
      latency "$kind"
      if [ "$FIRST" = 1 ]; then floors; FIRST=0; fi
      continue
    fi
    log "[$TAG/$kind] push: $RUNS runs (pgBackRest async p2, pitr daemon c$CONC, c$CONC_HI), interleaved"
    for r in $(seq 1 "$RUNS"); do
      push_pgbr "$kind" "$r"
      push_pitr "$kind" "$CONC_HI" "$r"
      push_limits "$r"
      [ -z "$WALRUS_BIN" ] || push_walrus "$kind" "$r"
      if [ "$r" = "$RUNS" ]; then push_pitr "$kind" "$CONC" "$r" keep; else push_pitr "$kind" "$CONC" "$r"; fi
    done
    echo "$TAG $kind pgbr-async bytes $(pgbr_bytes "$kind")" >>"$OUTDIR/sizes.txt"
    echo "$TAG $kind pitr bytes $(pitr_bytes "$kind" "$CONC")" >>"$OUTDIR/sizes.txt"
    [ -z "$WALRUS_BIN" ] || echo "$TAG $kind walrus bytes $(walrus_bytes "$kind")" >>"$OUTDIR/sizes.txt"
    latency "$kind"
    if [ "$FIRST" = 1 ]; then floors; FIRST=0; fi
    log "[$TAG/$kind] get: $RUNS runs (pgBackRest async p2, pitr daemon prefetch=$PREFETCH c$CONC, c$CONC_HI)"
    for r in $(seq 1 "$RUNS"); do
      get_pgbr "$kind" "$r"
      # the two concurrencies swap places every round: the run after another run's deletes
      # can be slower on this VM, and a fixed order would charge that to one of them
      if [ $((r % 2)) = 1 ]; then
        get_pitr "$kind" "$CONC" "$r"; get_pitr "$kind" "$CONC_HI" "$r"
      else
        get_pitr "$kind" "$CONC_HI" "$r"; get_pitr "$kind" "$CONC" "$r"
      fi
      [ -z "$WALRUS_BIN" ] || get_walrus "$kind" "$r"
      get_limits "$r"
    done
    rm -rf "$GETDIR"
  done
  rm -f "${LIMIT_CAT:-}" "${LIMIT_CAT:-}.zst"
done
[ -n "$DONE_CORPORA" ] || die "no corpus found in CORPORA=$CORPORA"
fi

# ---------------------------------------------------------------- summary
med() {   # FILE LABEL COLUMN -> median
  awk -F'\t' -v l="$2" -v c="$3" '$1==l{print $c}' "$1" | sort -g \
    | awk '{v[NR]=$1} END{if(!NR){print "NA"; exit} print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}'
}
pct() {   # LABEL P -> nearest-rank percentile of latency.tsv, in ms
  awk -F'\t' -v l="$1" '$1==l{print $3}' "$LRES" | sort -g \
    | awk -v p="$2" '{v[NR]=$1} END{if(!NR){print "NA"; exit} i=int(NR*p/100+0.999); if(i<1)i=1; printf "%.2f", v[i]*1000}'
}
maxcol() { awk -F'\t' -v l="$1" -v c="$2" '$1==l && $c+0>m{m=$c+0} END{print m+0}' "$DRES"; }
div() { awk -v a="$1" -v b="$2" 'BEGIN{if(b+0==0||a=="NA"||b=="NA"){print "-"; exit} printf "%.2f", a/b}'; }
{
  echo "pitr daemon bench  $(date -u '+%Y-%m-%d %H:%M:%SZ')  host $(hostname) ($(nproc) CPUs)"
  echo "$("$PITR" --version) (sha256 $(sha256sum "$PITR" | cut -c1-12)); $(pgbr_version); runs=$RUNS (medians)"
  echo "pgBackRest: archive-async=y process-max=2 zst-1 aes-256-cbc spool-path.  pitr daemon: archive_concurrency=c, compression_level=1,"
  echo "compression_threads=0, keyring (AES-256-GCM), prefetch=$PREFETCH.  S3 (if run): s3s-fs on loopback, +${DELAY_MS} ms each way (20 ms RTT at ${DELAY_MS})."
  ! grep -q -- '-walrus-' "$RES" || echo "WAL-RUS $("$WORK/bin/walrus" --version 2>/dev/null | head -1): daemon, WALG_UPLOAD/DOWNLOAD_CONCURRENCY=$CONC, zstd level 1, libsodium, WALG_PREVENT_WAL_OVERWRITE=true."
  [ -n "${DAEMON_ENV:-}" ] && echo "NOTE: the daemon ran with DAEMON_ENV=$DAEMON_ENV (a what-if run, not the default setup)"
  [ "$LAT_ONLY" = 1 ] && echo "LAT_ONLY=1: the short form (one push run per repository, hook latency and floors only; LAT_CALLS=$LAT_CALLS, LAT_ROUNDS=$LAT_ROUNDS)"
  [ "$WAITED_S" -gt 0 ] && echo "note: waited $WAITED_S s in total for the machine to be idle before timed phases"
  [ "$BUSY_SEEN" = 1 ] && echo "WARNING: another workload ($BUSY_PROCS) ran during some measurements (see the log, busy column of results.tsv); figures are pessimistic"
  for TAG in $DONE_CORPORA; do
    read -r _ _ _ _ NSEG _ SEGBYTES < <(grep "^$TAG corpus " "$OUTDIR/sizes.txt")
    MIB=$(awk -v b="$SEGBYTES" 'BEGIN{printf "%.1f", b/1048576}')
    rate() { local m; m=$(med "$RES" "$1" 3); [ "$m" = NA ] && { echo NA; return; }; awk -v b="$SEGBYTES" -v m="$m" 'BEGIN{printf "%.0f", b/1048576/m}'; }
    z1=$(rate "$TAG-limit-zstd1-T1") z2=$(rate "$TAG-limit-zstd1-T2") zd=$(rate "$TAG-limit-zstd-d") cp1=$(rate "$TAG-limit-copy-fsync-j1") cp2=$(rate "$TAG-limit-copy-fsync-j2")
    cp=$(awk -v a="$cp1" -v b="$cp2" 'BEGIN{print (a+0 > b+0) ? a : b}')
    zb=$(awk -v t="$TAG" '$1==t && $2=="zstd1_bytes"{print $3}' "$OUTDIR/sizes.txt")
    echo
    echo "== corpus $TAG: $NSEG segments, $MIB MiB, zstd -1 ratio $(div "$SEGBYTES" "$zb")"
    echo "limits (MiB/s of WAL): zstd -1 one core $z1, two cores $z2 (push limit); fsync'd copy $cp1 one at a time, $cp2 two at a time (get limit: the faster); zstd -d one core $zd"
    printf '%-6s %-5s %-11s %8s %8s %7s %7s %7s %9s %8s %8s %9s\n' repo op tool median_s MiB/s cpu_s dmn_cpu rss_MiB anon/file vs_pgbr of_limit hits/miss
    for kind in $REPOS; do
      for op in push get; do
        base=$(rate "$TAG-$kind-$op-pgbr-async")
        lim=$z2; [ "$op" = get ] && lim=$cp
        for tool in pgbr-async "pitr-c$CONC" "pitr-c$CONC_HI" "walrus-c$CONC"; do
          l=$TAG-$kind-$op-$tool
          m=$(med "$RES" "$l" 3); [ "$m" = NA ] && continue
          v=$(rate "$l")
          rss=-; hm=-; af=-; dc=-
          case $tool in pitr*|walrus*)
            dc=$(med "$DRES" "$l" 4)
            rss=$(awk -v k="$(maxcol "$l" 3)" 'BEGIN{printf "%.0f", k/1024}')
            af=$(awk -v a="$(maxcol "$l" 11)" -v f="$(maxcol "$l" 12)" 'BEGIN{printf "%.0f/%.0f", a/1024, f/1024}')
            # prefetch hits and misses come from pitr's metrics; WAL-RUS exports none
            [ "$op" = get ] && [ "${tool%%-*}" = pitr ] && hm="$(med "$DRES" "$l" 5)/$(med "$DRES" "$l" 6)";;
          esac
          printf '%-6s %-5s %-11s %8.2f %8s %7s %7s %7s %9s %8s %8s %9s\n' "$kind" "$op" "$tool" "$m" "$v" \
            "$(med "$RES" "$l" 4)" "$dc" "$rss" "$af" "$( [ "$tool" = pgbr-async ] && echo - || div "$v" "$base")" \
            "$( [ "$kind" = local ] && awk -v a="$v" -v b="$lim" 'BEGIN{printf "%.0f%%", 100*a/b}' || echo -)" "$hm"
        done
      done
      echo "$kind repository bytes: pgBackRest $(awk -v t="$TAG" -v k="$kind" '$1==t && $2==k && $3=="pgbr-async"{print $5}' "$OUTDIR/sizes.txt"), pitr $(awk -v t="$TAG" -v k="$kind" '$1==t && $2==k && $3=="pitr"{print $5}' "$OUTDIR/sizes.txt")$(awk -v t="$TAG" -v k="$kind" '$1==t && $2==k && $3=="walrus"{print ", WAL-RUS " $5}' "$OUTDIR/sizes.txt")"
    done
    echo
    printf '%-34s %8s %8s %8s %7s\n' "hook latency, archived segment" p50_ms p99_ms max_ms failed
    for kind in $REPOS; do
      for l in "$TAG-$kind-lat-small-daemon" "$TAG-$kind-lat-pitr-daemon" "$TAG-$kind-lat-pitr-direct" "$TAG-$kind-lat-pgbr-async" "$TAG-$kind-lat-walrus-daemon"; do
        grep -q "^$l"$'\t' "$LRES" || continue
        printf '%-34s %8s %8s %8s %7s\n' "$l" "$(pct "$l" 50)" "$(pct "$l" 99)" "$(pct "$l" 100)" \
          "$(awk -F'\t' -v l="$l" '$1==l && $4!="" && $4+0!=0{n++} END{print n+0}' "$LRES")"
      done
    done
  done
  echo
  for l in floor-true floor-pitr-version floor-pgbackrest-version floor-walrus-version; do
    grep -q "^$l"$'\t' "$LRES" || continue
    printf '%-34s %8s %8s %8s\n' "$l" "$(pct "$l" 50)" "$(pct "$l" 99)" "$(pct "$l" 100)"
  done
  echo
  echo "MiB/s = corpus bytes / median wall time (start of daemon or first hook -> last hook returned);"
  echo "vs_pgbr = pitr MiB/s / pgBackRest MiB/s; of_limit = MiB/s / (zstd -1 -T2 for push, fsync'd copy for get);"
  echo "cpu_s = machine-wide busy CPU seconds in the window (median), dmn_cpu = the daemon's own (median); rss_MiB = max VmHWM of the daemon over the runs;"
  echo "anon/file = peak RssAnon / peak RssFile (MiB) sampled every 50 ms (RssFile: mmapped page cache, e.g. WAL files);"
  echo "hits/miss = median prefetch hits / misses per get run. Per-run rows: results.tsv, daemon.tsv, latency.tsv."
} | tee "$OUTDIR/summary.txt"

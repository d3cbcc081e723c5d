#!/usr/bin/env bash
# backup_bench.sh - pitr vs pgBackRest 2.45: full backup, full restore and point-in-time
# recovery, in one run, on the same data, with equal settings (zstd level 1, encryption on,
# 2 parallel workers: pitr --concurrency 2 / pgBackRest process-max=2).
#
# Data: the wal_corpus.sh layout in BL (corpus/ = WAL segments, corpus.base/ = cold PGDATA copy
# taken right before the timed pgbench run, corpus.meta, src/ = stopped source cluster).
#
#   A. backup + restore throughput (RUNS runs, interleaved, the tool that goes first alternating,
#      fresh repositories every run)
#      LIVE = corpus.base without pg_wal (plus the segment holding its shutdown checkpoint),
#      started as a PRIMARY with archive_mode=on. Both tools take an ONLINE full backup of this
#      same running cluster (fast checkpoint), each with archive_command switched to its own
#      archive-push (ALTER SYSTEM + reload), then restore it into an empty directory:
#        backup-pgbackrest   pgbackrest --type=full --start-fast backup       (process-max=2)
#        backup-pitr         pitr backup --concurrency 2
#        restore-pgbackrest  pgbackrest restore into an empty dir              (process-max=2)
#        restore-pitr        pitr restore --concurrency 2 into an empty dir
#      (restore rows include a final `sync -f` on the restored directory, for both tools)
#
#   B. PITR end to end (PITR_RUNS runs, interleaved, the case order rotating). Both repositories hold every corpus
#      segment (archive-push, one process per segment, from a stage PGDATA as archive_bench.sh
#      does) and a full backup of the cold base the corpus replays onto:
#        pgBackRest: offline backup (--no-online) of BASE2 = corpus.base without pg_wal, as
#                    pgbackrest_bench.sh phase 6 does
#        pitr:       `pitr backup` is online only, and an online backup of a PRIMARY copy of
#                    corpus.base cannot replay the corpus: pg_backup_start writes a new
#                    checkpoint record at 0/290000A0 on the copy, where the corpus holds the
#                    source cluster's pgbench records. So the copy is started as a HOT STANDBY
#                    with no WAL source: it stays at the base's shutdown checkpoint, and
#                    pg_backup_start/stop on a standby take the backup from that checkpoint
#                    (backup_label "BACKUP FROM: standby", start = stop = segment
#                    BASE_REDO_SEG), which the corpus WAL replays onto.
#      The target is RUN_START + TARGET_FRAC x (RUN_END - RUN_START) of the timed pgbench run
#      (default 0.85: the last quarter of the WAL). Timed from the restore command's start until
#      the restored server answers pg_is_in_recovery() = false:
#        pitr-pgbr-sync    pgbackrest restore --set --type=time; restore_command = sync archive-get
#        pitr-pgbr-async   the same with archive-get --archive-async=y --process-max=2 (queue 1 GiB)
#        pitr-pgbr-floor   the same restore; restore_command = cp from the uncompressed corpus
#        pitr-pitr         pitr restore --backup ID --target-time T --start (archive-get, prefetch 8)
#        pitr-pitr-floor   pitr restore --backup ID --target-time T; restore_command replaced by
#                          cp from the uncompressed corpus; pg_ctl start
#      Every PITR is verified: pgbench_history row count = the oracle's (rows with mtime <= T in
#      the stopped source cluster, started once with archive_mode=off, as pgbackrest_bench.sh
#      does), and identical across every case and run.
#
#   C. verify (VERIFY_RUNS runs, interleaved, the tool that goes first alternating): both part B
#      repositories (every corpus segment and the backup of the cold base), read whole:
#        verify-pgbackrest   pgbackrest verify                                  (process-max=2)
#        verify-pitr         pitr verify --full (every object authenticated: AES-GCM tags)
#        verify-pitr-decode  pitr verify --full --decode (every object decoded in full, as restore)
#      beside the physical limit: zstd -d of zstd -1 copies of the corpus and the base's files,
#      CONC processes at a time (decode on every core), to /dev/null.
#
# Usage (root, Debian bookworm, pgbackrest 2.45 + PostgreSQL 15 installed, corpus built):
#     PITR_BIN=target/release/pitr bench/backup_bench.sh
# Knobs (environment):
#   BL=/tmp/bl  CORPUS=$BL/corpus  PGBIN=/usr/lib/postgresql/15/bin
#   PITR_BIN=                 pitr binary (copied into WORK); without it `cargo build --release`
#   VERIFY_RUNS=3             repetitions of part C (verify); 0 leaves it out
#   RUNS=7  PITR_RUNS=5       repetitions of part A (backup/restore) and of part B (PITR);
#                             RUNS=0 leaves part A out (its rows print as nan)
#   PITR_CASES="pgbr-sync pgbr-async pgbr-floor pitr pitr-floor"   the part B cases to run
#   CONC=2                    pitr --concurrency = pgBackRest process-max
#   TARGET_FRAC=0.85          PITR target within the timed pgbench run
#   LIVE_PORT=54341 STBY_PORT=54342 PITR_PORT=54343   ports (unix socket in /tmp only)
#   WAIT_IDLE=1               before every timed phase, wait while daemon_bench.sh/cargo/rustc run
#   ATTEMPTS=4                a timed run disturbed by one of them is discarded and repeated
#   WORK=/tmp/pitr-bench/bwork  OUTDIR=/tmp/pitr-bench/backup-results
# Outputs in OUTDIR: results.tsv (label run wall_s user_s sys_s busy), summary.txt (also
# printed), pitr_verify.txt, bench.log (stderr of the tools).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
ROOT=$(cd "$HERE/.." && pwd)
BL=${BL:-/tmp/bl}
CORPUS=${CORPUS:-$BL/corpus}
BASE=$CORPUS.base
META=$CORPUS.meta
SRC=${SRC:-$BL/src}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
RUNS=${RUNS:-7}
REPO_KIND=${REPO_KIND:-local}   # local, or s3: the S3 stack of bench/lib.sh (20 ms round trips)
PITR_RUNS=${PITR_RUNS:-5}
VERIFY_RUNS=${VERIFY_RUNS:-3}
PITR_CASES=${PITR_CASES:-pgbr-sync pgbr-async pgbr-floor pitr pitr-floor}
CONC=${CONC:-2}
TARGET_FRAC=${TARGET_FRAC:-0.85}
LIVE_PORT=${LIVE_PORT:-54341}
STBY_PORT=${STBY_PORT:-54342}
PITR_PORT=${PITR_PORT:-54343}
WORK=${WORK:-/tmp/pitr-bench/bwork}
OUTDIR=${OUTDIR:-/tmp/pitr-bench/backup-results}
CIPHER_PASS=${CIPHER_PASS:-bench-passphrase-0123456789abcdef}

BASE2=$WORK/base2        # corpus.base without pg_wal, config tweaked: what both tools back up
LIVE=$WORK/live          # BASE2 + its checkpoint segment, run as a primary (part A)
STBY=$WORK/standby       # BASE2 + its checkpoint segment, run as an idle hot standby (part B)
STAGE_PG=$WORK/stage     # fake PGDATA for pushing the corpus: global/pg_control + pg_wal links
P=$WORK/pitr             # PITR target directory
KEYRING=$WORK/keyring
RES=$OUTDIR/results.tsv
SEGS=$WORK/segs.txt

log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
as_pg() { runuser -u postgres -- "$@"; }
now() { date +%s.%N; }
busy() { pgrep -f daemon_bench.sh >/dev/null || pgrep -x cargo >/dev/null || pgrep rustc >/dev/null; }
WAITED_S=0
wait_idle() {
  [ "${WAIT_IDLE:-1}" = 1 ] || return 0
  local t0=$SECONDS
  while busy; do sleep 5; done
  if [ $((SECONDS - t0)) -gt 0 ]; then
    WAITED_S=$((WAITED_S + SECONDS - t0)); log "waited $((SECONDS - t0)) s for daemon_bench.sh/cargo/rustc to finish"
  fi
  prewarm_memory "${PREWARM_MIB:-4096}"
}

[ "$(id -u)" = 0 ] || die "run as root (the tools run as postgres through runuser)"
command -v pgbackrest >/dev/null || die "pgbackrest is not installed (apt-get install pgbackrest)"
command -v jq >/dev/null || die "jq is missing (apt-get install jq)"
[ -x /usr/bin/time ] || die "/usr/bin/time is missing (apt-get install time)"
[ -x "$PGBIN/pg_ctl" ] || die "no PostgreSQL 15 in $PGBIN"
[ -f "$META" ] && [ -d "$BASE" ] && [ -f "$SRC/global/pg_control" ] || die "no corpus in $BL: run bench/wal_corpus.sh first"
# shellcheck disable=SC1090
source "$META"

if [ -z "${PITR_BIN:-}" ]; then
  while busy; do log "another cargo/rustc is running; waiting before cargo build"; sleep 20; done
  (cd "$ROOT" && cargo build --release --quiet) >&2
  PITR_BIN=$ROOT/target/release/pitr
fi
[ -x "$PITR_BIN" ] || die "no pitr binary at $PITR_BIN"

# ---------------------------------------------------------------- clusters we start, stopped on exit
STARTED=()
pg_start() {   # dir log extra-options: start and remember it
  as_pg "$PGBIN/pg_ctl" -D "$1" -l "$2" -w -t 300 ${3:+-o "$3"} start >/dev/null
  STARTED+=("$1")
}
pg_stop() { [ -f "$1/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$1" -m "${2:-fast}" -w -t 300 stop >/dev/null || true; }
cleanup() {
  local d
  for d in "${STARTED[@]}"; do [ -f "$d/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1; done
  stop_s3
  return 0
}
trap cleanup EXIT
psql_at() { local port=$1; shift; as_pg "$PGBIN/psql" -h /tmp -p "$port" -X -At -v ON_ERROR_STOP=1 "$@"; }

# ---------------------------------------------------------------- layout
for d in "$LIVE" "$STBY" "$P"; do pg_stop "$d" immediate; done
rm -rf "$WORK"; mkdir -p "$WORK/bin" "$OUTDIR"
install -m 755 "$PITR_BIN" "$WORK/bin/pitr"
PITR=$WORK/bin/pitr
chown postgres: "$WORK"
S3DATA=$WORK/s3data
[ "$REPO_KIND" = s3 ] && start_s3
# Repositories by name (pitr-live, pgbr-live, pitr-pitr, pgbr-pitr): where their objects lie on
# this machine's disk (s3s-fs keeps one file per object), and how to empty one.
repo_dir() { if [ "$REPO_KIND" = s3 ]; then echo "$S3DATA/$BUCKET/$1"; else echo "$WORK/$1-repo"; fi; }
fresh_repo() {
  if [ "$REPO_KIND" = s3 ]; then s3_rm_prefix "$1"; else rm -rf "$WORK/$1-repo"; fresh_dir "$WORK/$1-repo"; fi
}
: >"$RES"; : >"$OUTDIR/bench.log"; : >"$OUTDIR/pitr_verify.txt"

(cd "$CORPUS" && ls | grep -E '^[0-9A-F]{24}$' | sort) >"$SEGS"
NSEG=$(wc -l <"$SEGS")

# BASE2: the cold base without WAL. Restored copies listen on the socket only, on PITR_PORT,
# and never archive (the base's archive_command would copy into the corpus directory).
log "preparing $BASE2, $LIVE, $STBY from $BASE"
cp -a "$BASE" "$BASE2"
rm -f "$BASE2"/pg_wal/0* "$BASE2"/pg_wal/archive_status/* "$BASE2/postmaster.pid" "$BASE2/postmaster.opts"
cat >>"$BASE2/postgresql.conf" <<EOF

# ---- backup_bench.sh
port = $PITR_PORT
listen_addresses = ''
unix_socket_directories = '/tmp'
archive_mode = off
archive_command = ''
EOF
DATA_BYTES=$(du -sb "$BASE2" | cut -f1)
for d in "$LIVE" "$STBY"; do
  cp -a "$BASE2" "$d"
  cp -a "$BASE/pg_wal/$BASE_REDO_SEG" "$d/pg_wal/"     # holds the shutdown checkpoint
done
: >"$STBY/standby.signal"; chown postgres: "$STBY/standby.signal"

mkdir -p "$STAGE_PG/pg_wal/archive_status" "$STAGE_PG/global"
cp "$SRC/global/pg_control" "$STAGE_PG/global/"; cp "$SRC/PG_VERSION" "$STAGE_PG/"
# Each segment marked ready, as Postgres marks what it hands to archive_command.
while read -r s; do ln "$CORPUS/$s" "$STAGE_PG/pg_wal/$s"; : >"$STAGE_PG/pg_wal/archive_status/$s.ready"; done <"$SEGS"
chown -R postgres: "$STAGE_PG"; chmod 700 "$STAGE_PG"

as_pg "$PITR" keygen --output "$KEYRING" >/dev/null
pitr_conf() {   # name pgdata
  local repo="file://$WORK/pitr-$1-repo" store=
  if [ "$REPO_KIND" = s3 ]; then repo="s3://$BUCKET/pitr-$1" store=$(pitr_s3_store); fi
  cat >"$WORK/pitr-$1.toml" <<EOF
repo = '$repo'
key_file = '$KEYRING'
compression_level = 1
archive_concurrency = $CONC
store_timeout = 120
${2:+pgdata = '$2'}
$store
EOF
}
pitr_conf live "$LIVE"
pitr_conf pitr ""
pgbr_conf() {   # name stanza pg1-path [port]
  cat >"$WORK/pgbr-$1.conf" <<EOF
[global]
$(if [ "$REPO_KIND" = s3 ]; then pgbr_s3_repo "/pgbr-$1"; else echo "repo1-path=$WORK/pgbr-$1-repo"; fi)
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$CIPHER_PASS
repo1-retention-full=99
compress-type=zst
compress-level=1
process-max=$CONC
start-fast=y
spool-path=$WORK/pgbr-spool
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
log-level-console=warn
log-level-file=info
archive-timeout=120
archive-get-queue-max=1GiB

[$2]
pg1-path=$3
${4:+pg1-port=$4}
pg1-socket-path=/tmp
EOF
}
pgbr_conf live live "$LIVE" "$LIVE_PORT"
pgbr_conf pitr bench "$STAGE_PG"
mkdir -p "$WORK/pgbr-spool" "$WORK/pgbr-lock" "$WORK/pgbr-log"
chown -R postgres: "$WORK"
chmod 600 "$WORK"/pgbr-*.conf
PGBR_LIVE=(pgbackrest "--config=$WORK/pgbr-live.conf" --stanza=live)
PGBR_PITR=(pgbackrest "--config=$WORK/pgbr-pitr.conf" --stanza=bench)
PITR_LIVE=("$PITR" --config "$WORK/pitr-live.toml")
PITR_PITR=("$PITR" --config "$WORK/pitr-pitr.toml")
PGENV=(env PGHOST=/tmp PGUSER=postgres PGDATABASE=postgres)

fresh_dir() { rm -rf "$1"; mkdir -m 700 -p "$1"; chown postgres: "$1"; }

log "corpus $CORPUS: $NSEG segments; base data $DATA_BYTES bytes; $(pgbackrest version); $("$PITR" --version)"

# timed LABEL RUN CMD... : whole-process wall/user/sys of CMD (children included)
BUSY_SEEN=0
# A run during which daemon_bench.sh/cargo/rustc was seen is discarded and repeated (up to
# ATTEMPTS times; the last attempt is kept, marked busy=1). Timed commands must be repeatable:
# a `prepare` function, if set, runs before every attempt.
ATTEMPTS=${ATTEMPTS:-4}
RETRIED=0
timed() {
  local label=$1 run=$2 w u s b a; shift 2
  for a in $(seq 1 "$ATTEMPTS"); do
    [ -n "${prepare:-}" ] && $prepare
    wait_idle
    b=0; busy && b=1
    if ! /usr/bin/time -f '%e %U %S' -o "$WORK/time.out" "$@" >"$WORK/stdout.out" 2>"$WORK/stderr.out"; then
      cat "$WORK/stdout.out" "$WORK/stderr.out" >&2
      die "$label run $run failed (output above)"
    fi
    busy && b=1
    [ "$b" = 0 ] && break
    if [ "$a" -lt "$ATTEMPTS" ]; then RETRIED=$((RETRIED + 1)); log "daemon_bench/cargo/rustc ran during $label #$run: discarded, repeating"; fi
  done
  [ "$b" = 1 ] && { BUSY_SEEN=1; log "WARNING: daemon_bench/cargo/rustc ran during $label #$run"; }
  { echo "== $label #$run"; cat "$WORK/stdout.out" "$WORK/stderr.out"; } >>"$OUTDIR/bench.log"
  read -r w u s <"$WORK/time.out"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$run" "$w" "$u" "$s" "$b" >>"$RES"
  log "$label #$run: wall ${w}s user ${u}s sys ${s}s"
}
record() { printf '%s\t%s\t%s\t-\t-\t%s\n' "$@" >>"$RES"; }

# ================================================================ oracle: expected rows at the target
ep() { date -u -d "${1%+00} UTC" +%s.%N; }
TARGET_EPOCH=$(awk -v a="$(ep "$RUN_START")" -v b="$(ep "$RUN_END")" -v f="$TARGET_FRAC" 'BEGIN{printf "%.6f", a + f * (b - a)}')
TARGET=$(date -u -d "@$TARGET_EPOCH" '+%Y-%m-%d %H:%M:%S.%6N+00')
SRC_PORT=$(awk -F'= *' '/^port *=/{p=$2} END{print p+0}' "$SRC/postgresql.conf")
log "target $TARGET ($TARGET_FRAC of the timed run $RUN_START .. $RUN_END); oracle from $SRC"
pg_start "$SRC" "$WORK/src_verify.log" "-c archive_mode=off -c listen_addresses=''"
EXPECT=$(psql_at "$SRC_PORT" -d pgbench -c \
  "select count(*) from pgbench_history where mtime <= (timestamptz '$TARGET' at time zone 'UTC')")
pg_stop "$SRC"
log "expected rows at the target: $EXPECT (of $HISTORY_ROWS)"

# ================================================================ A. backup + restore throughput
log "part A: online full backup + full restore of the running primary $LIVE, $RUNS runs"
cat >>"$LIVE/postgresql.auto.conf" <<EOF
archive_command = '/bin/false'
EOF
pg_start "$LIVE" "$WORK/live.log" "-c port=$LIVE_PORT -c archive_mode=on"
set_archive() {   # archive_command for LIVE, effective once `show` returns it
  psql_at "$LIVE_PORT" -c "alter system set archive_command = '$1'" -c "select pg_reload_conf()" >/dev/null
  for _ in $(seq 1 50); do
    [ "$(psql_at "$LIVE_PORT" -c 'show archive_command')" = "$1" ] && { sleep 1; return 0; }
    sleep 0.1
  done
  die "archive_command did not change to $1"
}
cat "$LIVE"/base/*/* >/dev/null 2>&1 || true     # both tools read a warm page cache
RESTORE_A=$WORK/restore-a
prep_backup_pgbr() {   # fresh repository, archive_command = its archive-push
  set_archive "$(printf '%s ' "${PGBR_LIVE[@]}")archive-push %p"
  fresh_repo pgbr-live
  as_pg "${PGBR_LIVE[@]}" stanza-create >/dev/null
  sync
}
backup_pgbr() {   # online full backup
  prepare=prep_backup_pgbr timed backup-pgbackrest "$1" runuser -u postgres -- "${PGBR_LIVE[@]}" --type=full backup
}
prep_backup_pitr() {
  set_archive "$(printf '%s ' "${PITR_LIVE[@]}")archive-push %p"
  fresh_repo pitr-live
  sync
}
backup_pitr() {
  prepare=prep_backup_pitr timed backup-pitr "$1" runuser -u postgres -- "${PGENV[@]}" PGPORT="$LIVE_PORT" \
    "${PITR_LIVE[@]}" backup --pgdata "$LIVE" --concurrency "$CONC"
}
# full restores into an empty directory (no target: pitr to the end of the archive, pgBackRest
# its default recovery type), each followed by syncfs of the restored directory
# (timed() then waits for an idle machine and prewarms memory: see bench/lib.sh. Without that,
# the restore that ran first in each pair took 0.5-1.5 s longer, whichever tool it was.)
prep_restore() { rm -rf "$RESTORE_A"; fresh_dir "$RESTORE_A"; sync; }
restore_pgbr() {
  prepare=prep_restore timed restore-pgbackrest "$1" runuser -u postgres -- sh -c \
    "$(printf '%q ' "${PGBR_LIVE[@]}") --pg1-path=$RESTORE_A restore && sync -f $RESTORE_A"
  RB_PGBR=$(du -sb "$RESTORE_A" | cut -f1)
  rm -rf "$RESTORE_A"
}
restore_pitr() {
  prepare=prep_restore timed restore-pitr "$1" runuser -u postgres -- sh -c \
    "$(printf '%q ' "${PITR_LIVE[@]}") restore --pgdata $RESTORE_A --concurrency $CONC && sync -f $RESTORE_A"
  RB_PITR=$(du -sb "$RESTORE_A" | cut -f1)
  rm -rf "$RESTORE_A"
}
# odd runs pgBackRest first, even runs pitr first; each restore reads the backup of its run
for r in $(seq 1 "$RUNS"); do
  if [ $((r % 2)) = 1 ]; then
    backup_pgbr "$r"; backup_pitr "$r"; restore_pgbr "$r"; restore_pitr "$r"
  else
    backup_pitr "$r"; backup_pgbr "$r"; restore_pitr "$r"; restore_pgbr "$r"
  fi
done
# Physical limits on the same data and disk (3 runs each, medians): reading the files from the
# warm page cache, zstd -1 on both cores, and writing them with a final sync (cp -a + sync -f).
# Backup's limit is the lower of the first two, restore's the write.
LIMIT_DIR=$WORK/limit-copy
prep_limit_write() { rm -rf "$LIMIT_DIR"; sync; }
tar -cf - -C "$BASE2" . >/dev/null      # BASE2 holds LIVE's files (a running cluster's would change under tar)
for r in 1 2 3; do
  prepare='' timed limit-read "$r" sh -c "tar -cf - -C $BASE2 . | cat >/dev/null"
  prepare='' timed limit-zstd1-T2 "$r" sh -c "tar -cf - -C $BASE2 . | zstd -1 -T2 -q -c >/dev/null"
  prepare=prep_limit_write timed limit-write "$r" sh -c "cp -a $BASE2 $LIMIT_DIR && sync -f $LIMIT_DIR"
done
rm -rf "$LIMIT_DIR"
LIVE_SEG=-
if [ "$RUNS" -gt 0 ]; then
PGBR_SET=$(ls "$(repo_dir pgbr-live)/backup/live" | grep -E '^[0-9]{8}-[0-9]{6}F$' | tail -1)
{
  echo "base_data_bytes_without_pg_wal $DATA_BYTES"
  echo "pgbackrest_backup_set_bytes $(du -sb "$(repo_dir pgbr-live)/backup/live/$PGBR_SET" | cut -f1)"
  echo "pitr_backup_bytes(chunks+manifest) $(du -sbc "$(repo_dir pitr-live)/chunks" "$(repo_dir pitr-live)/backups" | tail -1 | cut -f1)"
  echo "pitr_backup_logical_bytes $(as_pg "${PITR_LIVE[@]}" list --output json | jq '.backups[-1].logical_bytes')"
  echo "restored_dir_bytes pgbackrest $RB_PGBR pitr $RB_PITR"
} >"$OUTDIR/sizes.txt"
# one segment the live primary archived: it has a corpus segment's name but other contents
LIVE_SEG=$(find "$(repo_dir pitr-live)/wal" -type f | grep -E '/[0-9A-F]{24}$' | sort | tail -1 | xargs basename)
else
  echo "part A not run (RUNS=0)" >"$OUTDIR/sizes.txt"
fi
pg_stop "$LIVE"

# ================================================================ B. PITR
log "part B: archive the corpus into both repositories (not timed)"
cat >"$WORK/push.sh" <<'EOF'
#!/usr/bin/env bash
# push.sh LIST STAGE_PG HOOK-CMD... : one archive-push per segment, in order, cwd = stage PGDATA
set -euo pipefail
list=$1 dir=$2; shift 2
cd "$dir"
while read -r s; do "$@" archive-push "pg_wal/$s" || { echo "archive-push pg_wal/$s failed" >&2; exit 1; }; done <"$list"
EOF
chmod 755 "$WORK/push.sh"
fresh_repo pitr-pitr
as_pg "$WORK/push.sh" "$SEGS" "$STAGE_PG" "${PITR_PITR[@]}" 2>>"$OUTDIR/bench.log"
n=$(find "$(repo_dir pitr-pitr)/wal" -type f -name '0*' | grep -cE '/[0-9A-F]{24}$' || true)
[ "$n" -eq "$NSEG" ] || die "pitr repository holds $n of $NSEG corpus segments"
fresh_repo pgbr-pitr
as_pg "${PGBR_PITR[@]}" --no-online stanza-create >/dev/null
as_pg "$WORK/push.sh" "$SEGS" "$STAGE_PG" "${PGBR_PITR[@]}" 2>>"$OUTDIR/bench.log"
n=$(find "$(repo_dir pgbr-pitr)/archive" -type f -name '0*-*' | grep -cvE '\.s3s' || true)
[ "$n" -eq "$NSEG" ] || die "pgBackRest repository holds $n of $NSEG corpus segments"

DIVERGE_RC=- DIVERGE_MSG="not run (RUNS=0: part A left no live segment)"
if [ "$RUNS" -gt 0 ]; then
# Why a primary copy cannot serve: its WAL diverges from the corpus under the same names.
mkdir -p "$WORK/stage2/pg_wal" "$WORK/stage2/global"
cp "$SRC/global/pg_control" "$WORK/stage2/global/"; cp "$SRC/PG_VERSION" "$WORK/stage2/"
chown -R postgres: "$WORK/stage2"; chmod 700 "$WORK/stage2"
as_pg env PITR_PREFETCH=0 "${PITR_LIVE[@]}" archive-get "$LIVE_SEG" "$WORK/stage2/pg_wal/$LIVE_SEG"
set +e
DIVERGE_MSG=$(cd "$WORK/stage2" && as_pg "${PITR_PITR[@]}" archive-push "pg_wal/$LIVE_SEG" 2>&1)
DIVERGE_RC=$?
set -e
log "pushing the live primary's $LIVE_SEG into the corpus repository: exit $DIVERGE_RC: $DIVERGE_MSG"
fi

log "part B: full backups of the cold base for PITR (one each, informational timings)"
sync
timed backup-base-pgbackrest-offline 1 runuser -u postgres -- "${PGBR_PITR[@]}" --pg1-path="$BASE2" \
  --no-online --type=full backup
SET=$(ls "$(repo_dir pgbr-pitr)/backup/bench" | grep -E '^[0-9]{8}-[0-9]{6}F$' | tail -1)
pg_start "$STBY" "$WORK/standby.log" "-c port=$STBY_PORT"
[ "$(psql_at "$STBY_PORT" -c 'select pg_is_in_recovery()')" = t ] || die "$STBY is not a standby"
ATTEMPTS=1 timed backup-base-pitr-standby 1 runuser -u postgres -- "${PGENV[@]}" PGPORT="$STBY_PORT" \
  "${PITR_PITR[@]}" backup --pgdata "$STBY" --concurrency "$CONC"
pg_stop "$STBY"
BACKUP_JSON=$(as_pg "${PITR_PITR[@]}" list --output json)
PITR_BACKUP=$(jq -r '.backups[-1].id' <<<"$BACKUP_JSON")
PITR_BACKUP_LSNS=$(jq -r '.backups[-1] | "start \(.start_lsn) stop \(.stop_lsn) timeline \(.timeline)"' <<<"$BACKUP_JSON")
log "pitr backup $PITR_BACKUP of the standby: $PITR_BACKUP_LSNS"

# ================================================================ C. verify
if [ "$VERIFY_RUNS" -gt 0 ]; then
  log "part C: verify both repositories, $VERIFY_RUNS runs"
  ZDIR=$WORK/zstd-copies; rm -rf "$ZDIR"; mkdir -p "$ZDIR"
  # The decode limit's input: zstd -1 copies of what the repositories hold (not timed).
  (cd "$CORPUS" && ls | xargs -P "$CONC" -I{} zstd -q -1 -f {} -o "$ZDIR/wal-{}.zst")
  (cd "$BASE2" && find . -type f -size +0 | sed 's|^\./||' \
    | xargs -P "$CONC" -I{} sh -c 'mkdir -p "$0/$(dirname "$1")" && zstd -q -1 -f "$1" -o "$0/$1.zst"' "$ZDIR/base" {})
  VERIFY_BYTES=$(( $(du -sb "$CORPUS" | cut -f1) + $(du -sb "$BASE2" | cut -f1) ))
  verify_pitr() {
    timed verify-pitr "$1" runuser -u postgres -- "${PITR_PITR[@]}" verify --full --output json
    jq -c '{backups, manifests_read, objects_read, bytes_read, problems: (.problems | length)}' \
      "$WORK/stdout.out" >"$OUTDIR/verify-pitr-last.json" 2>/dev/null || true
  }
  verify_pitr_decode() {
    timed verify-pitr-decode "$1" runuser -u postgres -- "${PITR_PITR[@]}" verify --full --decode --output json
  }
  verify_pgbr() { timed verify-pgbackrest "$1" runuser -u postgres -- "${PGBR_PITR[@]}" verify; }
  for r in $(seq 1 "$VERIFY_RUNS"); do
    if [ $((r % 2)) = 1 ]; then verify_pgbr "$r"; verify_pitr "$r"; verify_pitr_decode "$r"
    else verify_pitr_decode "$r"; verify_pitr "$r"; verify_pgbr "$r"; fi
    timed limit-decode "$r" bash -c 'find "$1" -type f -print0 | xargs -0 -n 16 -P "$2" zstd -q -d -c >/dev/null' _ "$ZDIR" "$CONC"
  done
fi

# ---------------------------------------------------------------- the PITR cases
GET_SYNC="pgbackrest --config=$WORK/pgbr-pitr.conf --stanza=bench --pg1-path=$P archive-get %f \"%p\""
GET_ASYNC="pgbackrest --config=$WORK/pgbr-pitr.conf --stanza=bench --pg1-path=$P --archive-async=y --process-max=$CONC --archive-get-queue-max=1GiB archive-get %f \"%p\""
GET_CP="cp $CORPUS/%f \"%p\""
GOT_ALL=$WORK/got.txt; : >"$GOT_ALL"
pitr_case() {   # label kind run: one clean attempt, or ATTEMPTS busy ones (the last is kept)
  local a
  for a in $(seq 1 "$ATTEMPTS"); do
    pitr_attempt "$@" && return 0
    if [ "$a" -lt "$ATTEMPTS" ]; then RETRIED=$((RETRIED + 1)); log "daemon_bench/cargo/rustc ran during $1 #$3: discarded, repeating"; fi
  done
  LAST_BUSY_KEEP=1 pitr_attempt "$@" || true
}
pitr_attempt() {   # label kind run; returns 1 (recording nothing) if it was disturbed
  local label=$1 kind=$2 r=$3 t0 t1 t2 t3 out got logf=$P.log restore_s
  pg_stop "$P" immediate
  rm -rf "$P" "$P.log" "$WORK/pgbr-spool/archive"; fresh_dir "$P"; sync
  wait_idle
  local b=0; busy && b=1
  t0=$(now)
  case $kind in
    pgbr-*)
      local cmd
      case $kind in pgbr-sync) cmd=$GET_SYNC ;; pgbr-async) cmd=$GET_ASYNC ;; pgbr-floor) cmd=$GET_CP ;; esac
      as_pg "${PGBR_PITR[@]}" --pg1-path="$P" restore --set="$SET" --type=time --target="$TARGET" \
        --target-action=promote --recovery-option="restore_command=$cmd" >>"$OUTDIR/bench.log" 2>&1 \
        || die "$label #$r: pgbackrest restore failed"
      t1=$(now)
      as_pg "$PGBIN/pg_ctl" -D "$P" -l "$P.log" -W start >/dev/null || die "$label #$r: pg_ctl start failed"
      STARTED+=("$P") ;;
    pitr-floor)
      as_pg "${PITR_PITR[@]}" restore --pgdata "$P" --backup "$PITR_BACKUP" --target-time "$TARGET" \
        --concurrency "$CONC" >>"$OUTDIR/bench.log" 2>&1 || die "$label #$r: pitr restore failed"
      echo "restore_command = '${GET_CP//\'/\'\'}'" >>"$P/postgresql.auto.conf"
      t1=$(now)
      as_pg "$PGBIN/pg_ctl" -D "$P" -l "$P.log" -W start >/dev/null || die "$label #$r: pg_ctl start failed"
      STARTED+=("$P") ;;
    pitr)
      STARTED+=("$P")
      as_pg "${PITR_PITR[@]}" restore --pgdata "$P" --backup "$PITR_BACKUP" --target-time "$TARGET" \
        --concurrency "$CONC" --start --pg-bin "$PGBIN" >"$WORK/pitr-restore.out" 2>&1 \
        || { cat "$WORK/pitr-restore.out" >&2; die "$label #$r: pitr restore --start failed"; }
      cat "$WORK/pitr-restore.out" >>"$OUTDIR/bench.log"
      logf=$P/pitr-restore.log
      restore_s=$(sed -n 's/^restored backup .* in \([0-9.]*\) s$/\1/p' "$WORK/pitr-restore.out")
      t1=$(awk -v a="$t0" -v d="${restore_s:-0}" 'BEGIN{printf "%.6f", a + d}') ;;
  esac
  t2=$(now)
  until out=$(psql_at "$PITR_PORT" -d pgbench -c "select pg_is_in_recovery()" 2>/dev/null) && [ "$out" = f ]; do
    sleep 0.05
    awk -v a="$t2" -v b="$(now)" 'BEGIN{exit !(b-a > 1800)}' && die "$label #$r did not promote within 1800 s; see $logf"
  done
  t3=$(now)
  busy && b=1
  if [ "$b" = 1 ] && [ -z "${LAST_BUSY_KEEP:-}" ]; then pg_stop "$P" immediate; return 1; fi
  [ "$b" = 1 ] && { BUSY_SEEN=1; log "WARNING: daemon_bench/cargo/rustc ran during $label #$r"; }
  got=$(psql_at "$PITR_PORT" -d pgbench -c "select count(*) from pgbench_history")
  out=$(psql_at "$PITR_PORT" -d pgbench -c "select 'max(mtime)='||max(mtime)||' timeline='||(select timeline_id from pg_control_checkpoint()) from pgbench_history")
  pg_stop "$P" immediate
  echo "$got" >>"$GOT_ALL"
  record "$label" "$r" "$(awk -v a="$t0" -v b="$t3" 'BEGIN{printf "%.3f", b-a}')" "$b"
  record "$label:restore" "$r" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", b-a}')" "$b"
  record "$label:recover+promote" "$r" "$(awk -v a="$t1" -v b="$t3" 'BEGIN{printf "%.3f", b-a}')" "$b"
  {
    echo "$label #$r target=$TARGET expected_rows=$EXPECT got=$got $out"
    grep -E "starting point-in-time recovery|consistent recovery state|recovery stopping|selected new timeline|ready to accept" "$logf" | sed 's/^/    /' || true
    echo "    segments restored: $(grep -c 'restored log file' "$logf" || true), last: $(grep -o 'restored log file "[0-9A-F]*"' "$logf" | tail -1 | cut -d'"' -f2)"
  } >>"$OUTDIR/pitr_verify.txt"
  log "$label #$r: total $(awk -v a="$t0" -v b="$t3" 'BEGIN{printf "%.1f", b-a}') s; $got rows (oracle $EXPECT)"
  rm -rf "$P" "$P.log"
}
log "part B: PITR to $TARGET, $PITR_RUNS runs of 5 cases"
cat "$CORPUS"/* >/dev/null      # the corpus (floors) and the repositories are read from a warm cache
cat "$(repo_dir pitr-pitr)"/wal/*/* "$(repo_dir pgbr-pitr)"/archive/bench/*/*/* >/dev/null 2>&1 || true
read -ra CASES <<<"$PITR_CASES"
for r in $(seq 1 "$PITR_RUNS"); do     # the order rotates by one case every run
  for i in $(seq 0 $((${#CASES[@]} - 1))); do
    k=${CASES[$(( (i + r - 1) % ${#CASES[@]} ))]}
    pitr_case "pitr-$k" "$k" "$r"
  done
done

# ---------------------------------------------------------------- verification
VERIFY=ok
[ "$PITR_RUNS" -gt 0 ] || { echo 0 >"$GOT_ALL"; EXPECT=0; VERIFY="not run (PITR_RUNS=0)"; }
NDIFF=$(sort -u "$GOT_ALL" | wc -l)
GOT=$(head -1 "$GOT_ALL")
[ "$NDIFF" = 1 ] || VERIFY="FAILED: row counts differ between cases: $(sort -u "$GOT_ALL" | tr '\n' ' ')"
# the oracle counts rows by mtime (transaction start); recovery stops by commit time, so up to
# CLIENTS transactions in flight at the target may differ
DIFF=$(( GOT - EXPECT )); [ "$DIFF" -lt 0 ] && DIFF=$(( -DIFF ))
[ "$DIFF" -le "${CLIENTS:-4}" ] || VERIFY="FAILED: $GOT rows, oracle $EXPECT"

# ================================================================ summary
med() {   # label -> median wall
  awk -F'\t' -v l="$1" '$1==l{print $3}' "$RES" | sort -g | awk '{v[NR]=$1} END{if(!NR){print "nan"; exit} print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}'
}
mn() { awk -F'\t' -v l="$1" '$1==l{print $3}' "$RES" | sort -g | head -1; }
mx() { awk -F'\t' -v l="$1" '$1==l{print $3}' "$RES" | sort -g | tail -1; }
cpu() { awk -F'\t' -v l="$1" '$1==l && $4!="-"{print $3, $4+$5}' "$RES" | sort -g | awk '{c[NR]=$2} END{if(NR) print c[int((NR+1)/2)]; else print "-"}'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
# pitr's overhead / pgBackRest's: only meaningful when pgBackRest's is clearly above noise; a
# negative ratio means pitr finished below its own floor (prefetch decodes ahead while cp waits)
ovr() { awk -v a="$1" -v b="$2" 'BEGIN{if (b > 0.25) printf "%.2f", a/b; else print "n/a"}'; }
sub_() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a-b}'; }
MIB=$(awk -v b="$DATA_BYTES" 'BEGIN{printf "%.1f", b/1048576}')
{
  echo "pitr backup/restore/PITR bench  $(date -u '+%Y-%m-%d %H:%M:%SZ')  host $(hostname) ($(nproc) CPUs)"
  echo "data: $BASE without pg_wal = $MIB MiB; corpus $NSEG segments; $(pgbackrest version); $("$PITR" --version)"
  echo "both: zstd level 1, encrypted (pgBackRest aes-256-cbc, pitr keyring AES-256-GCM), 2 workers (process-max=$CONC / --concurrency $CONC), repositories: $([ "$REPO_KIND" = s3 ] && echo "S3 (s3s-fs, +${DELAY_MS} ms each way)" || echo "local disk")"
  echo "runs: part A $RUNS, part B $PITR_RUNS (medians)"
  [ "$WAITED_S" -gt 0 ] && echo "note: waited $WAITED_S s in total for daemon_bench.sh/cargo/rustc before timed phases"
  [ "$RETRIED" -gt 0 ] && echo "note: $RETRIED run(s) disturbed by daemon_bench.sh/cargo/rustc were discarded and repeated"
  [ "$BUSY_SEEN" = 1 ] && echo "WARNING: daemon_bench.sh/cargo/rustc ran during some kept measurements (busy=1 in results.tsv); figures are pessimistic"
  echo
  echo "A. online full backup of the same running primary, and full restore into an empty directory"
  printf '%-22s %9s %9s %9s %9s %9s %12s\n' operation median_s min_s max_s cpu_s MiB/s pitr/pgbr
  for op in backup restore; do
    b=$(med "$op-pgbackrest")
    for tool in pgbackrest pitr; do
      l=$op-$tool m=$(med "$l")
      printf '%-22s %9.2f %9.2f %9.2f %9s %9.1f %12s\n' "$l" "$m" "$(mn "$l")" "$(mx "$l")" "$(cpu "$l")" \
        "$(awk -v b="$DATA_BYTES" -v m="$m" 'BEGIN{print b/1048576/m}')" \
        "$( [ "$tool" = pgbackrest ] && echo - || div "$b" "$m")"
    done
  done
  echo "  pitr/pgbr = pitr throughput / pgBackRest throughput (>1: pitr faster)"
  lim() { awk -v b="$DATA_BYTES" -v m="$(med "$1")" 'BEGIN{printf "%.1f", b/1048576/m}'; }
  L_READ=$(lim limit-read) L_ZSTD=$(lim limit-zstd1-T2) L_WRITE=$(lim limit-write)
  L_BACKUP=$(awk -v a="$L_READ" -v b="$L_ZSTD" 'BEGIN{print (a < b) ? a : b}')
  pct() { awk -v b="$DATA_BYTES" -v m="$(med "$1")" -v l="$2" 'BEGIN{printf "%.0f%%", 100 * b/1048576/m/l}'; }
  echo "  physical limits (MiB/s, medians of 3): read $L_READ, zstd -1 -T2 $L_ZSTD, write (cp -a + sync) $L_WRITE"
  echo "  of the limit: backup pitr $(pct backup-pitr "$L_BACKUP") pgBackRest $(pct backup-pgbackrest "$L_BACKUP"); restore pitr $(pct restore-pitr "$L_WRITE") pgBackRest $(pct restore-pgbackrest "$L_WRITE")"
  sed 's/^/  /' "$OUTDIR/sizes.txt"
  echo
  echo "B. PITR to $TARGET (TARGET_FRAC=$TARGET_FRAC of the timed run), restore command start -> promoted"
  echo "   backups of the cold base: pgBackRest offline $(med backup-base-pgbackrest-offline) s, pitr from an idle hot standby $(med backup-base-pitr-standby) s (one run each)"
  echo "   pitr backup $PITR_BACKUP: $PITR_BACKUP_LSNS"
  printf '%-24s %9s %9s %9s %11s %15s\n' case median_s min_s max_s restore_s recover+prom_s
  for l in pitr-pgbr-sync pitr-pgbr-async pitr-pgbr-floor pitr-pitr pitr-pitr-floor; do
    printf '%-24s %9.2f %9.2f %9.2f %11.2f %15.2f\n' "$l" "$(med "$l")" "$(mn "$l")" "$(mx "$l")" \
      "$(med "$l:restore")" "$(med "$l:recover+promote")"
  done
  OV_PITR=$(sub_ "$(med pitr-pitr)" "$(med pitr-pitr-floor)")
  OV_SYNC=$(sub_ "$(med pitr-pgbr-sync)" "$(med pitr-pgbr-floor)")
  OV_ASYNC=$(sub_ "$(med pitr-pgbr-async)" "$(med pitr-pgbr-floor)")
  echo
  echo "   overhead above each tool's own cp floor (median - median floor):"
  echo "     pitr            $OV_PITR s"
  echo "     pgBackRest sync  $OV_SYNC s   pitr/pgbr overhead ratio $(ovr "$OV_PITR" "$OV_SYNC")"
  echo "     pgBackRest async $OV_ASYNC s   pitr/pgbr overhead ratio $(ovr "$OV_PITR" "$OV_ASYNC")"
  echo "     (a ratio needs pgBackRest's overhead above 0.25 s; a smaller one is within run-to-run noise;"
  echo "      a negative ratio: pitr with its archive-get is faster than with cp from an uncompressed copy)"
  echo "   end to end pitr/pgbr time ratio: vs sync $(div "$(med pitr-pitr)" "$(med pitr-pgbr-sync)"), vs async $(div "$(med pitr-pitr)" "$(med pitr-pgbr-async)")  (<1: pitr faster)"
  echo
  echo "   verification: $VERIFY: every PITR ended with $GOT rows in pgbench_history (oracle $EXPECT)"
  echo "   pushing the live primary's $LIVE_SEG (same name as a corpus segment) into the corpus repository: exit $DIVERGE_RC: $DIVERGE_MSG"
  echo
  if [ "$VERIFY_RUNS" -gt 0 ]; then
    VMIB=$(awk -v b="$VERIFY_BYTES" 'BEGIN{printf "%.1f", b/1048576}')
    echo "C. verify of the part B repositories ($VMIB MiB of WAL and base, logical), $VERIFY_RUNS runs"
    printf '%-22s %9s %9s %9s %9s %9s %12s\n' operation median_s min_s max_s cpu_s MiB/s pitr/pgbr
    vb=$(med verify-pgbackrest)
    for l in verify-pgbackrest verify-pitr verify-pitr-decode limit-decode; do
      m=$(med "$l")
      printf '%-22s %9.2f %9.2f %9.2f %9s %9.1f %12s\n' "$l" "$m" "$(mn "$l")" "$(mx "$l")" "$(cpu "$l")" \
        "$(awk -v b="$VERIFY_BYTES" -v m="$m" 'BEGIN{print b/1048576/m}')" \
        "$(case $l in verify-pitr*) div "$vb" "$m";; *) echo -;; esac)"
    done
    echo "  pitr's last report: $(cat "$OUTDIR/verify-pitr-last.json" 2>/dev/null)"
    echo
  fi
  echo "details: $OUTDIR/pitr_verify.txt, $OUTDIR/results.tsv, $OUTDIR/bench.log"
} | tee "$OUTDIR/summary.txt"
[ "$VERIFY" = ok ] || [ "$PITR_RUNS" = 0 ] || exit 1

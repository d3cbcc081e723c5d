#!/usr/bin/env bash
# archive_bench.sh - pitr vs pgBackRest 2.45: WAL archive-push / archive-get throughput, on one
# fixed pgbench WAL corpus, driven exactly the way PostgreSQL drives archive_command and
# restore_command (one process per segment, in WAL order, as user postgres, cwd = PGDATA).
#
# What it measures (wall time of the whole loop, RUNS times, median reported):
#   push   pgBackRest sync archive-push (zst-1, aes-256-cbc, repo on local disk) and
#          pitr archive-push (compression_level=1, keyring => encrypted, file:// repository),
#          once per pitr variant (compression_threads = each value of PITR_THREADS);
#          every run starts from an empty repository
#   get    archive-get of every segment into an empty directory, from the repositories the push
#          runs left; run 1 of every pitr get is checked byte-for-byte with cmp (fails loudly)
#   dup    latency of archive-push of an already-archived segment (DUP_CALLS calls, p50/p90),
#          plus the bare process-start floor (/bin/true, `pgbackrest version`, `pitr --version`)
#   size   pitr compression ratio = corpus bytes / du -sb <pitr repo>/wal
#
# The "PGDATA" both tools see is a stage directory: global/pg_control + PG_VERSION copied from the
# corpus's source cluster (so pitr's system-identifier check is exercised) and pg_wal/ holding
# hard links to the corpus segments. Hooks get %p as "pg_wal/<segment>", relative, like Postgres.
#
# Usage (as root, on Debian bookworm with pgbackrest installed):
#     bench/archive_bench.sh
# Knobs (environment):
#   BL=/tmp/bl                 corpus layout of wal_corpus.sh: $BL/corpus, .base, .meta, $BL/src
#   CORPUS=$BL/corpus          built with bench/wal_corpus.sh if missing (about 6 min of pgbench)
#   MIN_SEGMENTS=128           a corpus with fewer segments is an error
#   PITR_BIN=                  use this pitr binary instead of `cargo build --release`
#   PITR_THREADS="2 0"         compression_threads values to benchmark (one pitr variant each)
#   RUNS=3  DUP_CALLS=20       repetitions, duplicate-push calls
#   WAIT_IDLE=1                before every timed phase, wait until the machine is idle: no
#                              process named in BUSY_PROCS="cargo rustc postgres" and less than
#                              IDLE_MAX_CORES=0.3 cores busy; at most WAIT_MAX=900 s
#   WORK=/tmp/pitr-bench/work  scratch (repositories, stage, get dirs; wiped at start)
#   OUTDIR=/tmp/pitr-bench/results   results.tsv (label run wall user sys busy), summary.txt, logs
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
ROOT=$(cd "$HERE/.." && pwd)
BL=${BL:-/tmp/bl}
CORPUS=${CORPUS:-$BL/corpus}
SRC=${SRC:-$BL/src}
MIN_SEGMENTS=${MIN_SEGMENTS:-128}
RUNS=${RUNS:-3}
DUP_CALLS=${DUP_CALLS:-20}
PITR_THREADS=${PITR_THREADS:-2 0}
WORK=${WORK:-/tmp/pitr-bench/work}
OUTDIR=${OUTDIR:-/tmp/pitr-bench/results}
CIPHER_PASS=${CIPHER_PASS:-bench-passphrase-0123456789abcdef}

STAGE_PG=$WORK/stage            # fake PGDATA: global/pg_control, PG_VERSION, pg_wal/
STAGE=$STAGE_PG/pg_wal
GETDIR=$WORK/get
PGBR_REPO=$WORK/pgbr-repo
PGBR_CONF=$WORK/pgbackrest.conf
KEYRING=$WORK/keyring
RES=$OUTDIR/results.tsv
SEGS=$WORK/segs.txt

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

[ "$(id -u)" = 0 ] || die "run as root (the hooks are run as postgres through runuser)"
command -v pgbackrest >/dev/null || die "pgbackrest is not installed (apt-get install pgbackrest)"
[ -x /usr/bin/time ] || die "/usr/bin/time is missing (apt-get install time)"

# ---------------------------------------------------------------- 1. corpus
count_segs() { ls "$CORPUS" 2>/dev/null | grep -cE '^[0-9A-F]{24}$' || true; }
if [ ! -f "$CORPUS.meta" ] || [ ! -f "$SRC/global/pg_control" ] || [ "$(count_segs)" -lt "$MIN_SEGMENTS" ]; then
  log "corpus missing or incomplete in $CORPUS: building it with wal_corpus.sh (~6 min)"
  BL=$BL CORPUS=$CORPUS MIN_SEGMENTS=$MIN_SEGMENTS "$HERE/wal_corpus.sh" >&2
fi
NSEG_FOUND=$(count_segs)
[ "$NSEG_FOUND" -ge "$MIN_SEGMENTS" ] || die "corpus has $NSEG_FOUND segments (< $MIN_SEGMENTS)"

# ---------------------------------------------------------------- 2. pitr binary
if [ -z "${PITR_BIN:-}" ]; then
  while pgrep -x cargo >/dev/null || pgrep -x rustc >/dev/null; do log "another cargo/rustc is running; waiting before cargo build"; sleep 20; done
  log "cargo build --release in $ROOT"
  (cd "$ROOT" && cargo build --release --quiet) >&2
  PITR_BIN=$ROOT/target/release/pitr
fi
[ -x "$PITR_BIN" ] || die "no pitr binary at $PITR_BIN"

# ---------------------------------------------------------------- scratch layout
rm -rf "$WORK"; mkdir -p "$WORK/bin" "$OUTDIR"
install -m 755 "$PITR_BIN" "$WORK/bin/pitr"      # a copy postgres can execute; rebuilds don't disturb it
PITR=$WORK/bin/pitr
chown postgres: "$WORK"
: >"$RES"; : >"$OUTDIR/bench.log"

(cd "$CORPUS" && ls | grep -E '^[0-9A-F]{24}$' | sort) >"$SEGS"
NSEG=$(wc -l <"$SEGS")
SEGBYTES=$(cd "$CORPUS" && xargs stat -c %s <"$SEGS" | awk '{s+=$1} END{printf "%.0f", s}')
MID_SEG=$(sed -n "$(((NSEG + 1) / 2))p" "$SEGS")

mkdir -p "$STAGE/archive_status" "$STAGE_PG/global"
cp "$SRC/global/pg_control" "$STAGE_PG/global/"; cp "$SRC/PG_VERSION" "$STAGE_PG/"
# .ready as Postgres marks a completed segment: pitr archive-push refuses one without it.
while read -r s; do ln "$CORPUS/$s" "$STAGE/$s"; : >"$STAGE/archive_status/$s.ready"; done <"$SEGS"
chown -R postgres: "$STAGE_PG"; chmod 700 "$STAGE_PG"

as_pg "$PITR" keygen --output "$KEYRING" >/dev/null
for t in $PITR_THREADS; do
  cat >"$WORK/pitr-T$t.toml" <<EOF
repo = 'file://$WORK/pitr-repo-T$t'
key_file = '$KEYRING'
compression_level = 1
compression_threads = $t
store_timeout = 60
EOF
done

cat >"$PGBR_CONF" <<EOF
[global]
repo1-path=$PGBR_REPO
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$CIPHER_PASS
compress-type=zst
compress-level=1
lock-path=$WORK/pgbr-lock
log-path=$WORK/pgbr-log
log-level-console=warn
log-level-file=off

[bench]
pg1-path=$STAGE_PG
EOF
chown postgres: "$WORK"/*.toml "$PGBR_CONF"; chmod 600 "$PGBR_CONF"
PGBR=(pgbackrest "--config=$PGBR_CONF" --stanza=bench)
pitr_cmd() { echo "$PITR --config $WORK/pitr-T$1.toml"; }

log "corpus $CORPUS: $NSEG segments, $SEGBYTES bytes; $(pgbackrest version); $("$PITR" --version)"

# The driver runs as postgres with cwd = the stage PGDATA and calls the hook once per segment,
# in WAL order, exactly as Postgres's archiver / startup process would. It stops at the first
# failing call (Postgres would retry that same segment forever).
cat >"$WORK/driver.sh" <<'EOF'
#!/usr/bin/env bash
# driver.sh MODE LIST DIR HOOK-CMD...
set -euo pipefail
mode=$1 list=$2 dir=$3; shift 3
cd "$dir"
case $mode in
  push) while read -r s; do "$@" archive-push "pg_wal/$s" || { echo "archive-push pg_wal/$s failed" >&2; exit 1; }; done <"$list" ;;
  get)  dest=$1; shift
        while read -r s; do "$@" archive-get "$s" "$dest/$s" || { echo "archive-get $s failed" >&2; exit 1; }; done <"$list" ;;
  lat)  # LIST is a count: run "$@" that many times, print each call's wall seconds
        for _ in $(seq 1 "$list"); do
          t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N)
          awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.4f\n", (b-a)/1e9}'
        done ;;
esac
EOF
chmod 755 "$WORK/driver.sh"
DRIVER=$WORK/driver.sh

# timed LABEL RUN CMD... : whole-process wall/user/sys of CMD (children included); a failure
# prints the hook's stderr and stops the bench
BUSY_SEEN=0
timed() {
  local label=$1 run=$2 w u s b=0; shift 2
  wait_idle
  busy && b=1
  if ! /usr/bin/time -f '%e %U %S' -o "$WORK/time.out" "$@" 2>"$WORK/stderr.out"; then
    cat "$WORK/stderr.out" >&2
    die "$label run $run failed (stderr above, also in $OUTDIR/bench.log)"
  fi
  busy && b=1
  [ "$b" = 1 ] && { BUSY_SEEN=1; log "WARNING: another workload ($BUSY_PROCS) ran during $label #$run"; }
  { echo "== $label #$run"; cat "$WORK/stderr.out"; } >>"$OUTDIR/bench.log"
  read -r w u s <"$WORK/time.out"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$run" "$w" "$u" "$s" "$b" >>"$RES"
  log "$label #$run: wall ${w}s user ${u}s sys ${s}s"
}

fresh_dir() { rm -rf "$1"; mkdir -p "$1"; chown postgres: "$1"; }
fresh_pgbr_repo() {
  fresh_dir "$PGBR_REPO"; fresh_dir "$WORK/pgbr-lock"; fresh_dir "$WORK/pgbr-log"
  as_pg "${PGBR[@]}" --no-online stanza-create >/dev/null
}
count_files() { find "$1" -type f -name "$2" | wc -l; }

cat "$CORPUS"/* >/dev/null          # warm the page cache: both tools read a hot corpus

# ---------------------------------------------------------------- 3. archive-push
# Runs are interleaved (pgBackRest, pitr T.., pitr T.., next run) so that drift on a shared
# machine hits every tool alike.
log "archive-push: $RUNS runs of $NSEG segments per tool"
for r in $(seq 1 "$RUNS"); do
  fresh_pgbr_repo; sync
  timed push-pgbackrest "$r" runuser -u postgres -- "$DRIVER" push "$SEGS" "$STAGE_PG" "${PGBR[@]}"
  n=$(count_files "$PGBR_REPO/archive" '0*-*')
  [ "$n" -eq "$NSEG" ] || die "pgBackRest archived $n of $NSEG segments"
  for t in $PITR_THREADS; do
    fresh_dir "$WORK/pitr-repo-T$t"; sync
    # shellcheck disable=SC2046
    timed "push-pitr-T$t" "$r" runuser -u postgres -- "$DRIVER" push "$SEGS" "$STAGE_PG" $(pitr_cmd "$t")
    n=$(count_files "$WORK/pitr-repo-T$t/wal" '0*')
    [ "$n" -eq "$NSEG" ] || die "pitr (threads=$t) stored $n of $NSEG segments in $WORK/pitr-repo-T$t/wal"
  done
done
: >"$OUTDIR/repo_sizes.txt"
echo "pgbackrest archive bytes $(du -sb "$PGBR_REPO/archive" | cut -f1)" >>"$OUTDIR/repo_sizes.txt"
for t in $PITR_THREADS; do
  echo "pitr-T$t wal bytes $(du -sb "$WORK/pitr-repo-T$t/wal" | cut -f1)" >>"$OUTDIR/repo_sizes.txt"
done

# ---------------------------------------------------------------- 5. duplicate push + process floor
# DUP_CALLS+1 calls each, the first one (warm-up) dropped
lat() {   # label cmd...
  local label=$1 i=0 t; shift
  wait_idle
  busy && { BUSY_SEEN=1; log "WARNING: another workload ($BUSY_PROCS) ran during $label"; }
  as_pg "$DRIVER" lat $((DUP_CALLS + 1)) "$STAGE_PG" "$@" 2>>"$OUTDIR/bench.log" | tail -n +2 | while read -r t; do
    i=$((i + 1)); printf '%s\t%s\t%s\t-\t-\n' "$label" "$i" "$t" >>"$RES"
  done
}
log "duplicate-push latency: $DUP_CALLS calls each on $MID_SEG"
# exit status checked first: a duplicate push must succeed (0) for both tools
as_pg sh -c "cd '$STAGE_PG' && $(printf '%q ' "${PGBR[@]}") archive-push pg_wal/$MID_SEG" 2>>"$OUTDIR/bench.log" \
  || die "pgBackRest duplicate archive-push of $MID_SEG failed"
lat dup-push-pgbackrest "${PGBR[@]}" archive-push "pg_wal/$MID_SEG"
for t in $PITR_THREADS; do
  # shellcheck disable=SC2046
  as_pg sh -c "cd '$STAGE_PG' && $(pitr_cmd "$t") archive-push pg_wal/$MID_SEG" 2>>"$OUTDIR/bench.log" \
    || die "pitr (threads=$t) duplicate archive-push of $MID_SEG failed"
  # shellcheck disable=SC2046
  lat "dup-push-pitr-T$t" $(pitr_cmd "$t") archive-push "pg_wal/$MID_SEG"
done
lat floor-spawn-true /bin/true
lat floor-pgbackrest-version pgbackrest version
lat floor-pitr-version "$PITR" --version

# ---------------------------------------------------------------- 4. archive-get (+ 7. correctness)
verify_get() {   # label: every segment in GETDIR byte-identical to the corpus
  local s bad=0
  while read -r s; do
    if ! cmp -s "$CORPUS/$s" "$GETDIR/$s"; then log "MISMATCH: $1 $s differs from the corpus"; bad=$((bad + 1)); fi
  done <"$SEGS"
  [ "$bad" -eq 0 ] || die "$1: $bad of $NSEG restored segments differ from the corpus"
  log "$1: all $NSEG restored segments identical to the corpus"
}
log "archive-get: $RUNS runs of $NSEG segments per tool"
for r in $(seq 1 "$RUNS"); do
  fresh_dir "$GETDIR"; sync
  timed get-pgbackrest "$r" runuser -u postgres -- "$DRIVER" get "$SEGS" "$STAGE_PG" "$GETDIR" "${PGBR[@]}"
  [ "$r" = 1 ] && verify_get get-pgbackrest
  for t in $PITR_THREADS; do
    fresh_dir "$GETDIR"; sync
    # shellcheck disable=SC2046
    timed "get-pitr-T$t" "$r" runuser -u postgres -- "$DRIVER" get "$SEGS" "$STAGE_PG" "$GETDIR" $(pitr_cmd "$t")
    [ "$r" = 1 ] && verify_get "get-pitr-T$t"
  done
  # pitr's archive-get prefetches by default (PITR_PREFETCH=8, a background worker); this row
  # shows the same hook with that turned off, one fetch per call like pgBackRest's sync get.
  t=${PITR_THREADS%% *}
  fresh_dir "$GETDIR"; sync
  # shellcheck disable=SC2046
  timed get-pitr-noprefetch "$r" runuser -u postgres -- env PITR_PREFETCH=0 "$DRIVER" get "$SEGS" "$STAGE_PG" "$GETDIR" $(pitr_cmd "$t")
  [ "$r" = 1 ] && verify_get get-pitr-noprefetch
done
rm -rf "$GETDIR"

# ---------------------------------------------------------------- 6. summary
med() {   # label column -> median of that column over the label's rows
  awk -F'\t' -v l="$1" -v c="$2" '$1==l{print $c}' "$RES" | sort -g | awk '{v[NR]=$1} END{if(!NR){print "NA"; exit} print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}'
}
pct() {   # label p -> p-th percentile (nearest rank) of the wall column
  awk -F'\t' -v l="$1" '$1==l{print $3}' "$RES" | sort -g | awk -v p="$2" '{v[NR]=$1} END{i=int(NR*p/100+0.999); if(i<1)i=1; print v[i]}'
}
cpu_med() { awk -F'\t' -v l="$1" '$1==l{print $3, $4+$5}' "$RES" | sort -g | awk '{c[NR]=$2} END{print c[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
MIB=$(awk -v b="$SEGBYTES" 'BEGIN{printf "%.1f", b/1048576}')
{
  echo "pitr archive bench  $(date -u '+%Y-%m-%d %H:%M:%SZ')  host $(hostname) ($(nproc) CPUs)"
  echo "corpus: $CORPUS  $NSEG segments, $MIB MiB; runs=$RUNS (medians); $(pgbackrest version); $("$PITR" --version)"
  echo "pgBackRest: sync, compress-type=zst level 1, aes-256-cbc.  pitr: compression_level=1, keyring (encrypted), file:// repo"
  [ "$WAITED_S" -gt 0 ] && echo "note: waited $WAITED_S s in total for the machine to be idle before timed phases"
  [ "$BUSY_SEEN" = 1 ] && echo "WARNING: another workload ($BUSY_PROCS) ran during some measurements (busy column of results.tsv); figures are pessimistic"
  echo
  printf '%-22s %9s %9s %9s %9s %8s %9s %10s\n' operation median_s min_s max_s cpu_s seg/s MiB/s pitr/pgbr
  for op in push get; do
    base=$(med "$op-pgbackrest" 3)
    for tool in pgbackrest $(for t in $PITR_THREADS; do echo "pitr-T$t"; done) $([ "$op" = get ] && echo pitr-noprefetch); do
      l=$op-$tool m=$(med "$op-$tool" 3)
      printf '%-22s %9.2f %9.2f %9.2f %9.2f %8.1f %9.1f %10s\n' "$l" "$m" "$(pct "$l" 0)" "$(pct "$l" 100)" \
        "$(cpu_med "$l")" "$(awk -v n="$NSEG" -v m="$m" 'BEGIN{print n/m}')" \
        "$(awk -v b="$SEGBYTES" -v m="$m" 'BEGIN{print b/1048576/m}')" \
        "$( [ "$tool" = pgbackrest ] && echo - || ratio "$base" "$m")"
    done
  done
  echo
  printf '%-26s %8s %8s %10s\n' "per-call latency" p50_ms p90_ms pitr/pgbr
  base=$(pct dup-push-pgbackrest 50)
  for l in dup-push-pgbackrest $(for t in $PITR_THREADS; do echo "dup-push-pitr-T$t"; done) \
           floor-spawn-true floor-pgbackrest-version floor-pitr-version; do
    p50=$(pct "$l" 50)
    printf '%-26s %8.1f %8.1f %10s\n' "$l" "$(awk -v x="$p50" 'BEGIN{print x*1000}')" \
      "$(awk -v x="$(pct "$l" 90)" 'BEGIN{print x*1000}')" \
      "$(case $l in dup-push-pitr*) ratio "$p50" "$base";; *) echo -;; esac)"
  done
  echo
  echo "pitr/pgbr: throughput rows = pitr MiB/s / pgBackRest MiB/s (>1: pitr faster);"
  echo "           latency rows = pitr p50 / pgBackRest p50 (<1: pitr faster). cpu_s = user+sys of the run."
  echo
  echo "repository size (compression ratio = corpus bytes / stored bytes):"
  while read -r tool _ _ bytes; do
    printf '  %-12s %12s bytes  ratio %.2f\n' "$tool" "$bytes" "$(awk -v a="$SEGBYTES" -v b="$bytes" 'BEGIN{print a/b}')"
  done <"$OUTDIR/repo_sizes.txt"
  echo
  echo "correctness: every segment restored by each tool (run 1) is byte-identical to the corpus (cmp)"
} | tee "$OUTDIR/summary.txt"

#!/usr/bin/env bash
# Expire and list on a large repository behind S3 with a round trip (issue 18):
#   a synthetic encrypted repository of WAL=100000 WAL objects and BACKUPS=1000 backups
#   (examples/synthetic_repository.rs), served by s3s-fs through the delay proxy (DELAY_MS=10
#   each way, 20 ms per round trip). Timed, each beside a plain listing of the same objects
#   (ListObjectsV2 pages of 1000 through the same proxy, curl --aws-sigv4, one page after the
#   other as any lister must):
#     pitr list --output json
#     pitr expire --dry-run   (the plan alone: catalog, WAL listing, histories, index)
#     pitr expire             (deletes about 90 %: a window holding the newest tenth)
#
#   bench/expire_bench.sh
# Knobs: WAL=100000 BACKUPS=1000 DELAY_MS=10 WORK=/tmp/pitr-bench/expire OUTDIR=$WORK/results
#        PITR_BIN=target/release/pitr (built if missing)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
WAL=${WAL:-100000}
BACKUPS=${BACKUPS:-1000}
WORK=${WORK:-/tmp/pitr-bench/expire}
OUTDIR=${OUTDIR:-$WORK/results}
S3DATA=$WORK/s3data
PITR_BIN=${PITR_BIN:-$ROOT/target/release/pitr}
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }
trap stop_s3 EXIT

(cd "$ROOT" && cargo build --release --quiet --bin pitr --example synthetic_repository)
GENERATE=$ROOT/target/release/examples/synthetic_repository
rm -rf "$WORK"; mkdir -p "$WORK" "$OUTDIR" "$S3DATA/$BUCKET"
"$PITR_BIN" keygen --output "$WORK/keyring" >/dev/null
log "generating $WAL WAL objects and $BACKUPS backups"
"$GENERATE" "$S3DATA/$BUCKET/synthetic" "$WORK/keyring" "$WAL" "$BACKUPS" >&2
OBJECTS=$(find "$S3DATA/$BUCKET/synthetic" -type f | wc -l)
start_s3
cat >"$WORK/pitr.toml" <<EOF
repo = 's3://$BUCKET/synthetic'
key_file = '$WORK/keyring'
store_timeout = 120
$(pitr_s3_store)
EOF

# seconds of wall time of "$@" (its output to $OUTDIR/<label>.out)
timed() {
  local label=$1; shift
  local t0 t1
  t0=$EPOCHREALTIME; "$@" >"$OUTDIR/$label.out" 2>"$OUTDIR/$label.err" || { cat "$OUTDIR/$label.err" >&2; die "$label failed"; }
  t1=$EPOCHREALTIME
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'
}

# A plain ListObjectsV2 of PREFIX, page after page: the floor for any tool that lists.
plain_list() {
  local prefix=$1 token="" count=0 page
  while :; do
    page=$(curl -sS --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_AK:$S3_SK" \
      "http://127.0.0.1:$PROXY_PORT/$BUCKET?list-type=2&max-keys=1000&prefix=$prefix${token:+&continuation-token=$(printf %s "$token" | "$BENCH_PY" -c 'import sys,urllib.parse;print(urllib.parse.quote(sys.stdin.read(),safe=""))')}")
    count=$((count + $(grep -o '<Key>' <<<"$page" | wc -l)))
    token=$(sed -n 's:.*<NextContinuationToken>\(.*\)</NextContinuationToken>.*:\1:p' <<<"$page")
    [ -n "$token" ] || break
  done
  echo "$count"
}

log "timing (each once, in this order)"
LIST_ALL=$(timed plain-list-all plain_list synthetic/)
LISTED=$(cat "$OUTDIR/plain-list-all.out")
LIST=$(timed pitr-list "$PITR_BIN" --config "$WORK/pitr.toml" list --output json)
# The window holds the newest tenth of the time span: about 90 % of everything goes.
WINDOW="$((WAL * 36 / 10 / 3600 + 1))h"
DRY=$(timed pitr-expire-dry "$PITR_BIN" --config "$WORK/pitr.toml" expire --dry-run --retention-window "$WINDOW" --output json)
EXPIRE=$(timed pitr-expire "$PITR_BIN" --config "$WORK/pitr.toml" expire --retention-window "$WINDOW" --output json)
LIST_AFTER=$(timed plain-list-after plain_list synthetic/)
LEFT=$(cat "$OUTDIR/plain-list-after.out")
summary=$("$BENCH_PY" - "$OUTDIR/pitr-expire.out" <<'PYTHON'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{len(r['plan']['expired_backups'])} backups, {r['expired_wal_files']} WAL files, {r['expired_chunks']} chunks expired; kept {len(r['plan']['kept_backups'])} backups")
PYTHON
)
cat <<EOF

== expire bench: $OBJECTS objects ($WAL WAL, $BACKUPS backups), s3s-fs + ${DELAY_MS} ms each way ($(date -u +%Y-%m-%dT%H:%MZ))
plain ListObjectsV2 of all $LISTED objects (pages of 1000, curl): $LIST_ALL s
pitr list --output json:                     $LIST s   ($(awk -v a="$LIST" -v b="$LIST_ALL" 'BEGIN{printf "%.2f", a/b}')x the plain listing)
pitr expire --dry-run (window $WINDOW):        $DRY s   ($(awk -v a="$DRY" -v b="$LIST_ALL" 'BEGIN{printf "%.2f", a/b}')x)
pitr expire (window $WINDOW):                  $EXPIRE s   ($(awk -v a="$EXPIRE" -v b="$LIST_ALL" 'BEGIN{printf "%.2f", a/b}')x): $summary
plain listing after: $LEFT objects in $LIST_AFTER s
EOF

#!/usr/bin/env bash
# Expire and list on a large repository (issue 18): a synthetic encrypted repository of
#   WAL=100000 WAL objects and BACKUPS=1000 backups (examples/synthetic_repository.rs), on
#   REPO_KIND=file (a local file:// repository) or REPO_KIND=s3 (s3s-fs through the delay proxy,
#   DELAY_MS=10 each way, 20 ms per round trip). Timed, each beside a plain listing of the same
#   objects (file: `find | wc -l`; s3: `aws s3api list-objects-v2` through the same proxy, pages
#   of 1000 one after the other, as any lister must):
#     pitr list --output json
#     pitr expire --dry-run   (the plan alone: catalog, WAL listing, histories, index)
#     pitr expire             (deletes about 90 %: a window holding the newest tenth)
#
#   bench/expire_bench.sh
# s3s-fs re-reads a whole directory for every page of a listing (measured: 4 s per page of
# 1000 in a directory of 100,000 objects, without the proxy), so REPO_KIND=s3 runs at a tenth of
# the scale by default (WAL=10000 BACKUPS=100): the test server, not the network, would set the
# time otherwise.
# Knobs: REPO_KIND=file WAL=100000 BACKUPS=1000 (s3: 10000, 100) DELAY_MS=10 WORK=/tmp/pitr-bench/expire OUTDIR=$WORK/results
#        PITR_BIN=target/release/pitr (built if missing)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
REPO_KIND=${REPO_KIND:-file}
if [ "$REPO_KIND" = s3 ]; then WAL=${WAL:-10000} BACKUPS=${BACKUPS:-100}; else WAL=${WAL:-100000} BACKUPS=${BACKUPS:-1000}; fi
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
if [ "$REPO_KIND" = s3 ]; then
  start_s3
  cat >"$WORK/pitr.toml" <<EOF
repo = 's3://$BUCKET/synthetic'
key_file = '$WORK/keyring'
store_timeout = 600
$(pitr_s3_store)
EOF
else
  cat >"$WORK/pitr.toml" <<EOF
repo = 'file://$S3DATA/$BUCKET/synthetic'
key_file = '$WORK/keyring'
EOF
fi

# seconds of wall time of "$@" (its output to $OUTDIR/<label>.out)
timed() {
  local label=$1; shift
  local t0 t1
  t0=$EPOCHREALTIME; "$@" >"$OUTDIR/$label.out" 2>"$OUTDIR/$label.err" || { cat "$OUTDIR/$label.err" >&2; die "$label failed"; }
  t1=$EPOCHREALTIME
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'
}

# A plain listing of PREFIX: the floor for any tool that lists.
plain_list() {
  if [ "$REPO_KIND" = s3 ]; then
    AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=$S3_SK AWS_DEFAULT_REGION=us-east-1 \
      aws --endpoint-url "http://127.0.0.1:$PROXY_PORT" s3api list-objects-v2 --bucket "$BUCKET" \
      --prefix "$1" --page-size 1000 --query 'length(Contents)'
  else
    find "$S3DATA/$BUCKET/$1" -type f | wc -l
  fi
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

== expire bench: $OBJECTS objects ($WAL WAL, $BACKUPS backups), $([ "$REPO_KIND" = s3 ] && echo "s3s-fs + ${DELAY_MS} ms each way" || echo "file:// on the local disk") ($(date -u +%Y-%m-%dT%H:%MZ))
plain listing of all $LISTED objects: $LIST_ALL s
pitr list --output json:                     $LIST s   ($(awk -v a="$LIST" -v b="$LIST_ALL" 'BEGIN{printf "%.2f", a/b}')x the plain listing)
pitr expire --dry-run (window $WINDOW):        $DRY s   ($(awk -v a="$DRY" -v b="$LIST_ALL" 'BEGIN{printf "%.2f", a/b}')x)
pitr expire (window $WINDOW):                  $EXPIRE s   ($(awk -v a="$EXPIRE" -v b="$LIST_ALL" 'BEGIN{printf "%.2f", a/b}')x): $summary
plain listing after: $LEFT objects in $LIST_AFTER s
EOF

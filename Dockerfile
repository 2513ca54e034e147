# syntax=docker/dockerfile:1.7
# One image with the three service binaries; docker-compose.yml picks the
# binary per service. Dependencies build in their own cached layer
# (cargo-chef), so editing the services does not rebuild tonic and friends.
# The toolchain and cargo-chef are pinned; the runtime base is distroless's
# nonroot tag (pin it by digest when you cut a release).

FROM rust:1.95.0-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# The skeleton's build scripts are empty stand-ins, so this layer needs
# neither proto/ nor any source: it changes only with Cargo.toml/Cargo.lock.
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p subscription-plan -p billing-credits -p messaging
COPY . .
RUN cargo build --release --locked --bins -p subscription-plan -p billing-credits -p messaging \
 && mkdir -p /out/bin /out/pki /out/ledger-archive \
 && cp target/release/subscription-plan target/release/billing-credits target/release/messaging /out/bin/

# glibc and libgcc only, no shell, runs as uid 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/bin/ /usr/local/bin/
COPY services/subscription-plan/plans.toml /etc/inmail/plans.toml
# Mount points owned by the service user, so named volumes mounted there
# start writable by it (the compose file's `pki` and `ledger-archive`).
COPY --from=builder --chown=65532:65532 /out/pki /etc/inmail/pki
COPY --from=builder --chown=65532:65532 /out/ledger-archive /data/ledger-archive
ENV LOG_FORMAT=json \
    PLANS_FILE=/etc/inmail/plans.toml
USER nonroot:nonroot
EXPOSE 50051 50052 50053 9101 9102 9103
# docker-compose.yml sets the command: subscription-plan, billing-credits or messaging.
CMD ["subscription-plan"]

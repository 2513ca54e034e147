# syntax=docker/dockerfile:1.7
# One image with the three service binaries; docker-compose.yml picks the
# binary per service. Dependencies build in their own cached layer
# (cargo-chef), so editing the services does not rebuild tonic and friends.

FROM lukemathwalker/cargo-chef:latest-rust-1-bookworm AS chef
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# shared/build.rs compiles proto/ (pure Rust, no protoc): the dependency layer needs it.
COPY proto proto
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p subscription-plan -p billing-credits -p messaging
COPY . .
RUN cargo build --release --locked --bins -p subscription-plan -p billing-credits -p messaging \
 && mkdir -p /out \
 && cp target/release/subscription-plan target/release/billing-credits target/release/messaging /out/

# glibc and libgcc only, no shell, runs as uid 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/ /usr/local/bin/
COPY services/subscription-plan/plans.toml /etc/inmail/plans.toml
ENV LOG_FORMAT=json \
    PLANS_FILE=/etc/inmail/plans.toml
USER nonroot:nonroot
EXPOSE 50051 50052 50053 9101 9102 9103
# docker-compose.yml sets the command: subscription-plan, billing-credits or messaging.
CMD ["subscription-plan"]

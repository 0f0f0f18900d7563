# Builds the ledgerflow binary (used by docker-compose.yml).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p ledgerflow && cp target/release/ledgerflow /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/ledgerflow /usr/local/bin/ledgerflow
COPY jobs /app/jobs
WORKDIR /app
ENTRYPOINT ["ledgerflow"]

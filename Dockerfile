# syntax=docker/dockerfile:1
# Build: docker build -t fastgate .
# Run:   docker run -p 8080:8080 fastgate
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin fastgate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/fastgate --create-home fastgate
COPY --from=build /src/target/release/fastgate /usr/local/bin/fastgate
COPY conf /etc/fastgate/conf
COPY routes.d /etc/fastgate/routes.d
WORKDIR /etc/fastgate
ENV FASTGATE_DB=/var/lib/fastgate/fastgate.db \
    FASTGATE_ROUTES_DIR=/etc/fastgate/routes.d
USER fastgate
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fastgate"]
CMD ["serve", "-c", "/etc/fastgate/conf/fastgate.yaml"]

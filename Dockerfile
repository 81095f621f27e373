# syntax=docker/dockerfile:1
# Build: docker build -t fastgate .
# Run:   docker run -p 8080:8080 -p 127.0.0.1:9090:9090 -v fastgate-data:/var/lib/fastgate \
#          -e FASTGATE_ADMIN_PASSWORD=… fastgate
# The admin service listens on all of the container's interfaces (it is
# unreachable otherwise): publish its port to the host's loopback only.
# See docker-compose.yml for the whole setup with Prometheus.
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
# routes.d belongs to the service user: route edits through the admin API write there.
COPY --chown=fastgate:fastgate routes.d /etc/fastgate/routes.d
WORKDIR /etc/fastgate
ENV FASTGATE_DB=/var/lib/fastgate/fastgate.db \
    FASTGATE_ROUTES_DIR=/etc/fastgate/routes.d \
    FASTGATE_ADMIN_LISTEN=0.0.0.0:9090
USER fastgate
VOLUME /var/lib/fastgate
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fastgate"]
CMD ["serve", "-c", "/etc/fastgate/conf/fastgate.yaml"]

-- Every node's audit rows, shipped from its SQLite outbox in id order:
-- (node, id) is the row's identity, so a batch sent twice is taken once.
-- Daily partitions by ts_ms (made by the shipper as days come); retention
-- drops whole partitions.
CREATE TABLE fastgate_audit (
    node       text   NOT NULL,
    id         bigint NOT NULL,
    ts_ms      bigint NOT NULL,
    request_id text   NOT NULL,
    row        jsonb  NOT NULL,
    PRIMARY KEY (node, id, ts_ms)
) PARTITION BY RANGE (ts_ms);
CREATE INDEX fastgate_audit_ts ON fastgate_audit (ts_ms);

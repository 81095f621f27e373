-- Every node's audit rows, shipped from its SQLite outbox in id order:
-- (node, id) is the row's identity, so a batch sent twice is taken once.
-- `seq` orders the whole cluster's log for paging (the admin API's log ids).
-- The columns the admin API filters and aggregates on are generated from
-- the row, with the SQLite table's names and types, so both answer the same
-- queries. Daily partitions by ts_ms (made by the shipper as days come);
-- retention drops whole partitions.
CREATE SEQUENCE fastgate_audit_seq;
CREATE TABLE fastgate_audit (
    node              text   NOT NULL,
    id                bigint NOT NULL,
    ts_ms             bigint NOT NULL,
    request_id        text   NOT NULL,
    row               jsonb  NOT NULL,
    seq               bigint NOT NULL DEFAULT nextval('fastgate_audit_seq'),
    key_id            text   GENERATED ALWAYS AS (row->>'key_id') STORED,
    owner             text   GENERATED ALWAYS AS (row->>'owner') STORED,
    user_id           text   GENERATED ALWAYS AS (row->>'user_id') STORED,
    route             text   GENERATED ALWAYS AS (row->>'route') STORED,
    upstream          text   GENERATED ALWAYS AS (row->>'upstream') STORED,
    model             text   GENERATED ALWAYS AS (row->>'model') STORED,
    method            text   GENERATED ALWAYS AS (row->>'method') STORED,
    path              text   GENERATED ALWAYS AS (row->>'path') STORED,
    status            bigint GENERATED ALWAYS AS ((row->>'status')::bigint) STORED,
    stream            bigint GENERATED ALWAYS AS ((row->>'stream')::bigint) STORED,
    duration_ms       double precision GENERATED ALWAYS AS ((row->>'duration_ms')::double precision) STORED,
    ttfb_ms           double precision GENERATED ALWAYS AS ((row->>'ttfb_ms')::double precision) STORED,
    prompt_tokens     bigint GENERATED ALWAYS AS ((row->>'prompt_tokens')::bigint) STORED,
    completion_tokens bigint GENERATED ALWAYS AS ((row->>'completion_tokens')::bigint) STORED,
    PRIMARY KEY (node, id, ts_ms)
) PARTITION BY RANGE (ts_ms);
CREATE INDEX fastgate_audit_ts ON fastgate_audit (ts_ms);
CREATE INDEX fastgate_audit_seq_idx ON fastgate_audit (seq);
CREATE INDEX fastgate_audit_key_ts ON fastgate_audit (key_id, ts_ms);

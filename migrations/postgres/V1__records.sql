-- The cluster's system of record for the tables every node keeps a copy of
-- (users, gateway keys): one row per (table, id) as JSON, NULL once deleted,
-- stamped with a cluster-wide revision so a node asks for what changed since
-- the last revision it applied.
CREATE SEQUENCE fastgate_revision;
CREATE TABLE fastgate_records (
    tbl        text   NOT NULL,
    id         text   NOT NULL,
    row        jsonb,
    revision   bigint NOT NULL,
    updated_by text   NOT NULL,
    PRIMARY KEY (tbl, id)
);
CREATE INDEX fastgate_records_revision ON fastgate_records (revision);

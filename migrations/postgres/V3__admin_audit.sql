-- Every node's admin actions (who changed what), shipped like the audit
-- log: (node, id) is a row's identity; `seq` orders the cluster's list.
CREATE TABLE fastgate_admin_audit (
    node  text   NOT NULL,
    id    bigint NOT NULL,
    ts_ms bigint NOT NULL,
    row   jsonb  NOT NULL,
    seq   bigserial,
    PRIMARY KEY (node, id)
);
CREATE INDEX fastgate_admin_audit_seq ON fastgate_admin_audit (seq);

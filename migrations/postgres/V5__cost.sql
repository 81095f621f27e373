-- What each request cost (FastGate's price table), filterable and summed
-- like the token columns: generated from the shipped row, as they are.
ALTER TABLE fastgate_audit
    ADD COLUMN cost double precision GENERATED ALWAYS AS ((row->>'cost')::double precision) STORED;

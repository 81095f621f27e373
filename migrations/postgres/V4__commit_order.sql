-- Revisions in commit order. A revision used to come from `nextval` when
-- the statement ran, so a writer that committed after a higher revision
-- was never read by a node that had already moved past it. Every write to
-- the record now takes one transaction-scoped advisory lock and only then
-- draws its revision: the lock is released after the commit is visible, so
-- revision N+1 cannot become visible before revision N. Any writer gets
-- this, whatever SQL it runs (the trigger overrides a given revision).
CREATE FUNCTION fastgate_records_revision() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7377304608397423719);
    NEW.revision := nextval('fastgate_revision');
    RETURN NEW;
END
$$;
CREATE TRIGGER fastgate_records_revision BEFORE INSERT OR UPDATE ON fastgate_records
    FOR EACH ROW EXECUTE FUNCTION fastgate_records_revision();

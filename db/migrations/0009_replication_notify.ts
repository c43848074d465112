/**
 * A change of this cluster's replication role reaches every process of the cluster at once.
 *
 * Each process follows the role (who may write replicated data, where writes are forwarded, a
 * secondary's bootstrap and heartbeats) from the `coffer_replication` row. It used to read that
 * row ten times a second to notice changes quickly; now this trigger sends
 * `NOTIFY coffer_replication` when the row's role changes — mode, state, epoch, superseding
 * epoch, primary address or identity — and each process's lease connection LISTENs, so the
 * row is read once a second (a safety net) plus once per change. The NOTIFY is sent at commit,
 * like the change it announces. Columns that move all the time (the applied position, the
 * heartbeat times, progress counters) do not notify.
 *
 * DBAs: `LISTEN coffer_replication;` in psql shows these as they happen.
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    CREATE FUNCTION coffer_replication_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_notify('coffer_replication', NEW.mode || ' ' || NEW.state);
      RETURN NULL;
    END $$`.execute(db);
  await sql`
    CREATE TRIGGER coffer_replication_notify
      AFTER UPDATE ON coffer_replication
      FOR EACH ROW
      WHEN ((OLD.mode, OLD.state, OLD.epoch, OLD.superseded_by_epoch, OLD.primary_api_addr, OLD.secondary_id, OLD.set_id)
            IS DISTINCT FROM
            (NEW.mode, NEW.state, NEW.epoch, NEW.superseded_by_epoch, NEW.primary_api_addr, NEW.secondary_id, NEW.set_id))
      EXECUTE FUNCTION coffer_replication_notify()`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

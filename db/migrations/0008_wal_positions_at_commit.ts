/**
 * WAL positions are handed out at commit, not by a sequencer afterwards (DESIGN.md invariant 2,
 * "serialise appends on a counter row"; src/storage/entries.ts has the statements).
 *
 * Every transaction that writes WAL rows takes the head row's lock as its LAST lock, just before
 * it commits, and numbers its rows head+1, head+2, … in the same statement. The lock is held until
 * the commit is visible, so positions are dense and follow commit order: a writer numbering
 * position n+1 waited for the writer of n to commit. Concurrent KV writes share one statement
 * (and so one turn of the lock and one commit), which is what makes the serialisation cheap.
 *
 * - `coffer_wal_positioned` (a deferred constraint trigger on rows inserted without a position)
 *   makes "no WAL row commits without its position" structural: a code path that writes WAL rows
 *   inside a transaction and forgets to number them before COMMIT fails, loudly, at COMMIT.
 * - `coffer_order_stragglers()` numbers committed rows that have no position — only a WAL written
 *   by the previous version (its sequencer ordered rows after commit) can hold any — in the order
 *   that sequencer used: by (xid, seq), each key's slots given to its rows in version order.
 *   This migration runs it once; the active node runs it when it takes over (cheap when there is
 *   nothing to do), so rows an old process committed during a rolling upgrade are not stranded.
 * - `coffer_wal_head.resets` counts WAL resets (a secondary enable wipes the replicated data and
 *   starts the WAL again at 1), so whoever follows the WAL by position sees the reset even when
 *   the new WAL has already grown past where it was.
 * - `coffer_wal_path` only served the sequencer's search for older unordered versions of a key.
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    CREATE FUNCTION coffer_wal_positioned() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF EXISTS (SELECT 1 FROM coffer_wal WHERE seq = NEW.seq AND lsn IS NULL) THEN
        RAISE EXCEPTION 'WAL row % would commit without a WAL position (its transaction did not number its rows before COMMIT)', NEW.seq
          USING ERRCODE = 'integrity_constraint_violation';
      END IF;
      RETURN NULL;
    END $$`.execute(db);
  await sql`
    CREATE CONSTRAINT TRIGGER coffer_wal_positioned AFTER INSERT ON coffer_wal
      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.lsn IS NULL)
      EXECUTE FUNCTION coffer_wal_positioned()`.execute(db);

  await sql`
    CREATE FUNCTION coffer_order_stragglers() RETURNS bigint LANGUAGE sql VOLATILE AS $$
      WITH r AS (
        SELECT seq, path,
               row_number() OVER (ORDER BY xid, seq) AS slot,
               row_number() OVER (PARTITION BY path ORDER BY xid, seq) AS path_slot,
               row_number() OVER (PARTITION BY path ORDER BY key_version, seq) AS path_rank
          FROM coffer_wal WHERE lsn IS NULL),
      n AS (SELECT r.seq, s.slot FROM r JOIN r s ON s.path = r.path AND s.path_slot = r.path_rank),
      h AS (UPDATE coffer_wal_head SET last_lsn = last_lsn + (SELECT count(*) FROM n)
             WHERE id = 1 AND EXISTS (SELECT 1 FROM n) RETURNING last_lsn - (SELECT count(*) FROM n) AS base),
      u AS (UPDATE coffer_wal w SET lsn = h.base + n.slot, ordered_at = clock_timestamp()
              FROM n, h WHERE w.seq = n.seq RETURNING 1)
      SELECT count(*) FROM u
    $$`.execute(db);
  await sql`SELECT coffer_order_stragglers()`.execute(db);

  await sql`ALTER TABLE coffer_wal_head ADD COLUMN resets bigint NOT NULL DEFAULT 0`.execute(db);
  await sql`DROP INDEX coffer_wal_path`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

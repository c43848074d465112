/**
 * WAL positions are handed out at commit, not by a sequencer afterwards (DESIGN.md invariant 2,
 * "serialise appends on a counter row"; src/storage/entries.ts has the statements).
 *
 * Every transaction that writes WAL rows takes the head row's lock as its LAST lock, at its end,
 * and numbers its rows head+1, head+2, … The lock is held until the commit is visible, so
 * positions are dense and follow commit order: a writer numbering position n+1 waited for the
 * writer of n to commit. Concurrent KV writes share one statement (and so one turn of the lock
 * and one commit), which is what makes the serialisation cheap.
 *
 * - `coffer_wal_stamp()` numbers the calling transaction's unnumbered rows, in the order written
 *   (a key's rows in its version order), and returns the highest position (0: none).
 * - `coffer_wal_number_at_commit`, a deferred constraint trigger on rows inserted without a
 *   position, calls it at COMMIT: "no WAL row commits without its position" is structural, and a
 *   transaction of several statements takes the head lock inside its COMMIT — never across a
 *   round trip to its client, where a frozen or partitioned process would hold every other
 *   writer of the cluster. (A one-statement write numbers its rows in the statement itself, so
 *   the trigger is not even queued for it.) Rows an older version of Coffer inserts without a
 *   position during a rolling upgrade are numbered the same way.
 * - `coffer_order_stragglers()` numbers committed rows that have no position — only a WAL
 *   written by the previous version (its sequencer numbered rows after commit) holds any — in
 *   the order that sequencer used: by (xid, seq), each key's slots given to its rows in version
 *   order. It takes the head first, so two calls never number the same rows. This migration
 *   runs it; the active node runs it when it takes over (cheap when there is nothing to do).
 * - `coffer_wal_head.resets` counts WAL resets (a secondary enable wipes the replicated data and
 *   starts the WAL again at 1), so whoever follows the WAL by position sees the reset even when
 *   the new WAL has already grown past where it was.
 * - `coffer_wal_path` only served the sequencer's search for older unordered versions of a key.
 *
 * Both tables are locked first, in the order every writer takes them (the WAL, then the head):
 * an old process's sequencer running meanwhile waits instead of deadlocking with the migration.
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  await sql`LOCK TABLE coffer_wal, coffer_wal_head IN ACCESS EXCLUSIVE MODE`.execute(db);

  await sql`
    CREATE FUNCTION coffer_wal_stamp() RETURNS bigint LANGUAGE sql VOLATILE AS $$
      WITH mine AS (
        SELECT seq, row_number() OVER (ORDER BY seq) AS n FROM coffer_wal
         WHERE xid = pg_current_xact_id_if_assigned() AND lsn IS NULL),
      hd AS (
        UPDATE coffer_wal_head SET last_lsn = last_lsn + (SELECT count(*) FROM mine)
         WHERE id = 1 AND EXISTS (SELECT 1 FROM mine)
        RETURNING last_lsn - (SELECT count(*) FROM mine) AS base),
      u AS (
        UPDATE coffer_wal w SET lsn = hd.base + mine.n, ordered_at = clock_timestamp()
          FROM mine, hd WHERE w.seq = mine.seq
        RETURNING w.lsn)
      SELECT coalesce(max(lsn), 0) FROM u
    $$`.execute(db);

  await sql`
    CREATE FUNCTION coffer_wal_number_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      -- The first of a transaction's deferred calls numbers all its rows; the others find theirs done.
      IF EXISTS (SELECT 1 FROM coffer_wal WHERE seq = NEW.seq AND lsn IS NULL) THEN
        PERFORM coffer_wal_stamp();
      END IF;
      RETURN NULL;
    END $$`.execute(db);
  await sql`
    CREATE CONSTRAINT TRIGGER coffer_wal_number_at_commit AFTER INSERT ON coffer_wal
      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.lsn IS NULL)
      EXECUTE FUNCTION coffer_wal_number_at_commit()`.execute(db);

  await sql`
    CREATE FUNCTION coffer_order_stragglers() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
    DECLARE numbered bigint;
    BEGIN
      -- Every numbering takes the head: holding it, this sees a stable set of stragglers (the
      -- next statement's snapshot is taken after the lock was granted).
      PERFORM 1 FROM coffer_wal_head WHERE id = 1 FOR UPDATE;
      WITH r AS (
        SELECT seq, path,
               row_number() OVER (ORDER BY xid, seq) AS slot,
               row_number() OVER (PARTITION BY path ORDER BY xid, seq) AS path_slot,
               row_number() OVER (PARTITION BY path ORDER BY key_version, seq) AS path_rank
          FROM coffer_wal WHERE lsn IS NULL AND xid IS DISTINCT FROM pg_current_xact_id_if_assigned()),
      n AS (SELECT r.seq, s.slot FROM r JOIN r s ON s.path = r.path AND s.path_slot = r.path_rank),
      h AS (UPDATE coffer_wal_head SET last_lsn = last_lsn + (SELECT count(*) FROM n)
             WHERE id = 1 AND EXISTS (SELECT 1 FROM n) RETURNING last_lsn - (SELECT count(*) FROM n) AS base),
      u AS (UPDATE coffer_wal w SET lsn = h.base + n.slot, ordered_at = clock_timestamp()
              FROM n, h WHERE w.seq = n.seq RETURNING 1)
      SELECT count(*) INTO numbered FROM u;
      RETURN numbered;
    END $$`.execute(db);
  await sql`SELECT coffer_order_stragglers()`.execute(db);

  await sql`ALTER TABLE coffer_wal_head ADD COLUMN resets bigint NOT NULL DEFAULT 0`.execute(db);
  await sql`DROP INDEX coffer_wal_path`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

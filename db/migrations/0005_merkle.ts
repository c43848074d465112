/**
 * The merkle index (DESIGN.md "Merkle index and recovery") and bounded-WAL bookkeeping.
 *
 * - `coffer_key_subpage(path)`: the index's bucket of a storage key, the first 12 bits of
 *   SHA-256(path). Declared IMMUTABLE (convert_to is only STABLE because the server encoding
 *   could in theory change; Coffer databases are UTF8) so it can back a generated column.
 * - `coffer_entries.merkle_subpage`: that bucket, indexed, so reconciliation reads exactly the
 *   entries of the subpages that differ.
 * - `coffer_merkle_pages`: flushed subpages, each with its pageLSN (ARIES) and hash.
 * - `coffer_merkle_checkpoint`: the last fuzzy checkpoint: its LSN and the dirty-page table.
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    CREATE FUNCTION coffer_key_subpage(p text) RETURNS integer
      LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
      AS $$ SELECT (get_byte(sha256(convert_to(p, 'UTF8')), 0) << 4) | (get_byte(sha256(convert_to(p, 'UTF8')), 1) >> 4) $$`.execute(db);
  await sql`ALTER TABLE coffer_entries ADD COLUMN merkle_subpage integer GENERATED ALWAYS AS (coffer_key_subpage(path)) STORED`.execute(db);
  await sql`CREATE INDEX coffer_entries_subpage ON coffer_entries (merkle_subpage)`.execute(db);

  // One row per flushed subpage. `records` is the sorted run of 32-byte (key hash, value hash)
  // records; incompressible, so stored EXTERNAL (no pglz attempt on every flush).
  await sql`
    CREATE TABLE coffer_merkle_pages (
      subpage     integer     PRIMARY KEY CHECK (subpage >= 0 AND subpage < 4096),
      page_lsn    bigint      NOT NULL,
      hash        bytea       NOT NULL,
      records     bytea       NOT NULL,
      flushed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
    )`.execute(db);
  await sql`ALTER TABLE coffer_merkle_pages ALTER COLUMN records SET STORAGE EXTERNAL`.execute(db);

  // The last fuzzy checkpoint. `dirty` is the dirty-page table: {subpage: recLSN}.
  await sql`
    CREATE TABLE coffer_merkle_checkpoint (
      id              smallint    PRIMARY KEY CHECK (id = 1),
      checkpoint_lsn  bigint      NOT NULL,
      redo_lsn        bigint      NOT NULL,
      dirty           jsonb       NOT NULL,
      -- the index's root at checkpoint_lsn (what a standby reports as merkle_root)
      root            bytea       NOT NULL,
      taken_at        timestamptz NOT NULL DEFAULT clock_timestamp()
    )`.execute(db);

  // Secondary reconciliation progress, and the primary's record of the last reindex.
  await sql`ALTER TABLE coffer_replication ADD COLUMN sync_lsn bigint`.execute(db);
  await sql`ALTER TABLE coffer_replication ADD COLUMN sync_progress bigint NOT NULL DEFAULT 0`.execute(db);
  await sql`ALTER TABLE coffer_replication ADD COLUMN sync_total_keys bigint NOT NULL DEFAULT 0`.execute(db);
  await sql`ALTER TABLE coffer_replication ADD COLUMN last_reindex_at timestamptz`.execute(db);

  await sql`
    CREATE VIEW coffer_merkle_status AS
    SELECT c.checkpoint_lsn, c.redo_lsn, (SELECT count(*) FROM jsonb_object_keys(c.dirty)) AS dirty_pages,
           encode(c.root, 'base64') AS root_at_checkpoint, c.taken_at,
           (SELECT count(*) FROM coffer_merkle_pages) AS flushed_pages,
           (SELECT max(page_lsn) FROM coffer_merkle_pages) AS newest_page_lsn
      FROM coffer_merkle_checkpoint c`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

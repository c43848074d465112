/**
 * The merkle index's storage: flushed subpages, the fuzzy checkpoint, the reads that recovery
 * and reconciliation make, and WAL garbage collection. Hot statements kept here as text.
 */
import { sql, type Kysely, type Transaction } from 'kysely';
import type { DB } from './schema';

export interface StoredPage {
  subpage: number;
  pageLsn: number;
  hash: Buffer;
  records: Buffer | null;
}

/** Every flushed subpage's pageLSN and hash; records only when asked (they are the bulk). */
export async function loadPageHeads(db: Kysely<DB>): Promise<StoredPage[]> {
  const { rows } = await sql<{ subpage: number; page_lsn: number; hash: Buffer }>`
    SELECT subpage, page_lsn, hash FROM coffer_merkle_pages`.execute(db);
  return rows.map((r) => ({ subpage: r.subpage, pageLsn: Number(r.page_lsn), hash: r.hash, records: null }));
}

export async function loadRuns(db: Kysely<DB>, subpages: number[]): Promise<Map<number, { pageLsn: number; run: Buffer }>> {
  const { rows } = await sql<{ subpage: number; page_lsn: number; records: Buffer }>`
    SELECT subpage, page_lsn, records FROM coffer_merkle_pages WHERE subpage = ANY(${subpages}::int[])`.execute(db);
  return new Map(rows.map((r) => [r.subpage, { pageLsn: Number(r.page_lsn), run: r.records }]));
}

/**
 * Writes flushed subpages. A page never goes back: an older image (a slow flush overtaken by a
 * newer one) does not replace a newer one, unless `force` (a rebuild replaces everything).
 */
export async function savePages(
  db: Kysely<DB> | Transaction<DB>,
  pages: { subpage: number; pageLsn: number; hash: Buffer; run: Buffer }[],
  force = false,
): Promise<void> {
  if (pages.length === 0) return;
  await sql`
    INSERT INTO coffer_merkle_pages AS cur (subpage, page_lsn, hash, records, flushed_at)
    SELECT s, l, h, r, clock_timestamp()
      FROM unnest(${pages.map((p) => p.subpage)}::int[], ${pages.map((p) => p.pageLsn)}::bigint[],
                  ${pages.map((p) => p.hash)}::bytea[], ${pages.map((p) => p.run)}::bytea[]) AS x(s, l, h, r)
    ON CONFLICT (subpage) DO UPDATE
       SET page_lsn = EXCLUDED.page_lsn, hash = EXCLUDED.hash, records = EXCLUDED.records, flushed_at = EXCLUDED.flushed_at
     WHERE ${force ? sql`true` : sql`cur.page_lsn <= EXCLUDED.page_lsn`}`.execute(db);
}

export interface Checkpoint {
  checkpointLsn: number;
  redoLsn: number;
  dirty: Map<number, number>;
  root: Buffer;
  takenAt: Date;
}

export async function readCheckpoint(db: Kysely<DB>): Promise<Checkpoint | null> {
  const r = await db.selectFrom('coffer_merkle_checkpoint').selectAll().where('id', '=', 1).executeTakeFirst();
  if (!r) return null;
  return {
    checkpointLsn: Number(r.checkpoint_lsn),
    redoLsn: Number(r.redo_lsn),
    dirty: new Map(Object.entries(r.dirty).map(([k, v]) => [Number(k), Number(v)])),
    root: r.root,
    takenAt: r.taken_at,
  };
}

export async function saveCheckpoint(db: Kysely<DB> | Transaction<DB>, cp: Omit<Checkpoint, 'takenAt'>): Promise<void> {
  const dirty = JSON.stringify(Object.fromEntries(cp.dirty));
  await sql`
    INSERT INTO coffer_merkle_checkpoint (id, checkpoint_lsn, redo_lsn, dirty, root, taken_at)
    VALUES (1, ${cp.checkpointLsn}, ${cp.redoLsn}, ${dirty}::jsonb, ${cp.root}, clock_timestamp())
    ON CONFLICT (id) DO UPDATE
       SET checkpoint_lsn = EXCLUDED.checkpoint_lsn, redo_lsn = EXCLUDED.redo_lsn, dirty = EXCLUDED.dirty,
           root = EXCLUDED.root, taken_at = EXCLUDED.taken_at
     -- never back: a late checkpoint of a node that just lost the active lease is dropped
     WHERE coffer_merkle_checkpoint.checkpoint_lsn <= EXCLUDED.checkpoint_lsn`.execute(db);
}

export interface WalForRedo {
  lsn: number;
  path: string;
  op: 'put' | 'delete';
  valueHash: Buffer | null;
  sp: number;
}

/** Ordered WAL in [fromLsn, toLsn], with each key's subpage computed by Postgres. */
export async function walForRedo(db: Kysely<DB>, fromLsn: number, toLsn: number, limit: number): Promise<WalForRedo[]> {
  const { rows } = await sql<{ lsn: number; path: string; op: 'put' | 'delete'; value_hash: Buffer | null; sp: number }>`
    SELECT lsn, path, op, value_hash, coffer_key_subpage(path) AS sp
      FROM coffer_wal WHERE lsn >= ${fromLsn} AND lsn <= ${toLsn} ORDER BY lsn LIMIT ${limit}`.execute(db);
  return rows.map((r) => ({ lsn: Number(r.lsn), path: r.path, op: r.op, valueHash: r.value_hash, sp: r.sp }));
}

/** The oldest ordered WAL position still retained (null: none). */
export async function oldestRetainedLsn(db: Kysely<DB>): Promise<number | null> {
  const { rows } = await sql<{ lsn: number | null }>`SELECT min(lsn) AS lsn FROM coffer_wal WHERE lsn IS NOT NULL`.execute(db);
  return rows[0].lsn === null ? null : Number(rows[0].lsn);
}

/**
 * A full rebuild's read: in one REPEATABLE READ snapshot, the WAL head and, subpage by
 * subpage, the sorted records of every live entry. Postgres hashes the keys and sorts; the
 * runs come back in batches through a cursor so no single result is large.
 */
export async function scanRuns(
  db: Kysely<DB>,
  onBatch: (head: number, runs: { subpage: number; run: Buffer }[]) => Promise<void>,
  batchSize = 64,
): Promise<number> {
  return db
    .transaction()
    .setIsolationLevel('repeatable read')
    .execute(async (tx) => {
      // Every entry this snapshot holds was written by a transaction that numbered its WAL rows
      // before committing: the head in the same snapshot covers them all.
      const head = Number((await sql<{ last_lsn: number }>`SELECT last_lsn FROM coffer_wal_head WHERE id = 1`.execute(tx)).rows[0].last_lsn);
      await sql`
        DECLARE coffer_rebuild NO SCROLL CURSOR FOR
        SELECT merkle_subpage AS subpage,
               string_agg(substr(kh, 1, 16) || substr(value_hash, 1, 16), ''::bytea ORDER BY kh) AS run
          FROM (SELECT merkle_subpage, sha256(convert_to(path, 'UTF8')) AS kh, value_hash
                  FROM coffer_entries WHERE value IS NOT NULL) e
         GROUP BY merkle_subpage ORDER BY merkle_subpage`.execute(tx);
      for (;;) {
        const { rows: batch } = await sql<{ subpage: number; run: Buffer }>`FETCH ${sql.raw(String(batchSize))} FROM coffer_rebuild`.execute(tx);
        if (batch.length === 0) break;
        await onBatch(head, batch);
      }
      return head;
    });
}

/** Entries (tombstones included) of some subpages, for merkle-sync. */
export async function entriesOfSubpages(db: Kysely<DB>, subpages: number[]) {
  const { rows } = await sql<{ path: string; version: number; value: Buffer | null; value_hash: Buffer | null; sp: number }>`
    SELECT path, version, value, value_hash, merkle_subpage AS sp FROM coffer_entries
     WHERE merkle_subpage = ANY(${subpages}::int[]) ORDER BY merkle_subpage, path`.execute(db);
  return rows.map((r) => ({ path: r.path, version: Number(r.version), value: r.value, valueHash: r.value_hash, sp: r.sp }));
}

/** Live paths of some subpages (a secondary maps purge key hashes to paths). */
export async function pathsOfSubpages(db: Kysely<DB>, subpages: number[]): Promise<string[]> {
  const { rows } = await sql<{ path: string }>`
    SELECT path FROM coffer_entries WHERE merkle_subpage = ANY(${subpages}::int[]) AND value IS NOT NULL`.execute(db);
  return rows.map((r) => r.path);
}

export interface WalRetention {
  /** Keep at most this many ordered rows ... */
  maxRows: number;
  /** ... and at most about this many bytes (value sizes plus a fixed per-row overhead). */
  maxBytes: number;
}

/** Bytes a WAL row is counted as beyond its value: its columns and index entries, roughly. */
export const WAL_ROW_OVERHEAD_BYTES = 128;

/**
 * Bounded WAL: deletes ordered rows older than the retention window, but never at or after
 * `keepFrom` (the merkle index's redo point: recovery must be able to read from there).
 * Returns how many rows went, the position collected up to, and the one the bound alone wanted
 * (higher when recovery's redo point held collection back: the caller flushes and retries).
 */
export async function collectWal(
  db: Kysely<DB>,
  retention: WalRetention,
  keepFrom: number,
  maxDelete = 20_000,
): Promise<{ deleted: number; cutoff: number; wanted: number }> {
  // The row bound alone, unless the retained rows' bytes pass the byte bound: only then find,
  // newest first, where they do (a window over every retained row, three times the work).
  const { rows } = await sql<{ cutoff: number | null }>`
    WITH head AS (SELECT last_lsn FROM coffer_wal_head WHERE id = 1),
         kept AS (
           SELECT sum(value_size + ${WAL_ROW_OVERHEAD_BYTES}) AS bytes
             FROM coffer_wal, head
            WHERE lsn IS NOT NULL AND lsn > head.last_lsn - ${retention.maxRows})
    SELECT GREATEST(
             (SELECT last_lsn FROM head) - ${retention.maxRows},
             CASE WHEN (SELECT bytes FROM kept) > ${retention.maxBytes} THEN (
               SELECT max(lsn) FROM (
                 SELECT lsn, sum(value_size + ${WAL_ROW_OVERHEAD_BYTES}) OVER (ORDER BY lsn DESC) AS bytes
                   FROM coffer_wal, head
                  WHERE lsn IS NOT NULL AND lsn > head.last_lsn - ${retention.maxRows}) recent
                WHERE bytes > ${retention.maxBytes})
             ELSE 0 END
           ) AS cutoff`.execute(db);
  const wanted = Number(rows[0].cutoff ?? 0);
  const cutoff = Math.min(wanted, keepFrom - 1);
  if (cutoff <= 0) return { deleted: 0, cutoff: 0, wanted };
  const del = await sql`
    DELETE FROM coffer_wal WHERE seq IN (
      SELECT seq FROM coffer_wal WHERE lsn IS NOT NULL AND lsn <= ${cutoff} ORDER BY lsn LIMIT ${maxDelete})`.execute(db);
  return { deleted: Number(del.numAffectedRows ?? 0), cutoff, wanted };
}

/**
 * Reading the WAL. Its rows are numbered (`lsn` = 1, 2, 3 …) by the transactions that write them,
 * in commit order (src/storage/entries.ts; DESIGN.md invariant 2), so a reader resumes after the
 * last position it saw: nothing can later appear at or below it.
 */
import { sql, type Kysely } from 'kysely';
import type { DB } from './schema';
import type { CommittedRecord } from './entries';
import { preparedQuery } from './db';
import { WAL_ROW_OVERHEAD_BYTES } from './merkle';

/** A WAL record as the merkle index sees it. */
export type OrderedRecord = CommittedRecord;

/**
 * The head (and how many times the WAL was reset) and the WAL records after `afterLsn` (at most
 * `limit`, in order), from one snapshot: what the active node feeds its merkle index and
 * shipping. One statement; an index probe when nothing is new.
 */
const READ_NEW_WAL = `
  SELECT h.last_lsn AS head, h.resets, w.lsn, w.path, w.op, w.value_hash, coffer_key_subpage(w.path) AS sp
    FROM coffer_wal_head h
    LEFT JOIN LATERAL (
      SELECT lsn, path, op, value_hash FROM coffer_wal
       WHERE lsn > $1::bigint ORDER BY lsn LIMIT $2::int) w ON true
   WHERE h.id = 1
   ORDER BY w.lsn`;

export async function readNewWal(db: Kysely<DB>, afterLsn: number, limit: number): Promise<{ headLsn: number; resets: number; records: OrderedRecord[] }> {
  const rows = await preparedQuery<{ head: string; resets: string; lsn: string | null; path: string; op: 'put' | 'delete'; value_hash: Buffer | null; sp: number }>(
    db,
    'coffer_read_new_wal',
    READ_NEW_WAL,
    [afterLsn, limit],
  );
  if (rows.length === 0) throw new Error('coffer_wal_head has no row');
  const records = rows[0].lsn === null ? [] : rows.map((r) => ({ lsn: Number(r.lsn), path: r.path, op: r.op, valueHash: r.value_hash, sp: r.sp }));
  return { headLsn: Number(rows[0].head), resets: Number(rows[0].resets), records };
}

/**
 * Numbers committed WAL rows that have no position (left by the previous version, whose
 * sequencer numbered rows after commit; see migration 0008). Returns how many it numbered.
 */
export async function orderStragglers(db: Kysely<DB>): Promise<number> {
  const { rows } = await sql<{ n: number }>`SELECT coffer_order_stragglers() AS n`.execute(db);
  return Number(rows[0].n);
}

export interface WalRecord {
  lsn: number;
  path: string;
  op: 'put' | 'delete';
  keyVersion: number;
  valueHash: Buffer | null;
  valueSize: number;
  writtenAt: Date;
}

/** Ordered WAL after `afterLsn`: dense, so a reader can resume from its last position. */
export async function readWal(db: Kysely<DB>, afterLsn: number, limit: number): Promise<WalRecord[]> {
  const rows = await db
    .selectFrom('coffer_wal')
    .select(['lsn', 'path', 'op', 'key_version', 'value_hash', 'value_size', 'written_at'])
    .where('lsn', '>', afterLsn)
    .orderBy('lsn')
    .limit(limit)
    .execute();
  return rows.map((r) => ({
    lsn: Number(r.lsn),
    path: r.path,
    op: r.op,
    keyVersion: Number(r.key_version),
    valueHash: r.value_hash,
    valueSize: r.value_size,
    writtenAt: r.written_at,
  }));
}

export async function walHead(db: Kysely<DB>): Promise<number> {
  const head = await db.selectFrom('coffer_wal_head').select('last_lsn').where('id', '=', 1).executeTakeFirstOrThrow();
  return Number(head.last_lsn);
}

/** WAL figures for metrics: head, rows waiting for a position and the age of the oldest. */
export async function walGauges(db: Kysely<DB>) {
  const { rows } = await sql<{ head: number; unordered: number; age: number | null; retained: number; bytes: number }>`
    SELECT (SELECT last_lsn FROM coffer_wal_head WHERE id = 1) AS head,
           (SELECT count(*)::int FROM coffer_wal WHERE lsn IS NULL) AS unordered,
           (SELECT extract(epoch FROM now() - min(written_at))::float8 FROM coffer_wal WHERE lsn IS NULL) AS age,
           (SELECT count(*)::int FROM coffer_wal WHERE lsn IS NOT NULL) AS retained,
           (SELECT coalesce(sum(value_size + ${WAL_ROW_OVERHEAD_BYTES}), 0)::float8 FROM coffer_wal WHERE lsn IS NOT NULL) AS bytes`.execute(db);
  return {
    walHeadLsn: Number(rows[0].head),
    walUnorderedRows: Number(rows[0].unordered),
    walOldestUnorderedAgeSeconds: Number(rows[0].age ?? 0),
    walRetainedRows: Number(rows[0].retained),
    walRetainedBytes: Number(rows[0].bytes),
  };
}

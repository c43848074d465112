/**
 * WAL ordering and reading.
 *
 * Writers insert WAL rows with a plain sequence number and their transaction id, without any
 * lock between them. The sequencer (run by the active node) turns them into dense,
 * commit-ordered positions (DESIGN.md invariant 2). It is optimistic: two autocommit statements,
 * a read and a write guarded by the head it read, so an overlapping takeover's second sequencer
 * loses cleanly instead of interleaving, and an idle step costs one round trip:
 *
 *  - A row is eligible only when its xid is below the snapshot's xmin horizon: every transaction
 *    that could still commit an older row has finished, so nothing can later appear "behind" a
 *    position that was handed out. A slow transaction delays ordering; it is never skipped.
 *  - The horizon can release version v+1 of a key before version v (T2 took its xid first, then
 *    waited on T1's row lock). Versions are bumped under the row lock, so per key they ARE the
 *    commit order: a row is held back while an older version of its key is still unordered, and
 *    within a batch a key's rows take the key's slots in version order.
 *
 * The horizon is Postgres-server-wide: a long transaction in ANY database of the same server
 * delays ordering here. `coffer_wal_status.oldest_unordered_at` shows it.
 */
import { sql, type Kysely } from 'kysely';
import type { DB } from './schema';
import { WAL_ROW_OVERHEAD_BYTES } from './merkle';

export interface SequenceResult {
  assigned: number;
  headLsn: number;
  /** The (seq, lsn) pairs handed out, for in-process waiters. */
  pairs?: [number, number][];
  /** The records ordered, in LSN order, for the merkle index. */
  records?: OrderedRecord[];
}

export interface OrderedRecord {
  lsn: number;
  path: string;
  op: 'put' | 'delete';
  valueHash: Buffer | null;
  /** The key's merkle subpage (coffer_key_subpage). */
  sp: number;
}

interface Candidate {
  seq: number;
  path: string;
  key_version: number;
}

interface Row extends Candidate {
  eligible: boolean;
  op: 'put' | 'delete';
  value_hash: Buffer | null;
  sp: number;
}

/** Pure: the order in which an eligible batch takes its positions. Exported for unit tests. */
export function orderBatch<T extends Candidate>(batch: T[], olderOutside: Map<string, number>): T[] {
  const eligible = batch.filter((r) => {
    const blocker = olderOutside.get(r.path);
    return blocker === undefined || r.key_version < blocker;
  });
  // Keep the (xid, seq) slots, but give each key's slots to its rows in version order.
  const byPath = new Map<string, T[]>();
  for (const r of eligible) {
    const list = byPath.get(r.path) ?? [];
    list.push(r);
    byPath.set(r.path, list);
  }
  for (const list of byPath.values()) list.sort((a, b) => a.key_version - b.key_version);
  const taken = new Map<string, number>();
  return eligible.map((r) => {
    const i = taken.get(r.path) ?? 0;
    taken.set(r.path, i + 1);
    return byPath.get(r.path)![i];
  });
}

export async function sequenceWal(db: Kysely<DB>, maxRows = 5000): Promise<SequenceResult> {
  return writeSequence(db, await planSequence(db, maxRows));
}

/** A sequencer step's plan: the head it read and the rows it will order, in order. */
export interface SequencePlan {
  headLsn: number;
  ordered: (Row & { xid: string })[];
}

/** The sequencer's first statement (exported so tests can interleave other work before the second). */
export async function planSequence(db: Kysely<DB>, maxRows = 5000): Promise<SequencePlan> {
  // (1) The head and the candidates, in one statement (one snapshot). It returns the next batch
  // below the horizon AND every other unordered row of the same keys: older versions of a key
  // that fall beyond the LIMIT must join the batch (else a batch full of held-back rows would
  // never progress), and rows still above the horizon are the blockers that hold newer
  // versions back. With nothing unordered it returns the head alone (NULLs beside it).
  const { rows: found } = await sql<Row & { head: number; xid: string }>`
    WITH h AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x),
         b AS (SELECT w.seq, w.path FROM coffer_wal w, h
                WHERE w.lsn IS NULL AND w.xid < h.x
                ORDER BY w.xid, w.seq
                LIMIT ${maxRows}),
         r AS (SELECT w.seq, w.xid, w.path, w.key_version, (w.xid < h.x) AS eligible, w.op, w.value_hash, coffer_key_subpage(w.path) AS sp
                 FROM coffer_wal w, h
                WHERE w.lsn IS NULL AND (w.seq IN (SELECT seq FROM b) OR w.path IN (SELECT path FROM b)))
    SELECT r.seq, r.xid::text AS xid, r.path, r.key_version, r.eligible, r.op, r.value_hash, r.sp, hd.last_lsn AS head
      FROM coffer_wal_head hd LEFT JOIN r ON true
     WHERE hd.id = 1
     ORDER BY r.xid, r.seq`.execute(db);
  if (found.length === 0) throw new Error('coffer_wal_head has no row');
  const headLsn = Number(found[0].head);
  const rows = found[0].seq === null ? [] : found;
  if (rows.length === 0) return { headLsn, ordered: [] };

  const blockers = new Map<string, number>();
  for (const r of rows) {
    if (!r.eligible) blockers.set(r.path, Math.min(blockers.get(r.path) ?? Infinity, Number(r.key_version)));
  }
  const ordered = orderBatch(
    rows.filter((r) => r.eligible),
    blockers,
  );
  return { headLsn, ordered };
}

/** The sequencer's second statement: the plan's positions, if no other sequencer moved the head. */
export async function writeSequence(db: Kysely<DB>, { headLsn, ordered }: SequencePlan): Promise<SequenceResult> {
  if (ordered.length === 0) return { assigned: 0, headLsn };
  // (2) The new head and the positions, in one statement, guarded by the head read in (1):
  // `h` takes the head row's lock and moves it only if no other sequencer moved it since, and
  // `o` assigns positions only through `h`. A second sequencer (an overlapping takeover) waits
  // on the head row, then finds it moved and does nothing. Rows are matched on (seq, xid), so
  // a WAL reset in between (secondary enable restarts seq) cannot hand a position to a row
  // this plan never saw; and if fewer rows than planned were assigned, the statement aborts
  // itself (coffer_raise), so a head never covers a position no row holds.
  const lsns = ordered.map((_, i) => headLsn + 1 + i);
  const newHead = headLsn + ordered.length;
  const { rows: out } = await sql<{ moved: number }>`
    WITH h AS (
      UPDATE coffer_wal_head SET last_lsn = ${newHead} WHERE id = 1 AND last_lsn = ${headLsn} RETURNING 1
    ), o AS (
      UPDATE coffer_wal w SET lsn = v.lsn, ordered_at = clock_timestamp()
        FROM unnest(${ordered.map((r) => r.seq)}::bigint[], ${ordered.map((r) => r.xid)}::text[], ${lsns}::bigint[]) AS v(seq, xid, lsn), h
       WHERE w.seq = v.seq AND w.xid = v.xid::xid8 AND w.lsn IS NULL
      RETURNING 1
    )
    SELECT CASE WHEN (SELECT count(*) FROM o) = (SELECT count(*) FROM h) * ${ordered.length}
                THEN (SELECT count(*) FROM h)
                ELSE coffer_raise('WAL sequencer: ' || (SELECT count(*) FROM o) || ' of ' || ${ordered.length}::int || ' planned rows were still unordered; rolled back')
           END::int AS moved`.execute(db);
  // Another sequencer moved the head first: its positions stand, ours were never written.
  if (out[0].moved !== 1) return { assigned: 0, headLsn };
  return {
    assigned: ordered.length,
    headLsn: newHead,
    pairs: ordered.map((r, i) => [Number(r.seq), lsns[i]]),
    records: ordered.map((r, i) => ({ lsn: lsns[i], path: r.path, op: r.op, valueHash: r.value_hash, sp: r.sp })),
  };
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

/** Has the WAL row with insertion number `seq` been given a position yet? Returns it if so. */
export async function lsnOfSeq(db: Kysely<DB>, seq: number): Promise<number | null> {
  const row = await db.selectFrom('coffer_wal').select('lsn').where('seq', '=', seq).executeTakeFirst();
  return row?.lsn == null ? null : Number(row.lsn);
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

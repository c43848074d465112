/**
 * Checks of DESIGN.md invariants 1 (atomic WAL) and 2 (commit-ordered, dense WAL) as a DBA
 * would make them with SQL, and a WAL tailer that checks what a reader sees while it happens.
 *
 * The checks return lists of human-readable violations (empty = holds), so a failing test shows
 * the offending paths and numbers rather than a bare `false`.
 */
import type { ControlledTransaction, Kysely } from 'kysely';
import { readWal } from '../../src/storage/wal';
import type { DB } from '../../src/storage/schema';

/**
 * Keyring term passed to `putEntry` by tests that write raw (not barrier-encrypted) bytes
 * through the storage API: the term guard refuses writes under a term older than the cluster's
 * active one, which is 1 until a key rotation (these tests never rotate; a fresh database has no
 * seal row at all).
 */
export const TERM = 1;

/** Anything with pg's `query(text, params)`: a pg.Client or pg.Pool. */
export interface Queryable {
  query(text: string, params?: unknown[]): Promise<{ rows: any[] }>;
}

/**
 * Invariant 1: for every entry, the WAL holds exactly one row per version 1..version (every
 * mutation bumps the version under the row lock and writes one WAL row in the same statement);
 * no WAL row exists for a path without an entry; and the WAL row of the entry's current version
 * describes its current state (put ↔ value with that hash and size; delete ↔ tombstone).
 */
export async function atomicWalViolations(q: Queryable): Promise<string[]> {
  const out: string[] = [];
  const counts = await q.query(`
    WITH w AS (
      SELECT path, count(*)::int AS n, count(DISTINCT key_version)::int AS d,
             min(key_version)::int AS lo, max(key_version)::int AS hi
        FROM coffer_wal GROUP BY path)
    SELECT coalesce(e.path, w.path) AS path, e.version::int AS version, w.n, w.d, w.lo, w.hi
      FROM coffer_entries e FULL JOIN w ON w.path = e.path
     WHERE e.path IS NULL OR w.path IS NULL
        OR w.n <> e.version OR w.d <> e.version OR w.lo <> 1 OR w.hi <> e.version
     ORDER BY 1 LIMIT 50`);
  for (const r of counts.rows) {
    if (r.version === null) out.push(`WAL rows without an entry: ${r.path} (wal versions ${r.lo}..${r.hi}, ${r.n} rows)`);
    else if (r.n === null) out.push(`entry without WAL rows: ${r.path} (version ${r.version})`);
    else out.push(`${r.path}: entry version ${r.version} but WAL has ${r.n} rows, ${r.d} distinct versions ${r.lo}..${r.hi}`);
  }
  const latest = await q.query(`
    SELECT e.path, e.version::int AS version, w.op, e.value IS NULL AS tomb
      FROM coffer_entries e JOIN coffer_wal w ON w.path = e.path AND w.key_version = e.version
     WHERE NOT (
           (w.op = 'put' AND e.value IS NOT NULL AND w.value_hash = e.value_hash
            AND w.value_hash = sha256(e.value) AND w.value_size = octet_length(e.value))
        OR (w.op = 'delete' AND e.value IS NULL AND e.value_hash IS NULL AND w.value_hash IS NULL))
     ORDER BY 1 LIMIT 50`);
  for (const r of latest.rows) out.push(`${r.path} v${r.version}: latest WAL row is '${r.op}' but the entry is ${r.tomb ? 'a tombstone' : 'a value (or hash/size differ)'}`);
  return out;
}

export interface WalShape {
  rows: number;
  ordered: number;
  head: number;
  violations: string[];
}

/**
 * Invariant 2 once everything is ordered: positions are exactly 1..N (no gap, no duplicate),
 * the head equals N, and per key LSN order is version order with no version skipped.
 */
export async function walOrderViolations(q: Queryable): Promise<WalShape> {
  const out: string[] = [];
  const { rows: [s] } = await q.query(`
    SELECT count(*)::int AS rows, count(lsn)::int AS ordered, count(DISTINCT lsn)::int AS distinct_lsn,
           coalesce(min(lsn), 0)::int AS lo, coalesce(max(lsn), 0)::int AS hi,
           (SELECT last_lsn FROM coffer_wal_head WHERE id = 1)::int AS head
      FROM coffer_wal`);
  if (s.ordered !== s.rows) out.push(`${s.rows - s.ordered} of ${s.rows} WAL rows have no position`);
  if (s.distinct_lsn !== s.ordered) out.push(`duplicate positions: ${s.ordered} positioned rows, ${s.distinct_lsn} distinct`);
  if (s.ordered > 0 && (s.lo !== 1 || s.hi !== s.ordered)) out.push(`positions span ${s.lo}..${s.hi} for ${s.ordered} rows (gaps)`);
  if (s.head !== s.hi) out.push(`head is ${s.head} but the highest position is ${s.hi}`);
  const perKey = await q.query(`
    SELECT path, lsn::int AS lsn, key_version::int AS v, prev::int AS prev FROM (
      SELECT path, lsn, key_version, lag(key_version) OVER (PARTITION BY path ORDER BY lsn) AS prev
        FROM coffer_wal WHERE lsn IS NOT NULL) x
     WHERE (prev IS NULL AND key_version <> 1) OR (prev IS NOT NULL AND key_version <> prev + 1)
     ORDER BY path, lsn LIMIT 50`);
  for (const r of perKey.rows) out.push(`${r.path}: at LSN ${r.lsn} version ${r.v} follows version ${r.prev ?? '(none)'} in LSN order`);
  return { rows: s.rows, ordered: s.ordered, head: s.head, violations: out };
}

export async function unorderedCount(q: Queryable): Promise<number> {
  const { rows } = await q.query(`SELECT count(*)::int AS n FROM coffer_wal WHERE lsn IS NULL`);
  return rows[0].n;
}

/**
 * A reader following the WAL the way a log shipper does: readWal after the last position it
 * saw. It records every record and every anomaly a reader could observe: a position that is
 * not exactly last+1 (a gap it skipped over, or a position at or below one it already passed),
 * and a record seen twice.
 */
export class WalTailer {
  last = 0;
  /** `${path}@${keyVersion}` → lsn */
  readonly seen = new Map<string, number>();
  readonly anomalies: string[] = [];
  /** When (Date.now()) each record was first seen, by key. */
  readonly seenAt = new Map<string, number>();
  reads = 0;
  private stopping = false;
  private loop: Promise<void> | null = null;

  constructor(
    private readonly db: Kysely<DB>,
    private readonly batch = 500,
  ) {}

  /** One read; returns how many records it got. */
  async poll(): Promise<number> {
    const recs = await readWal(this.db, this.last, this.batch);
    this.reads++;
    for (const r of recs) {
      if (r.lsn <= this.last) this.anomalies.push(`saw LSN ${r.lsn} after already passing ${this.last}`);
      else if (r.lsn !== this.last + 1) this.anomalies.push(`jumped from LSN ${this.last} to ${r.lsn}`);
      const key = `${r.path}@${r.keyVersion}`;
      if (this.seen.has(key)) this.anomalies.push(`saw ${key} twice (LSN ${this.seen.get(key)} and ${r.lsn})`);
      this.seen.set(key, r.lsn);
      this.seenAt.set(key, Date.now());
      this.last = Math.max(this.last, r.lsn);
    }
    return recs.length;
  }

  start(idleMs = 5): void {
    this.loop = (async () => {
      while (!this.stopping) {
        const n = await this.poll();
        if (n === 0) await new Promise((r) => setTimeout(r, idleMs));
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await this.loop;
  }
}

/**
 * Rolls back a controlled transaction a failing test may have left open (it would hold its
 * locks — the WAL head's, once it numbered its rows — until the database is dropped).
 * kysely's rollback() throws synchronously on a finished transaction, hence the checks.
 */
export async function rollbackQuietly(t: ControlledTransaction<DB> | undefined): Promise<void> {
  if (!t || t.isCommitted || t.isRolledBack) return;
  try {
    await t.rollback().execute();
  } catch {
    // the connection is gone (e.g. the database was dropped): nothing left to roll back
  }
}

/** `close()`, but never waits more than `ms` (a pool waits for connections still checked out). */
export async function closeBounded(close: () => Promise<void>, ms = 5000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([close().catch(() => undefined), new Promise<void>((r) => (timer = setTimeout(r, ms)))]);
  clearTimeout(timer);
}

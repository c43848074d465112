/**
 * Replicated storage: encrypted entries and their WAL rows.
 *
 * Invariant 1 (atomic WAL) is structural here: every mutation and its WAL row are ONE SQL
 * statement (a data-modifying CTE), so neither can commit without the other, whatever
 * transaction the caller runs it in. The hot-path statements are kept together so they can be
 * reviewed as text.
 *
 * Invariant 2 (dense, commit-ordered WAL): a WAL row gets its position (`lsn`) from the head row
 * `coffer_wal_head`, whose lock is the LAST lock its transaction takes and is held until that
 * transaction's commit is visible — so whoever numbers position n+1 did so after the writer of n
 * committed. Two shapes:
 *
 *  - a write that is one statement (the batched KV writes, a secondary's apply) numbers its rows
 *    in that statement (`WAL_POSITIONS`), after its entry rows are locked;
 *  - a transaction of several statements writes its rows without a position; migration 0008's
 *    deferred trigger numbers them all inside its COMMIT (`coffer_wal_stamp()`), so the head is
 *    never held across a round trip to a client.
 *
 * Nothing ever waits on an entry row while holding the head, so the two cannot deadlock; and
 * within one transaction a key's rows are numbered in the order they were written, which is its
 * version order.
 */
import { createHash } from 'node:crypto';
import { sql, type Kysely, type Transaction } from 'kysely';
import { preparedQuery } from './db';
import type { CasWrite, Versioned } from '../core/ports';
import type { DB } from './schema';

export interface WrittenRow {
  /** The WAL row's insertion number (its position is given at COMMIT). */
  seq: number;
  keyVersion: number;
}

/**
 * The CTE `hd` that takes `n` positions for the rows of CTE `rows`: it moves the head past them
 * (taking the head row's lock, held to commit) and yields `base`, the position before the first,
 * and `resets` (which WAL generation the positions belong to; see readNewWal).
 * Its inputs are the changed rows, so Postgres has locked every entry row before it reaches the
 * head; and a statement that changed nothing leaves the head alone (no lock, no position).
 * Under READ COMMITTED a writer that waited for the lock re-reads the head its predecessor
 * committed (EvalPlanQual), so its positions follow on densely.
 */
export const WAL_POSITIONS = (rows: string) => `hd AS (
    UPDATE coffer_wal_head SET last_lsn = last_lsn + (SELECT count(*) FROM ${rows})
     WHERE id = 1 AND EXISTS (SELECT 1 FROM ${rows})
    RETURNING last_lsn - (SELECT count(*) FROM ${rows}) AS base, resets)`;

/**
 * Numbers the WAL rows this transaction wrote without a position (in the order written) now,
 * instead of at its COMMIT; returns the highest position (0: it wrote none, and then the head is
 * not locked). Only for callers that must control when the head is taken (tests of
 * interleavings): the head's lock is then held across the round trip to COMMIT.
 */
export async function stampWal(tx: Transaction<DB>): Promise<number> {
  const { rows } = await sql<{ last_lsn: string }>`SELECT coffer_wal_stamp() AS last_lsn`.execute(tx);
  return Number(rows[0].last_lsn);
}

/**
 * The highest position among the WAL rows `seqs` (numbered at their transaction's COMMIT), read
 * after that commit; the head if they were collected meanwhile (an upper bound is what
 * X-Vault-Index needs).
 */
export async function positionOf(db: Kysely<DB>, seqs: number[]): Promise<number> {
  const { rows } = await sql<{ lsn: string }>`
    SELECT coalesce((SELECT max(lsn) FROM coffer_wal WHERE seq = ANY(${seqs}::bigint[])),
                    (SELECT last_lsn FROM coffer_wal_head WHERE id = 1)) AS lsn`.execute(db);
  return Number(rows[0].lsn);
}

/**
 * A transaction whose WAL rows are numbered at its COMMIT (migration 0008's trigger); `lastLsn`
 * is the highest of them (0 if it wrote none), read back after the commit.
 */
export async function walTransaction<T>(db: Kysely<DB>, fn: (tx: Transaction<DB>) => Promise<T>): Promise<{ result: T; lastLsn: number }> {
  let seqs: number[] = [];
  const result = await db.transaction().execute(async (tx) => {
    const r = await fn(tx);
    // Its unnumbered rows (the partial index on unnumbered rows finds them at once).
    const { rows } = await sql<{ seq: string }>`
      SELECT seq FROM coffer_wal WHERE xid = pg_current_xact_id_if_assigned() AND lsn IS NULL`.execute(tx);
    seqs = rows.map((x) => Number(x.seq));
    return r;
  });
  return { result, lastLsn: seqs.length ? await positionOf(db, seqs) : 0 };
}

const DELETE_WITH_WAL = (path: string) => sql<{ seq: number; key_version: number }>`
  WITH e AS (
    UPDATE coffer_entries
       SET version = version + 1, value = NULL, value_hash = NULL, updated_at = clock_timestamp()
     WHERE path = ${path} AND value IS NOT NULL AND ${sql.raw(WRITABLE)}
    RETURNING path, version
  )
  INSERT INTO coffer_wal (path, op, key_version)
  SELECT path, 'delete', version FROM e
  RETURNING seq, key_version`;

/** SHA-256 of the stored (encrypted) bytes: what the WAL and the merkle index see. */
export function valueHash(value: Buffer): Buffer {
  return createHash('sha256').update(value).digest();
}

// The term guard: a value encrypted under a keyring term older than the active one is not
// written (no row comes back) and the caller reloads its keyring and retries.
const PUT_WITH_WAL = (paths: string[], values: Buffer[], hashes: Buffer[], term: number) => sql<{ seq: number; path: string; key_version: number }>`
  WITH e AS (
    INSERT INTO coffer_entries AS cur (path, version, value, value_hash, updated_at)
    SELECT p, 1, v, h, clock_timestamp()
      FROM unnest(${paths}::text[], ${values}::bytea[], ${hashes}::bytea[]) AS x(p, v, h)
     WHERE NOT EXISTS (SELECT 1 FROM coffer_seal WHERE id = 1 AND active_term > ${term}) AND ${sql.raw(WRITABLE)}
    ON CONFLICT (path) DO UPDATE
       SET version = cur.version + 1, value = EXCLUDED.value,
           value_hash = EXCLUDED.value_hash, updated_at = EXCLUDED.updated_at
    RETURNING path, version, value_hash, octet_length(value) AS size
  )
  INSERT INTO coffer_wal (path, op, key_version, value_hash, value_size)
  SELECT path, 'put', version, value_hash, size FROM e
  RETURNING seq, path, key_version`;

/** Thrown when a write was encrypted under a keyring term that is no longer the active one. */
export class StaleKeyTerm extends Error {
  constructor() {
    super('value encrypted under a superseded keyring term');
  }
}

/**
 * The role guard of every client write of replicated data (PUT_WITH_WAL, DELETE_WITH_WAL,
 * MODIFY_BATCH): nothing is written while this cluster is a secondary, whose replicated data
 * only apply and merkle-sync write (invariant 7: the primary runs such writes), nor while it is
 * a superseded primary. A process normally knows its role already and forwards (or refuses)
 * without trying; this catches the one that has not heard of a change yet (NOTIFY
 * coffer_replication is on its way), in the statement itself. `coffer_writable()` (migration
 * 0010) holds a shared lock that a change of role takes exclusively, so no such write commits
 * after the change that forbids it.
 */
const WRITABLE = `coffer_writable()`;

/** Thrown when a write of replicated data was refused because this cluster is a secondary or a superseded primary (nothing written). */
export class ReplicaReadOnly extends Error {
  constructor() {
    super('this cluster is a performance secondary: the primary takes its writes');
  }
}

/** After a write that wrote nothing: was it the role guard? */
async function refusedByRoleGuard(tx: Transaction<DB>): Promise<boolean> {
  const { rows } = await sql<{ secondary: boolean }>`SELECT NOT ${sql.raw(WRITABLE)} AS secondary`.execute(tx);
  return rows[0].secondary;
}

export async function putEntry(tx: Transaction<DB>, path: string, value: Buffer, term: number): Promise<WrittenRow> {
  const { rows } = await PUT_WITH_WAL([path], [value], [valueHash(value)], term).execute(tx);
  if (rows.length === 0) throw (await refusedByRoleGuard(tx)) ? new ReplicaReadOnly() : new StaleKeyTerm();
  return { seq: rows[0].seq, keyVersion: rows[0].key_version };
}

/** Several puts in one statement (one round trip); every entry still gets its own WAL row. */
export async function putEntries(tx: Transaction<DB>, entries: [string, Buffer][], term: number): Promise<number[]> {
  if (new Set(entries.map(([p]) => p)).size !== entries.length) throw new Error('putEntries: duplicate path');
  const { rows } = await PUT_WITH_WAL(
    entries.map(([p]) => p),
    entries.map(([, v]) => v),
    entries.map(([, v]) => valueHash(v)),
    term,
  ).execute(tx);
  if (rows.length !== entries.length) throw (await refusedByRoleGuard(tx)) ? new ReplicaReadOnly() : new StaleKeyTerm();
  return rows.map((r) => Number(r.seq));
}

export async function getEntries(db: Kysely<DB> | Transaction<DB>, paths: string[]): Promise<(Buffer | null)[]> {
  const { rows } = await sql<{ path: string; value: Buffer | null }>`
    SELECT path, value FROM coffer_entries WHERE path = ANY(${paths}::text[])`.execute(db);
  const byPath = new Map(rows.map((r) => [r.path, r.value]));
  return paths.map((p) => byPath.get(p) ?? null);
}

// Reads outside transactions are prepared statements (parsed and planned once per connection).
const GET_WITH_LAST = `
  SELECT path, value, 0 AS which FROM coffer_entries WHERE path = $1::text AND value IS NOT NULL
  UNION ALL
  (SELECT path, value, 1 AS which FROM coffer_entries
    WHERE path >= $2::text AND path < $3::text AND value IS NOT NULL
    ORDER BY path DESC LIMIT 1)`;

const GET_ENTRY = `SELECT value FROM coffer_entries WHERE path = $1::text`;

export async function getWithLast(db: Kysely<DB>, path: string, prefix: string) {
  const rows = await preparedQuery<{ path: string; value: Buffer; which: number }>(db, 'coffer_get_with_last', GET_WITH_LAST, [path, prefix, prefixEnd(prefix)]);
  const own = rows.find((r) => r.which === 0);
  const last = rows.find((r) => r.which === 1);
  return { value: own?.value ?? null, last: last ? { path: last.path, value: last.value } : null };
}

/** Deletes `path` if it holds a value; returns null (and writes no WAL row) if it did not. */
export async function deleteEntry(tx: Transaction<DB>, path: string): Promise<WrittenRow | null> {
  const { rows } = await DELETE_WITH_WAL(path).execute(tx);
  if (rows.length === 0 && (await refusedByRoleGuard(tx))) throw new ReplicaReadOnly();
  return rows.length ? { seq: rows[0].seq, keyVersion: rows[0].key_version } : null;
}

export async function getEntry(db: Kysely<DB>, path: string): Promise<Buffer | null> {
  const rows = await preparedQuery<{ value: Buffer | null }>(db, 'coffer_get_entry', GET_ENTRY, [path]);
  return rows[0]?.value ?? null;
}

/** Upper bound for a prefix range scan under COLLATE "C" (U+10FFFF sorts after any path byte). */
export function prefixEnd(prefix: string): string {
  return prefix + '\u{10FFFF}';
}

/**
 * Vault LIST semantics: the immediate children of `prefix`, folders with a trailing `/`,
 * sorted. `prefix` is '' or ends with '/'.
 */
export async function listChildren(
  db: Kysely<DB> | Transaction<DB>,
  table: 'coffer_entries' | 'coffer_local_entries',
  prefix: string,
): Promise<string[]> {
  const rows = await db
    .selectFrom(table)
    .select('path')
    .where('path', '>=', prefix)
    .where('path', '<', prefixEnd(prefix))
    .$if(table === 'coffer_entries', (q) => q.where(sql<boolean>`value IS NOT NULL`))
    .orderBy('path')
    .execute();
  const out: string[] = [];
  for (const { path } of rows) {
    const rest = path.slice(prefix.length);
    const slash = rest.indexOf('/');
    const child = slash === -1 ? rest : rest.slice(0, slash + 1);
    if (child && out[out.length - 1] !== child) out.push(child);
  }
  return out;
}

/** Per write of a batch: its highest WAL position, or null if its anchor had moved (nothing of it was written). */
export type CasOutcome = number | null;

/** A committed WAL row as the merkle index takes it (also what readNewWal returns). */
export interface CommittedRecord {
  lsn: number;
  path: string;
  op: 'put' | 'delete';
  valueHash: Buffer | null;
  /** The key's merkle subpage (coffer_key_subpage). */
  sp: number;
}

/** WAL rows one statement committed, in position order, and the WAL generation they belong to. */
export interface CommittedRows {
  resets: number;
  records: CommittedRecord[];
}

/**
 * Several optimistic read-modify-writes in ONE statement (so one commit): each write changes its
 * anchor entry only if the anchor's version is still the one its writer read, and writes its
 * other entries only if that succeeded; every changed entry gets its WAL row in the same
 * statement (invariant 1), numbered in it (WAL_POSITIONS). The guard sits where Postgres re-checks it against the newest row
 * version under the row lock — ON CONFLICT DO UPDATE's WHERE and UPDATE's WHERE — so a writer
 * that committed after this statement's snapshot is seen, and the loser writes nothing. The new
 * anchor version is `version + 1`, which is what the guard compares against (`EXCLUDED.version
 * - 1`). A write whose anchor is absent expects version 0; an anchor row deleted since keeps its
 * row (value NULL, version bumped), so "absent" and "deleted" never look alike. A *blind* write
 * (version -1: KV v1's last-writer-wins put and delete) has no guard: it writes whatever the
 * anchor's version (a delete of nothing writes nothing, and counts as not written).
 *
 * Before any row is touched, the statement takes a transaction advisory lock per anchor, in
 * the order of the lock keys: two batches from two processes that share anchors (each batch
 * holds several) then wait for each other instead of deadlocking on rows locked in different
 * orders. The guard still decides; the locks only order. Callers pass each path at most once in
 * the whole batch (a row changed twice in one statement is an error). The keyring-term guard and
 * the role guard (WRITABLE) are the same as PUT_WITH_WAL's, for the whole batch.
 */
const MODIFY_BATCH = `
  WITH g AS (SELECT NOT EXISTS (SELECT 1 FROM coffer_seal WHERE id = 1 AND active_term > $10::int) AS term_ok, ${WRITABLE} AS role_ok),
  t AS (SELECT term_ok AND role_ok AS ok, term_ok, role_ok FROM g),
  a AS (SELECT * FROM unnest($1::int[], $2::text[], $3::bigint[], $4::bytea[], $5::bytea[]) AS a(item, path, ver, val, hash)
         WHERE (SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT DISTINCT hashtextextended(p, 0) AS k FROM unnest($2::text[]) AS p ORDER BY 1) l) >= 0),
  o AS (SELECT * FROM unnest($6::int[], $7::text[], $8::bytea[], $9::bytea[]) AS o(item, path, val, hash)),
  ap AS (
    INSERT INTO coffer_entries AS cur (path, version, value, value_hash, updated_at)
    SELECT a.path, a.ver + 1, a.val, a.hash, clock_timestamp() FROM a, t
     WHERE t.ok AND a.ver >= 0 AND a.val IS NOT NULL
       AND (a.ver = 0 OR EXISTS (SELECT 1 FROM coffer_entries e WHERE e.path = a.path))
    ON CONFLICT (path) DO UPDATE
       SET version = EXCLUDED.version, value = EXCLUDED.value, value_hash = EXCLUDED.value_hash, updated_at = EXCLUDED.updated_at
     WHERE cur.version = EXCLUDED.version - 1
    RETURNING path, version, value_hash, octet_length(value) AS size),
  ad AS (
    UPDATE coffer_entries cur SET version = cur.version + 1, value = NULL, value_hash = NULL, updated_at = clock_timestamp()
      FROM a, t
     WHERE t.ok AND a.ver >= 0 AND a.val IS NULL AND cur.path = a.path AND cur.version = a.ver AND cur.value IS NOT NULL
    RETURNING cur.path, cur.version),
  bp AS (
    INSERT INTO coffer_entries AS cur (path, version, value, value_hash, updated_at)
    SELECT a.path, 1, a.val, a.hash, clock_timestamp() FROM a, t
     WHERE t.ok AND a.ver < 0 AND a.val IS NOT NULL
    ON CONFLICT (path) DO UPDATE
       SET version = cur.version + 1, value = EXCLUDED.value, value_hash = EXCLUDED.value_hash, updated_at = EXCLUDED.updated_at
    RETURNING path, version, value_hash, octet_length(value) AS size),
  bd AS (
    UPDATE coffer_entries cur SET version = cur.version + 1, value = NULL, value_hash = NULL, updated_at = clock_timestamp()
      FROM a, t
     WHERE t.ok AND a.ver < 0 AND a.val IS NULL AND cur.path = a.path AND cur.value IS NOT NULL
    RETURNING cur.path, cur.version),
  ok AS (SELECT a.item FROM a WHERE a.path IN (SELECT path FROM ap UNION ALL SELECT path FROM ad UNION ALL SELECT path FROM bp UNION ALL SELECT path FROM bd)),
  op AS (
    INSERT INTO coffer_entries AS cur (path, version, value, value_hash, updated_at)
    SELECT o.path, 1, o.val, o.hash, clock_timestamp() FROM o
     WHERE o.val IS NOT NULL AND o.item IN (SELECT item FROM ok)
    ON CONFLICT (path) DO UPDATE
       SET version = cur.version + 1, value = EXCLUDED.value, value_hash = EXCLUDED.value_hash, updated_at = EXCLUDED.updated_at
    RETURNING path, version, value_hash, octet_length(value) AS size),
  od AS (
    UPDATE coffer_entries cur SET version = cur.version + 1, value = NULL, value_hash = NULL, updated_at = clock_timestamp()
      FROM o
     WHERE o.val IS NULL AND o.item IN (SELECT item FROM ok) AND cur.path = o.path AND cur.value IS NOT NULL
    RETURNING cur.path, cur.version),
  ch AS (
    SELECT path, 'put' AS op, version, value_hash, size FROM ap
    UNION ALL SELECT path, 'put', version, value_hash, size FROM bp
    UNION ALL SELECT path, 'put', version, value_hash, size FROM op
    UNION ALL SELECT path, 'delete', version, NULL, 0 FROM ad
    UNION ALL SELECT path, 'delete', version, NULL, 0 FROM bd
    UNION ALL SELECT path, 'delete', version, NULL, 0 FROM od),
  ${WAL_POSITIONS('ch')},
  w AS (
    INSERT INTO coffer_wal (path, op, key_version, value_hash, value_size, lsn, ordered_at)
    SELECT path, op, version, value_hash, size, (SELECT base FROM hd) + row_number() OVER (ORDER BY path), clock_timestamp() FROM ch
    RETURNING lsn, path, op, value_hash)
  SELECT t.term_ok, t.role_ok, (SELECT resets FROM hd) AS resets, p.item, w.lsn, w.path, w.op, w.value_hash, coffer_key_subpage(w.path) AS sp
    FROM t LEFT JOIN (w JOIN (SELECT item, path FROM a UNION ALL SELECT item, path FROM o) p ON p.path = w.path) ON true
   ORDER BY w.lsn`;

/**
 * Runs a batch of optimistic writes in one statement; see MODIFY_BATCH. Throws ReplicaReadOnly
 * (nothing written) if this cluster is a secondary, StaleKeyTerm if the keyring term moved on.
 */
export async function casWriteBatch(db: Kysely<DB>, writes: CasWrite[], term: number): Promise<{ outcomes: CasOutcome[]; committed: CommittedRows | null }> {
  const a = { item: [] as number[], path: [] as string[], ver: [] as number[], val: [] as (Buffer | null)[], hash: [] as (Buffer | null)[] };
  const o = { item: [] as number[], path: [] as string[], val: [] as (Buffer | null)[], hash: [] as (Buffer | null)[] };
  writes.forEach((w, i) => {
    a.item.push(i);
    a.path.push(w.anchor.path);
    a.ver.push(w.anchor.version);
    a.val.push(w.anchor.value);
    a.hash.push(w.anchor.value && valueHash(w.anchor.value));
    for (const [p, v] of w.puts) {
      o.item.push(i);
      o.path.push(p);
      o.val.push(v);
      o.hash.push(valueHash(v));
    }
    for (const p of w.deletes) {
      o.item.push(i);
      o.path.push(p);
      o.val.push(null);
      o.hash.push(null);
    }
  });
  const rows = await preparedQuery<{ term_ok: boolean; role_ok: boolean; resets: string | null; item: number | null; lsn: string | null; path: string; op: 'put' | 'delete'; value_hash: Buffer | null; sp: number }>(
    db,
    'coffer_modify_batch',
    MODIFY_BATCH,
    [a.item, a.path, a.ver, a.val, a.hash, o.item, o.path, o.val, o.hash, term],
  );
  if (rows[0] && !rows[0].role_ok) throw new ReplicaReadOnly();
  if (!rows[0]?.term_ok) throw new StaleKeyTerm();
  const outcomes: CasOutcome[] = writes.map(() => null);
  const records: CommittedRecord[] = [];
  for (const r of rows) {
    if (r.item === null || r.lsn === null) continue;
    const lsn = Number(r.lsn);
    outcomes[r.item] = Math.max(outcomes[r.item] ?? 0, lsn);
    records.push({ lsn, path: r.path, op: r.op, valueHash: r.value_hash, sp: r.sp });
  }
  return { outcomes, committed: records.length ? { resets: Number(rows[0].resets), records } : null };
}

const GET_VERSIONED = `
  SELECT q.i, c.value, c.version
    FROM unnest($1::text[]) WITH ORDINALITY AS q(path, i)
    LEFT JOIN coffer_entries c ON c.path = q.path COLLATE "C"`;

/** Entries with their versions, for a later casWriteBatch; in the order asked. */
export async function getVersionedMany(db: Kysely<DB>, paths: string[]): Promise<Versioned[]> {
  const rows = await preparedQuery<{ i: number; value: Buffer | null; version: number | null }>(db, 'coffer_get_versioned', GET_VERSIONED, [paths]);
  const out: Versioned[] = paths.map(() => ({ value: null, version: 0 }));
  for (const r of rows) out[Number(r.i) - 1] = { value: r.value, version: Number(r.version ?? 0) };
  return out;
}

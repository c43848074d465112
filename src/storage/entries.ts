/**
 * Replicated storage: encrypted entries and their WAL rows.
 *
 * Invariant 1 (atomic WAL) is structural here: every mutation and its WAL row are ONE SQL
 * statement (a data-modifying CTE), so neither can commit without the other, whatever
 * transaction the caller runs it in. The hot-path statements are kept together so they can be
 * reviewed as text.
 */
import { createHash } from 'node:crypto';
import { sql, type Kysely, type Transaction } from 'kysely';
import { preparedQuery } from './db';
import type { DB } from './schema';

export interface WrittenRow {
  /** The WAL row's insertion number (not yet its dense LSN; the sequencer assigns that). */
  seq: number;
  keyVersion: number;
}

const DELETE_WITH_WAL = (path: string) => sql<{ seq: number; key_version: number }>`
  WITH e AS (
    UPDATE coffer_entries
       SET version = version + 1, value = NULL, value_hash = NULL, updated_at = clock_timestamp()
     WHERE path = ${path} AND value IS NOT NULL
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
     WHERE NOT EXISTS (SELECT 1 FROM coffer_seal WHERE id = 1 AND active_term > ${term})
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

export async function putEntry(tx: Transaction<DB>, path: string, value: Buffer, term: number): Promise<WrittenRow> {
  const { rows } = await PUT_WITH_WAL([path], [value], [valueHash(value)], term).execute(tx);
  if (rows.length === 0) throw new StaleKeyTerm();
  return { seq: rows[0].seq, keyVersion: rows[0].key_version };
}

/** Several puts in one statement (one round trip); every entry still gets its own WAL row. */
export async function putEntries(tx: Transaction<DB>, entries: [string, Buffer][], term: number): Promise<number> {
  if (new Set(entries.map(([p]) => p)).size !== entries.length) throw new Error('putEntries: duplicate path');
  const { rows } = await PUT_WITH_WAL(
    entries.map(([p]) => p),
    entries.map(([, v]) => v),
    entries.map(([, v]) => valueHash(v)),
    term,
  ).execute(tx);
  if (rows.length !== entries.length) throw new StaleKeyTerm();
  return Math.max(...rows.map((r) => r.seq));
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

/** Local (never replicated) barrier storage: writes here have no WAL row (invariant 5). */
import { sql, type Kysely, type Transaction } from 'kysely';
import { StaleKeyTerm } from './entries';
import type { DB } from './schema';

type Q = Kysely<DB> | Transaction<DB>;

export async function getLocal(db: Q, path: string): Promise<Buffer | null> {
  const row = await db.selectFrom('coffer_local_entries').select('value').where('path', '=', path).executeTakeFirst();
  return row?.value ?? null;
}

/** Same term guard as replicated puts (entries.ts). */
export async function putLocal(db: Q, path: string, value: Buffer, term: number): Promise<void> {
  const { rows } = await sql<{ path: string }>`
    INSERT INTO coffer_local_entries AS cur (path, value, updated_at)
    SELECT ${path}, ${value}, clock_timestamp()
     WHERE NOT EXISTS (SELECT 1 FROM coffer_seal WHERE id = 1 AND active_term > ${term})
    ON CONFLICT (path) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
    RETURNING path`.execute(db);
  if (rows.length === 0) throw new StaleKeyTerm();
}

export async function deleteLocal(db: Q, path: string): Promise<void> {
  await db.deleteFrom('coffer_local_entries').where('path', '=', path).execute();
}

/** Re-encrypts every local entry (used when a secondary adopts its primary's keyring). */
export async function reencryptLocal(db: Kysely<any>, convert: (path: string, blob: Buffer) => Buffer, term: number): Promise<number> {
  return db.transaction().execute(async (tx) => {
    const { rows } = await sql<{ path: string; value: Buffer }>`SELECT path, value FROM coffer_local_entries FOR UPDATE`.execute(tx);
    for (const r of rows) await sql`UPDATE coffer_local_entries SET value = ${convert(r.path, r.value)} WHERE path = ${r.path}`.execute(tx);
    // Wrapped responses were sealed under the old keyring; they cannot outlive the swap.
    await sql`DELETE FROM coffer_wrapped`.execute(tx);
    void term;
    return rows.length;
  });
}

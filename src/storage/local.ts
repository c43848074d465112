/** Local (never replicated) barrier storage: writes here have no WAL row (invariant 5). */
import type { Kysely, Transaction } from 'kysely';
import type { DB } from './schema';

type Q = Kysely<DB> | Transaction<DB>;

export async function getLocal(db: Q, path: string): Promise<Buffer | null> {
  const row = await db.selectFrom('coffer_local_entries').select('value').where('path', '=', path).executeTakeFirst();
  return row?.value ?? null;
}

export async function putLocal(db: Q, path: string, value: Buffer): Promise<void> {
  await db
    .insertInto('coffer_local_entries')
    .values({ path, value })
    .onConflict((oc) => oc.column('path').doUpdateSet({ value, updated_at: new Date() }))
    .execute();
}

export async function deleteLocal(db: Q, path: string): Promise<void> {
  await db.deleteFrom('coffer_local_entries').where('path', '=', path).execute();
}

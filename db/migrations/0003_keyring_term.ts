/**
 * The active keyring term, next to the keyring. Every replicated or local write checks it in
 * the same statement, so once `sys/rotate` has returned no process writes under an older term
 * (a process holding a stale keyring has its write refused, reloads, and retries).
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  await sql`ALTER TABLE coffer_seal ADD COLUMN active_term integer NOT NULL DEFAULT 1`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

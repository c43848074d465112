/**
 * The WAL sequencer orders rows optimistically (no lock held across its two statements; see
 * src/storage/wal.ts). Its second statement checks that it assigned every row it planned and
 * aborts itself otherwise; SQL has no RAISE outside PL/pgSQL, hence this helper.
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    CREATE FUNCTION coffer_raise(msg text) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
    BEGIN
      RAISE EXCEPTION '%', msg USING ERRCODE = 'serialization_failure';
    END $$`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

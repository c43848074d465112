/**
 * The role guard of client writes of replicated data (src/storage/entries.ts `WRITABLE`).
 *
 * `coffer_writable()` says whether this cluster may take a client write of replicated data: not
 * while it is a secondary (its primary takes them; invariant 7), nor while it is a primary
 * superseded by a promoted one. It first takes a shared transaction-level advisory lock, which
 * writers never wait on among themselves; a change of role takes the same lock exclusively
 * (`updateReplication`), so it waits for the writes in flight to commit, and a write that comes
 * after it waits for it and then sees the new role: being VOLATILE, the function reads the role
 * under a snapshot taken after the lock is granted, not the calling statement's. No client
 * write of replicated data commits after the change of role that forbids it.
 *
 * `coffer_read_only()` is the role alone (no lock), as a request's token lookup reports it.
 *
 * The lock is the two-int4 form (classid 'coff', objid 'role'), a key space apart from the
 * bigint advisory locks Coffer also takes (the active lease, anchors, shipping).
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  // The role alone, without the lock: what a request's token lookup reports (AUTH_READ).
  await sql`
    CREATE FUNCTION coffer_read_only() RETURNS boolean LANGUAGE sql STABLE AS $$
      SELECT EXISTS (SELECT 1 FROM coffer_replication
                      WHERE id = 1 AND (mode = 'secondary' OR superseded_by_epoch IS NOT NULL))
    $$`.execute(db);
  await sql`
    CREATE FUNCTION coffer_writable() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
    BEGIN
      PERFORM pg_advisory_xact_lock_shared(1668245094, 1919904869);
      RETURN NOT coffer_read_only();
    END $$`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

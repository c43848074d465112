/**
 * Failover: epochs that fence a superseded primary, what a secondary last heard of its
 * primary's position (the promote response reports the gap), and the divergence report a
 * re-pointed cluster keeps of the keys merkle-sync had to overwrite.
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  // The replication set's generation: 1 at primary/enable, +1 at each promote. Batches and
  // heartbeats carry it; a cluster that learns of a higher one than its own as a primary is
  // superseded and takes no more writes.
  await sql`ALTER TABLE coffer_replication ADD COLUMN epoch bigint NOT NULL DEFAULT 0`.execute(db);
  await sql`ALTER TABLE coffer_replication ADD COLUMN superseded_by_epoch bigint`.execute(db);
  // Secondary: the primary's WAL head at the last heartbeat, and when that was.
  await sql`ALTER TABLE coffer_replication ADD COLUMN primary_head_lsn bigint`.execute(db);
  await sql`ALTER TABLE coffer_replication ADD COLUMN primary_contact_at timestamptz`.execute(db);

  // Keys merkle-sync overwrote or removed although this cluster held a value the primary did
  // not have (a write acknowledged by a superseded primary, never shipped). Hashes only: the
  // value itself stays encrypted, and is gone from storage once overwritten.
  await sql`
    CREATE TABLE coffer_divergence (
      id                 bigserial   PRIMARY KEY,
      detected_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
      path               text COLLATE "C" NOT NULL,
      local_version      bigint      NOT NULL,
      local_value_sha256 bytea,
      primary_version    bigint,
      action             text        NOT NULL CHECK (action IN ('overwritten', 'deleted', 'purged')),
      epoch              bigint      NOT NULL
    )`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

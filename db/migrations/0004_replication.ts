/**
 * Performance replication state. All of it is local to the cluster (invariant 5): a
 * secondary's view of its primary, a primary's list of secondaries and their cursors.
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  // This cluster's replication role. One row.
  await sql`
    CREATE TABLE coffer_replication (
      id                 smallint    PRIMARY KEY CHECK (id = 1),
      mode               text        NOT NULL DEFAULT 'disabled' CHECK (mode IN ('disabled', 'primary', 'secondary')),
      -- the replication set's id: the same on the primary and its secondaries
      set_id             uuid,
      -- secondary: who we are to the primary, where it is, and our shared secret (encrypted)
      secondary_id       text,
      primary_api_addr   text,
      credential         bytea,
      -- secondary: replication state as Vault names it
      state              text        NOT NULL DEFAULT 'idle',
      -- secondary: the last primary WAL position applied here (exactly-once apply cursor)
      applied_lsn        bigint      NOT NULL DEFAULT 0,
      -- secondary bootstrap: the primary's head when the copy started, and the copy cursor
      bootstrap_lsn      bigint,
      bootstrap_after    text COLLATE "C",
      last_heartbeat     timestamptz,
      last_error         text,
      updated_at         timestamptz NOT NULL DEFAULT now()
    )`.execute(db);
  await sql`INSERT INTO coffer_replication (id) VALUES (1)`.execute(db);

  // Primary: the secondaries it ships to. The secret is kept only as an HMAC.
  await sql`
    CREATE TABLE coffer_secondaries (
      secondary_id     text        PRIMARY KEY,
      credential_hmac  bytea,
      api_addr         text,
      -- the last WAL position the secondary acknowledged
      acked_lsn        bigint      NOT NULL DEFAULT 0,
      -- 'pending' (token issued), 'bootstrapping', 'streaming', 'revoked'
      status           text        NOT NULL DEFAULT 'pending',
      token_accessor   text,
      version          text,
      last_heartbeat   timestamptz,
      last_error       text,
      created_at       timestamptz NOT NULL DEFAULT now()
    )`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

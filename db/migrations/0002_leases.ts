/**
 * Leases: local to the cluster (invariant 5), like tokens. A lease belongs to the token that
 * created it and dies with it. Expiry is driven by delayed queue jobs, with a periodic sweep
 * of this table as the backstop when Redis loses them.
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  await sql`
    CREATE TABLE coffer_leases (
      lease_id       text COLLATE "C" PRIMARY KEY,
      token_hmac     bytea,
      kind           text        NOT NULL CHECK (kind IN ('auth', 'secret')),
      path           text        NOT NULL,
      issued_at      timestamptz NOT NULL DEFAULT now(),
      last_renewal   timestamptz,
      expires_at     timestamptz,
      ttl_seconds    bigint      NOT NULL DEFAULT 0,
      max_expires_at timestamptz,
      renewable      boolean     NOT NULL DEFAULT true
    )`.execute(db);
  await sql`CREATE INDEX coffer_leases_token ON coffer_leases (token_hmac)`.execute(db);
  await sql`CREATE INDEX coffer_leases_expiry ON coffer_leases (expires_at) WHERE expires_at IS NOT NULL`.execute(db);

  // Response-wrapping tokens' payloads: sealed by the barrier, single use, local.
  await sql`
    CREATE TABLE coffer_wrapped (
      token_hmac    bytea       PRIMARY KEY,
      accessor      text        NOT NULL UNIQUE,
      creation_path text        NOT NULL,
      created_at    timestamptz NOT NULL DEFAULT now(),
      expires_at    timestamptz NOT NULL,
      payload       bytea       NOT NULL
    )`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

/**
 * The first schema. Forward-only: once landed, never edited; later changes get new files.
 *
 * Replicated data lives in coffer_entries and is described, row by row, in coffer_wal.
 * Everything else (seal config, keyring, tokens, leases, node registry) is local to the
 * cluster and never shipped (DESIGN.md invariant 5).
 */
import { Kysely, sql } from 'kysely';

export async function up(db: Kysely<any>): Promise<void> {
  // Replicated storage. `path` sorts bytewise (COLLATE "C") so a prefix LIST is a range scan.
  // `version` is bumped under the row lock on every put and delete, so for one key it orders
  // writes exactly as they committed; a delete keeps the row as a tombstone (value NULL) so the
  // version never goes backwards when a key is re-created (DESIGN.md invariant 2, the xid trap).
  await sql`
    CREATE TABLE coffer_entries (
      path        text COLLATE "C" PRIMARY KEY,
      version     bigint      NOT NULL,
      value       bytea,
      value_hash  bytea,
      updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
    )`.execute(db);

  // The WAL, an outbox written in the same statement as the entry it describes. Writers never
  // serialise: each row gets a plain sequence number (`seq`) and the writing transaction's id
  // (`xid`). The active node later assigns the dense, commit-ordered position (`lsn`) only to rows
  // whose transaction is older than every running one (the xid horizon). No secret is stored:
  // `value_hash` is SHA-256 of the *ciphertext*, `value_size` its length.
  await sql`
    CREATE TABLE coffer_wal (
      seq          bigserial   PRIMARY KEY,
      xid          xid8        NOT NULL DEFAULT pg_current_xact_id(),
      lsn          bigint      UNIQUE,
      path         text COLLATE "C" NOT NULL,
      op           text        NOT NULL CHECK (op IN ('put', 'delete')),
      key_version  bigint      NOT NULL,
      value_hash   bytea,
      value_size   integer     NOT NULL DEFAULT 0,
      written_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
      ordered_at   timestamptz
    )`.execute(db);
  await sql`CREATE INDEX coffer_wal_unordered ON coffer_wal (xid, seq) WHERE lsn IS NULL`.execute(db);
  await sql`CREATE INDEX coffer_wal_path ON coffer_wal (path) WHERE lsn IS NULL`.execute(db);

  // One row: the last dense position handed out. Only the sequencer (the active node) updates it.
  await sql`
    CREATE TABLE coffer_wal_head (
      id        smallint PRIMARY KEY CHECK (id = 1),
      last_lsn  bigint   NOT NULL
    )`.execute(db);
  await sql`INSERT INTO coffer_wal_head (id, last_lsn) VALUES (1, 0)`.execute(db);

  // Local, barrier-encrypted storage that never replicates (token salt, local mounts ...).
  await sql`
    CREATE TABLE coffer_local_entries (
      path        text COLLATE "C" PRIMARY KEY,
      value       bytea       NOT NULL,
      updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
    )`.execute(db);

  // Seal configuration and the keyring sealed under the root key. One row each.
  await sql`
    CREATE TABLE coffer_seal (
      id               smallint PRIMARY KEY CHECK (id = 1),
      seal_type        text     NOT NULL,
      secret_shares    integer  NOT NULL,
      secret_threshold integer  NOT NULL,
      -- root key wrapped by an auto-unseal key (static seal); NULL for Shamir
      wrapped_root_key bytea,
      seal_key_id      text,
      -- the keyring, encrypted with the root key
      keyring          bytea    NOT NULL,
      cluster_id       uuid     NOT NULL,
      cluster_name     text     NOT NULL,
      initialized_at   timestamptz NOT NULL DEFAULT now()
    )`.execute(db);

  // Tokens are stored by salted HMAC of the token, never the token itself.
  await sql`
    CREATE TABLE coffer_tokens (
      token_hmac       bytea       PRIMARY KEY,
      accessor         text        NOT NULL UNIQUE,
      parent_hmac      bytea,
      policies         text[]      NOT NULL,
      token_type       text        NOT NULL DEFAULT 'service',
      display_name     text        NOT NULL DEFAULT '',
      path             text        NOT NULL DEFAULT '',
      meta             jsonb       NOT NULL DEFAULT '{}',
      orphan           boolean     NOT NULL DEFAULT false,
      renewable        boolean     NOT NULL DEFAULT false,
      num_uses         integer     NOT NULL DEFAULT 0,
      ttl_seconds      bigint      NOT NULL DEFAULT 0,
      explicit_max_ttl_seconds bigint NOT NULL DEFAULT 0,
      period_seconds   bigint      NOT NULL DEFAULT 0,
      role             text,
      entity_id        text        NOT NULL DEFAULT '',
      created_at       timestamptz NOT NULL DEFAULT now(),
      expires_at       timestamptz
    )`.execute(db);
  await sql`CREATE INDEX coffer_tokens_parent ON coffer_tokens (parent_hmac)`.execute(db);
  await sql`CREATE INDEX coffer_tokens_expiry ON coffer_tokens (expires_at) WHERE expires_at IS NOT NULL`.execute(db);

  // Server processes of this cluster: who is active, where to reach it (sys/leader).
  await sql`
    CREATE TABLE coffer_nodes (
      node_id       text        PRIMARY KEY,
      api_addr      text        NOT NULL,
      cluster_addr  text        NOT NULL DEFAULT '',
      is_active     boolean     NOT NULL DEFAULT false,
      active_since  timestamptz,
      last_seen     timestamptz NOT NULL DEFAULT now()
    )`.execute(db);

  // Views for DBAs (README: "SQL recipes").
  await sql`
    CREATE VIEW coffer_wal_status AS
    SELECT (SELECT last_lsn FROM coffer_wal_head WHERE id = 1)              AS head_lsn,
           (SELECT min(lsn) FROM coffer_wal WHERE lsn IS NOT NULL)            AS oldest_retained_lsn,
           (SELECT count(*) FROM coffer_wal WHERE lsn IS NULL)                AS unordered_rows,
           (SELECT min(written_at) FROM coffer_wal WHERE lsn IS NULL)         AS oldest_unordered_at,
           (SELECT max(ordered_at) FROM coffer_wal)                           AS last_ordered_at,
           pg_size_pretty(pg_total_relation_size('coffer_wal'))               AS wal_table_size`.execute(db);
  await sql`
    CREATE VIEW coffer_wal_per_minute AS
    SELECT date_trunc('minute', written_at) AS minute,
           count(*)                          AS rows,
           count(*) FILTER (WHERE op = 'put')    AS puts,
           count(*) FILTER (WHERE op = 'delete') AS deletes,
           sum(value_size)                   AS value_bytes
      FROM coffer_wal
     WHERE written_at > now() - interval '1 hour'
     GROUP BY 1
     ORDER BY 1 DESC`.execute(db);
  await sql`
    CREATE VIEW coffer_wal_log AS
    SELECT lsn, path, op, key_version, encode(value_hash, 'hex') AS value_sha256, value_size,
           written_at, ordered_at
      FROM coffer_wal
     WHERE lsn IS NOT NULL
     ORDER BY lsn`.execute(db);
}

export async function down(): Promise<void> {
  throw new Error('migrations are forward-only');
}

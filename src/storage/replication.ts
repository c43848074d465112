/**
 * Replication storage: what the primary ships, how a secondary applies it, the bootstrap
 * copy, and both sides' local replication state. Hot statements kept here as text.
 *
 * Apply is "newer version wins" per key (DESIGN.md invariant 2's fix, and what makes apply
 * idempotent and order-free per key); a batch applies only if it starts right after the
 * secondary's applied position, in one transaction that also advances it (invariant 3).
 */
import { sql, type Kysely } from 'kysely';
import { preparedQuery } from './db';
import { WAL_POSITIONS, walTransaction, type CommittedRows } from './entries';
import type { DB } from './schema';

export interface ShippedEntry {
  path: string;
  version: number;
  /** Ciphertext, or null for a tombstone. */
  value: Buffer | null;
}

export interface Batch {
  fromLsn: number;
  toLsn: number;
  entries: ShippedEntry[];
}

/**
 * The CTEs `w` and `k` of a batch read: the WAL rows after `after` (an SQL expression), at most
 * `maxRows` of them, cut where their running size passes `maxBytes` (the first row always goes,
 * however large). The three are SQL text (parameters of the prepared statements below).
 */
const batchCtes = (after: string, maxRows: string, maxBytes: string) => `
  w AS (
    SELECT lsn, path, sum(value_size) OVER (ORDER BY lsn) AS upto, row_number() OVER (ORDER BY lsn) AS n
      FROM (SELECT lsn, path, value_size FROM coffer_wal WHERE lsn > ${after} ORDER BY lsn LIMIT ${maxRows}) t
  ), k AS (
    SELECT lsn, path FROM w WHERE n = 1 OR upto <= ${maxBytes}
  )`;

interface BatchRow {
  to_lsn: number | null;
  e_path: string | null;
  e_version: number | null;
  e_value: Buffer | null;
}

function toBatch(afterLsn: number, rows: BatchRow[]): Batch | null {
  if (rows.length === 0 || rows[0].to_lsn === null) return null;
  const entries = rows.filter((e) => e.e_path !== null).map((e) => ({ path: e.e_path!, version: Number(e.e_version), value: e.e_value }));
  return { fromLsn: afterLsn + 1, toLsn: Number(rows[0].to_lsn), entries };
}

/**
 * The next batch after `afterLsn`: the WAL rows' keys with their *current* values (a later
 * version than the row's is fine — apply keeps the newest). Bounded by rows and bytes; null
 * when there is nothing new. One statement.
 */
const READ_BATCH = `
  WITH ${batchCtes('$1::bigint', '$2::int', '$3::bigint')}
  SELECT b.to_lsn, e.path AS e_path, e.version AS e_version, e.value AS e_value
    FROM (SELECT max(lsn) AS to_lsn FROM k) b
    LEFT JOIN coffer_entries e ON e.path IN (SELECT path FROM k)`;

export async function readBatch(db: Kysely<DB>, afterLsn: number, maxRows: number, maxBytes: number): Promise<Batch | null> {
  return toBatch(afterLsn, await preparedQuery<BatchRow>(db, 'coffer_read_batch', READ_BATCH, [afterLsn, maxRows, maxBytes]));
}

/** What one shipping step needs to know. */
export interface ShipState {
  secondary: SecondaryRow | null;
  /** Oldest WAL position still retained (null: none retained). */
  oldestLsn: number | null;
  headLsn: number;
  mode: string;
  epoch: number;
  supersededByEpoch: number | null;
}

/**
 * One shipping step in ONE statement: record that the secondary applied everything up to
 * `ack` (the batch sent last; null: nothing to record) — the cursor moves with GREATEST, never
 * back — then read its cursor, the retained WAL's bounds, the head and this cluster's role,
 * and the next batch after the cursor (maxRows 0: no batch). The caller decides from the state
 * whether to send the batch; reading it when it will not is cheap and rare.
 */
const SHIP_STEP = `
  WITH a AS (
    UPDATE coffer_secondaries SET acked_lsn = GREATEST(acked_lsn, $1::bigint), last_heartbeat = now(), last_error = NULL
     WHERE secondary_id = $2::text AND $1::bigint IS NOT NULL
    RETURNING acked_lsn
  ), st AS (
    SELECT r.mode, r.epoch, r.superseded_by_epoch,
           (SELECT min(lsn) FROM coffer_wal WHERE lsn IS NOT NULL) AS oldest,
           (SELECT last_lsn FROM coffer_wal_head WHERE id = 1) AS head,
           s.secondary_id, s.credential_hmac, s.api_addr, coalesce((SELECT acked_lsn FROM a), s.acked_lsn) AS acked_lsn,
           s.status, s.version, s.last_heartbeat, s.last_error
      FROM coffer_replication r LEFT JOIN coffer_secondaries s ON s.secondary_id = $2::text
     WHERE r.id = 1
  ), ${batchCtes('(SELECT acked_lsn FROM st)', '$3::int', '$4::bigint')}
  SELECT st.*, b.to_lsn, x.n AS e_count, x.bytes AS e_bytes, x.json AS e_json
    FROM st
   CROSS JOIN (SELECT max(lsn) AS to_lsn FROM k) b
   CROSS JOIN LATERAL (
     SELECT count(*)::int AS n, coalesce(sum(octet_length(e.value)), 0)::bigint AS bytes,
            coalesce(json_agg(json_build_object('path', e.path, 'version', e.version,
                                                'value', translate(encode(e.value, 'base64'), E'\n', '')))::text, '[]') AS json
       FROM coffer_entries e WHERE e.path IN (SELECT path FROM k)) x`;

/**
 * A batch as shipStep reads it: bounds, size, and the entries as the wire's JSON text (path,
 * version, base64 ciphertext or null), built by Postgres — the primary's event loop passes it
 * through without parsing a row per entry or re-encoding ciphertexts (it serves writes too).
 */
export interface ShipBatch {
  fromLsn: number;
  toLsn: number;
  count: number;
  /** Ciphertext bytes. */
  bytes: number;
  entriesJson: string;
}

export async function shipStep(db: Kysely<DB>, secondaryId: string, ack: number | null, maxRows: number, maxBytes: number): Promise<{ state: ShipState; batch: ShipBatch | null }> {
  // A prepared statement: planning it cost ~0.7 ms a step, as much as a third of running it.
  const rows = await preparedQuery<any>(db, 'coffer_ship_step', SHIP_STEP, [ack, secondaryId, maxRows, maxBytes]);
  const r = rows[0];
  const state: ShipState = {
    secondary: r.secondary_id === null ? null : toSecondary(r),
    oldestLsn: r.oldest === null ? null : Number(r.oldest),
    headLsn: Number(r.head),
    mode: r.mode,
    epoch: Number(r.epoch),
    supersededByEpoch: r.superseded_by_epoch === null ? null : Number(r.superseded_by_epoch),
  };
  const batch: ShipBatch | null =
    state.secondary && r.to_lsn !== null
      ? { fromLsn: state.secondary.ackedLsn + 1, toLsn: Number(r.to_lsn), count: r.e_count, bytes: Number(r.e_bytes), entriesJson: r.e_json }
      : null;
  return { state, batch };
}

/**
 * Writes shipped entries with their versions, and a WAL row for each one that changed, in one
 * statement. `newer`: only where the shipped version is newer (streaming apply: idempotent,
 * order-free per key). `differs`: wherever version or value differ (merkle-sync: the primary is
 * the truth). Postgres hashes the ciphertext, not the event loop: a batch can hold thousands.
 */
const UPSERT_SHIPPED = (paths: string[], versions: number[], values: (Buffer | null)[], when: 'newer' | 'differs') => sql<{ seq: number }>`
  WITH x AS (
    SELECT p, v, val, sha256(val) AS h FROM unnest(${paths}::text[], ${versions}::bigint[], ${values}::bytea[]) AS t(p, v, val)
  ), ${sql.raw(writeShipped(when, 'in-transaction'))}
  SELECT seq FROM w`;

/**
 * The CTEs `e` (entries) and `w` (their WAL rows) that write what CTE `x` (p, v, val, h) holds.
 * `numbered`: the statement is the whole write, and numbers its WAL rows itself; in-transaction:
 * the rows are numbered by the transaction's stampWal before COMMIT (see entries.ts).
 */
function writeShipped(when: 'newer' | 'differs', positions: 'numbered' | 'in-transaction'): string {
  const entries = `e AS (
    INSERT INTO coffer_entries AS cur (path, version, value, value_hash, updated_at)
    SELECT p, v, val, h, clock_timestamp() FROM x
    ON CONFLICT (path) DO UPDATE
       SET version = EXCLUDED.version, value = EXCLUDED.value,
           value_hash = EXCLUDED.value_hash, updated_at = EXCLUDED.updated_at
     WHERE ${when === 'newer' ? 'cur.version < EXCLUDED.version' : 'cur.version IS DISTINCT FROM EXCLUDED.version OR cur.value_hash IS DISTINCT FROM EXCLUDED.value_hash'}
    RETURNING path, version, value, value_hash
  )`;
  const row = `path, CASE WHEN value IS NULL THEN 'delete' ELSE 'put' END, version, value_hash, coalesce(octet_length(value), 0)`;
  if (positions === 'in-transaction') {
    return `${entries}, w AS (
    INSERT INTO coffer_wal (path, op, key_version, value_hash, value_size)
    SELECT ${row} FROM e
    RETURNING seq
  )`;
  }
  return `${entries}, ${WAL_POSITIONS('e')}, w AS (
    INSERT INTO coffer_wal (path, op, key_version, value_hash, value_size, lsn, ordered_at)
    SELECT ${row}, (SELECT base FROM hd) + row_number() OVER (ORDER BY path), clock_timestamp() FROM e
    RETURNING seq, lsn, path, op, value_hash
  )`;
}

/** A secondary applies shipped WAL only in these states (not while bootstrapping or reconciling). */
const APPLYING_STATES = new Set(['stream-wals', 'idle']);

const SYNC_PURGE = (paths: string[]) => sql<{ seq: number }>`
  WITH d AS (DELETE FROM coffer_entries WHERE path = ANY(${paths}::text[]) RETURNING path, version)
  INSERT INTO coffer_wal (path, op, key_version)
  SELECT path, 'delete', version + 1 FROM d
  RETURNING seq`;

/**
 * merkle-sync on a secondary: makes the given keys exactly what the primary holds — its
 * version and ciphertext (or tombstone) — and removes keys the primary has no row for. The
 * primary is the truth here, so this is not "newer version wins". Refused unless this cluster
 * is a secondary in merkle-sync (invariant 7: only replication writes replicated data here).
 */
export async function divergenceReport(db: Kysely<DB>, limit = 1000) {
  return db.selectFrom('coffer_divergence').selectAll().orderBy('id', 'desc').limit(limit).execute();
}

export async function syncEntries(db: Kysely<DB>, entries: ShippedEntry[], purgePaths: string[]): Promise<number> {
  const { result } = await walTransaction(db, async (tx) => {
    const { rows } = await sql<{ mode: string; state: string }>`SELECT mode, state FROM coffer_replication WHERE id = 1 FOR UPDATE`.execute(tx);
    if (rows[0].mode !== 'secondary' || rows[0].state !== 'merkle-sync') throw new Error(`merkle-sync refused: cluster is ${rows[0].mode} in state ${rows[0].state}`);
    let changed = 0;
    // Before overwriting: keep a record of every live value here that the primary does not
    // have — same or newer version with another value, or a key it has no row for.
    const epoch = Number((await sql<{ epoch: number }>`SELECT epoch FROM coffer_replication WHERE id = 1`.execute(tx)).rows[0].epoch);
    if (entries.length) {
      await sql`
        INSERT INTO coffer_divergence (path, local_version, local_value_sha256, primary_version, action, epoch)
        SELECT c.path, c.version, c.value_hash, x.v, CASE WHEN x.h IS NULL THEN 'deleted' ELSE 'overwritten' END, ${epoch}
          FROM coffer_entries c
          JOIN (SELECT p, v, sha256(val) AS h FROM unnest(${entries.map((e) => e.path)}::text[], ${entries.map((e) => e.version)}::bigint[],
                      ${entries.map((e) => e.value)}::bytea[]) AS t(p, v, val)) AS x ON c.path = x.p
         WHERE c.value IS NOT NULL AND c.version >= x.v AND c.value_hash IS DISTINCT FROM x.h`.execute(tx);
    }
    if (purgePaths.length) {
      await sql`
        INSERT INTO coffer_divergence (path, local_version, local_value_sha256, primary_version, action, epoch)
        SELECT path, version, value_hash, NULL, 'purged', ${epoch} FROM coffer_entries
         WHERE path = ANY(${purgePaths}::text[]) AND value IS NOT NULL`.execute(tx);
    }
    if (entries.length) {
      const r = await UPSERT_SHIPPED(
        entries.map((e) => e.path),
        entries.map((e) => e.version),
        entries.map((e) => e.value),
        'differs',
      ).execute(tx);
      changed += r.rows.length;
    }
    if (purgePaths.length) changed += (await SYNC_PURGE(purgePaths).execute(tx)).rows.length;
    return changed;
  });
  return result;
}

export type ApplyOutcome = { applied: true; appliedLsn: number; changed: number; committed: CommittedRows | null } | { applied: false; appliedLsn: number; reason: string };

/**
 * Applies a shipped batch exactly once, in order (invariant 3), in ONE statement (so one
 * commit and one round trip). `adv` moves the applied position only if the batch starts right
 * after it and this cluster is a streaming secondary — a WHERE that Postgres re-checks on the
 * newest row version under the row lock, so of two deliveries of one batch racing, the second
 * waits for the first and then finds the position moved. The entries (newer version wins,
 * with a WAL row for each that changed) are written only through `adv`, so a refused batch
 * writes nothing. `epoch` (the sender's; 0: none) is learnt in the same update, or, for a
 * refused batch, by a second statement; a batch from an epoch older than the one this
 * secondary follows is refused (a superseded primary's, racing the route's epoch guard).
 */
const APPLY_BATCH = `
  WITH adv AS (
    UPDATE coffer_replication
       SET applied_lsn = $2, epoch = GREATEST(epoch, $3), last_heartbeat = now(), updated_at = now(), last_error = NULL
     WHERE id = 1 AND mode = 'secondary' AND state IN ('stream-wals', 'idle') AND applied_lsn = $1::bigint - 1
       AND ($3::bigint = 0 OR epoch <= $3::bigint)
    RETURNING 1),
  x AS (
    SELECT p, v, val, sha256(val) AS h FROM unnest($4::text[], $5::bigint[], $6::bytea[]) AS t(p, v, val)
     WHERE EXISTS (SELECT 1 FROM adv)),
  ${writeShipped('newer', 'numbered')}
  SELECT (SELECT count(*) FROM adv)::int AS applied, (SELECT count(*) FROM w)::int AS changed, r.applied_lsn, r.mode, r.state, r.epoch,
         (SELECT resets FROM hd) AS resets,
         (SELECT json_agg(json_build_object('lsn', lsn, 'path', path, 'op', op, 'sp', coffer_key_subpage(path), 'h', encode(value_hash, 'base64')) ORDER BY lsn) FROM w) AS wal
    FROM coffer_replication r WHERE r.id = 1`;

export async function applyBatch(db: Kysely<DB>, batch: Batch, epoch = 0): Promise<ApplyOutcome> {
  const newest = new Map<string, ShippedEntry>();
  for (const e of batch.entries) if ((newest.get(e.path)?.version ?? -1) < e.version) newest.set(e.path, e);
  const list = [...newest.values()];
  const [r] = await preparedQuery<{
    applied: number;
    changed: number;
    applied_lsn: number;
    mode: string;
    state: string;
    epoch: number;
    resets: string | null;
    wal: { lsn: number; path: string; op: 'put' | 'delete'; sp: number; h: string | null }[] | null;
  }>(db, 'coffer_apply_batch', APPLY_BATCH, [
    batch.fromLsn,
    batch.toLsn,
    epoch,
    list.map((e) => e.path),
    list.map((e) => e.version),
    list.map((e) => e.value),
  ]);
  if (r.applied === 1) {
    const records = (r.wal ?? []).map((w) => ({ lsn: Number(w.lsn), path: w.path, op: w.op, sp: w.sp, valueHash: w.h === null ? null : Buffer.from(w.h, 'base64') }));
    return { applied: true, appliedLsn: batch.toLsn, changed: r.changed, committed: records.length ? { resets: Number(r.resets), records } : null };
  }
  if (epoch > 0) await sql`UPDATE coffer_replication SET epoch = ${epoch} WHERE id = 1 AND epoch < ${epoch}`.execute(db);
  // What the statement's snapshot saw (a concurrent delivery of this batch may have moved it since).
  const applied = Number(r.applied_lsn);
  if (r.mode !== 'secondary') return { applied: false, appliedLsn: applied, reason: 'not a secondary' };
  if (!APPLYING_STATES.has(r.state)) return { applied: false, appliedLsn: applied, reason: `secondary is ${r.state}` };
  // The route's epoch guard answers 409 first; this catches a newer primary's batch that
  // raised the epoch between that guard and this statement.
  if (epoch > 0 && Number(r.epoch) > epoch) return { applied: false, appliedLsn: applied, reason: `superseded: this secondary follows epoch ${r.epoch}, the batch is from epoch ${epoch}` };
  return { applied: false, appliedLsn: applied, reason: `batch starts at ${batch.fromLsn}, expected ${applied + 1}` };
}


/** Secondary enable: every replicated entry and this cluster's WAL go (Vault wipes too). */
export async function wipeReplicated(db: Kysely<DB>): Promise<void> {
  await db.transaction().execute(async (tx) => {
    await sql`TRUNCATE coffer_entries, coffer_wal, coffer_merkle_pages, coffer_merkle_checkpoint`.execute(tx);
    await sql`UPDATE coffer_wal_head SET last_lsn = 0, resets = resets + 1 WHERE id = 1`.execute(tx);
    await sql`ALTER SEQUENCE coffer_wal_seq_seq RESTART`.execute(tx);
  });
}

export interface ReplicationRow {
  mode: 'disabled' | 'primary' | 'secondary';
  setId: string | null;
  secondaryId: string | null;
  primaryApiAddr: string | null;
  credential: Buffer | null;
  state: string;
  appliedLsn: number;
  bootstrapLsn: number | null;
  bootstrapAfter: string | null;
  syncLsn: number | null;
  syncProgress: number;
  syncTotalKeys: number;
  lastReindexAt: Date | null;
  epoch: number;
  supersededByEpoch: number | null;
  primaryHeadLsn: number | null;
  primaryContactAt: Date | null;
  lastHeartbeat: Date | null;
  lastError: string | null;
}

export async function readReplication(db: Kysely<DB>): Promise<ReplicationRow> {
  const r = await db.selectFrom('coffer_replication').selectAll().where('id', '=', 1).executeTakeFirstOrThrow();
  return {
    mode: r.mode,
    setId: r.set_id,
    secondaryId: r.secondary_id,
    primaryApiAddr: r.primary_api_addr,
    credential: r.credential,
    state: r.state,
    appliedLsn: Number(r.applied_lsn),
    bootstrapLsn: r.bootstrap_lsn === null ? null : Number(r.bootstrap_lsn),
    bootstrapAfter: r.bootstrap_after,
    syncLsn: r.sync_lsn === null ? null : Number(r.sync_lsn),
    syncProgress: Number(r.sync_progress),
    syncTotalKeys: Number(r.sync_total_keys),
    lastReindexAt: r.last_reindex_at,
    epoch: Number(r.epoch),
    supersededByEpoch: r.superseded_by_epoch === null ? null : Number(r.superseded_by_epoch),
    primaryHeadLsn: r.primary_head_lsn === null ? null : Number(r.primary_head_lsn),
    primaryContactAt: r.primary_contact_at,
    lastHeartbeat: r.last_heartbeat,
    lastError: r.last_error,
  };
}

export async function updateReplication(
  db: Kysely<DB>,
  patch: Partial<{
    mode: ReplicationRow['mode'];
    set_id: string | null;
    secondary_id: string | null;
    primary_api_addr: string | null;
    credential: Buffer | null;
    state: string;
    applied_lsn: number;
    bootstrap_lsn: number | null;
    bootstrap_after: string | null;
    last_heartbeat: Date | null;
    last_error: string | null;
    sync_lsn: number | null;
    sync_progress: number;
    sync_total_keys: number;
    last_reindex_at: Date | null;
    epoch: number;
    superseded_by_epoch: number | null;
    primary_head_lsn: number | null;
    primary_contact_at: Date | null;
  }>,
): Promise<void> {
  const update = (q: Kysely<DB>) => q.updateTable('coffer_replication').set({ ...patch, updated_at: new Date() }).where('id', '=', 1).execute();
  if (!('mode' in patch) && !('superseded_by_epoch' in patch)) {
    await update(db);
    return;
  }
  // A change of who may write: taken with the role guard's lock held exclusively (migration
  // 0010), it waits for client writes in flight, and those after it see it.
  await db.transaction().execute(async (tx) => {
    await sql`SELECT pg_advisory_xact_lock(${ROLE_LOCK[0]}::int, ${ROLE_LOCK[1]}::int)`.execute(tx);
    await update(tx);
  });
}

/** The role guard's advisory lock (migration 0010's coffer_writable()): classid 'coff', objid 'role'. */
const ROLE_LOCK = [0x636f6666, 0x726f6c65] as const;

export interface SecondaryRow {
  secondaryId: string;
  credentialHmac: Buffer | null;
  apiAddr: string | null;
  ackedLsn: number;
  status: string;
  version: string | null;
  lastHeartbeat: Date | null;
  lastError: string | null;
}

function toSecondary(r: any): SecondaryRow {
  return {
    secondaryId: r.secondary_id,
    credentialHmac: r.credential_hmac,
    apiAddr: r.api_addr,
    ackedLsn: Number(r.acked_lsn),
    status: r.status,
    version: r.version,
    lastHeartbeat: r.last_heartbeat,
    lastError: r.last_error,
  };
}

export const secondaries = {
  async list(db: Kysely<DB>): Promise<SecondaryRow[]> {
    return (await db.selectFrom('coffer_secondaries').selectAll().orderBy('secondary_id').execute()).map(toSecondary);
  },
  async get(db: Kysely<DB>, id: string): Promise<SecondaryRow | null> {
    const r = await db.selectFrom('coffer_secondaries').selectAll().where('secondary_id', '=', id).executeTakeFirst();
    return r ? toSecondary(r) : null;
  },
  /** Creates or re-issues a secondary's credential (a new token for an id starts over). */
  async upsert(db: Kysely<DB>, id: string, credentialHmac: Buffer): Promise<void> {
    await db
      .insertInto('coffer_secondaries')
      .values({ secondary_id: id, credential_hmac: credentialHmac, status: 'pending' })
      .onConflict((oc) => oc.column('secondary_id').doUpdateSet({ credential_hmac: credentialHmac, status: 'pending', acked_lsn: 0, api_addr: null, last_error: null }))
      .execute();
  },
  async update(
    db: Kysely<DB>,
    id: string,
    patch: Partial<{ api_addr: string | null; status: string; version: string | null; last_heartbeat: Date | null; last_error: string | null; acked_lsn: number }>,
  ): Promise<void> {
    // Nothing but an explicit revoke touches a revoked secondary (a heartbeat racing the
    // revoke must not bring it back).
    await db
      .updateTable('coffer_secondaries')
      .set(patch)
      .where('secondary_id', '=', id)
      .$if(patch.status !== 'revoked', (q) => q.where('status', '<>', 'revoked'))
      .execute();
  },
  /** Moves the acknowledged cursor forward only (a late or repeated ack never moves it back). */
  async ack(db: Kysely<DB>, id: string, lsn: number): Promise<void> {
    await sql`UPDATE coffer_secondaries SET acked_lsn = GREATEST(acked_lsn, ${lsn}), last_heartbeat = now(), last_error = NULL WHERE secondary_id = ${id}`.execute(db);
  },
  /** Sets the cursor to what the secondary reports it has applied (after a rejected batch). */
  async resync(db: Kysely<DB>, id: string, lsn: number): Promise<void> {
    await sql`UPDATE coffer_secondaries SET acked_lsn = ${lsn}, last_heartbeat = now() WHERE secondary_id = ${id}`.execute(db);
  },
  async deleteAll(db: Kysely<DB>): Promise<void> {
    await db.deleteFrom('coffer_secondaries').execute();
  },
};

/** Serialises shipping to one secondary across every worker process (one batch in flight). */
export async function withShipLock<T>(db: Kysely<DB>, secondaryId: string, fn: () => Promise<T>): Promise<T | null> {
  return db.connection().execute(async (conn) => {
    const key = `coffer-ship:${secondaryId}`;
    const { rows } = await sql<{ ok: boolean }>`SELECT pg_try_advisory_lock(hashtextextended(${key}, 0)) AS ok`.execute(conn);
    if (!rows[0].ok) return null;
    try {
      return await fn();
    } finally {
      await sql`SELECT pg_advisory_unlock(hashtextextended(${key}, 0))`.execute(conn);
    }
  });
}


/** Replication figures for metrics. */
export async function replicationGauges(db: Kysely<DB>) {
  const { rows } = await sql<{ applied: number; lag: number | null; known: number }>`
    SELECT (SELECT applied_lsn FROM coffer_replication WHERE id = 1) AS applied,
           (SELECT max((SELECT last_lsn FROM coffer_wal_head WHERE id = 1) - acked_lsn) FROM coffer_secondaries WHERE status <> 'revoked') AS lag,
           (SELECT count(*)::int FROM coffer_secondaries WHERE status <> 'revoked') AS known`.execute(db);
  return { lastRemoteWal: Number(rows[0].applied), maxSecondaryLagWal: Number(rows[0].lag ?? 0), knownSecondaries: Number(rows[0].known) };
}

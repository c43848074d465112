/** Store (src/core/ports.ts) on Postgres through kysely. */
import { sql, type Kysely, type Transaction } from 'kysely';
import pg from 'pg';
import type { AuthRead, CasWrite, LeaseRecord, LeaseRepo, ReadPlan, SealRecord, Store, StoreTx, TokenRecord, TokenRepo, Versioned, WrapRepo, WrappedRecord, WritePlan } from '../core/ports';
import { casWriteBatch, deleteEntry, getEntries, getVersionedMany, getEntry, getWithLast, listChildren, prefixEnd, putEntries, putEntry, positionOf, ReplicaReadOnly, StaleKeyTerm, type CommittedRows } from './entries';
import { KeyringStale, MustForward } from '../core/errors';
import { termOf } from '../core/keyring';
import { deleteLocal, getLocal, putLocal } from './local';
import { HOT_CONNECTIONS, preparedQuery } from './db';
import type { DB } from './schema';

/** A transaction's storage; `seqs` collects the WAL rows it wrote (numbered at its COMMIT). */
function txStore(tx: Transaction<DB>, seqs: number[]): StoreTx {
  return {
    get: async (path) => {
      const row = await tx.selectFrom('coffer_entries').select('value').where('path', '=', path).executeTakeFirst();
      return row?.value ?? null;
    },
    getMany: (paths) => getEntries(tx, paths),
    list: (prefix) => listChildren(tx, 'coffer_entries', prefix),
    put: async (path, value) => {
      seqs.push((await putEntry(tx, path, value, termOf(value))).seq);
    },
    putMany: async (entries) => {
      seqs.push(...(await putEntries(tx, entries, Math.min(...entries.map(([, v]) => termOf(v))))));
    },
    delete: async (path) => {
      const row = await deleteEntry(tx, path);
      if (row) seqs.push(row.seq);
      return row !== null;
    },
    lock: async (key) => {
      await sql`SELECT pg_advisory_xact_lock(hashtextextended(${key}, 0))`.execute(tx);
    },
    getLocal: (path) => getLocal(tx, path),
    putLocal: (path, value) => putLocal(tx, path, value, termOf(value)),
    deleteLocal: (path) => deleteLocal(tx, path),
    listLocal: (prefix) => listChildren(tx, 'coffer_local_entries', prefix),
  };
}


function toToken(r: any): TokenRecord {
  return {
    hmac: r.token_hmac,
    accessor: r.accessor,
    parentHmac: r.parent_hmac,
    policies: r.policies,
    tokenType: r.token_type,
    displayName: r.display_name,
    path: r.path,
    meta: r.meta ?? {},
    orphan: r.orphan,
    renewable: r.renewable,
    numUses: r.num_uses,
    ttlSeconds: Number(r.ttl_seconds),
    explicitMaxTtlSeconds: Number(r.explicit_max_ttl_seconds),
    periodSeconds: Number(r.period_seconds),
    role: r.role,
    entityId: r.entity_id,
    createdAt: r.created_at,
    expiresAt: r.expires_at,
  };
}

const parseBytea = pg.types.getTypeParser(pg.types.builtins.BYTEA, 'text') as (text: string) => Buffer;

/** A coffer_tokens row as Postgres renders it in JSON (bytea as in text output, timestamps in ISO 8601). */
function tokenFromJson(j: any): TokenRecord {
  const bytes = (text: string | null) => (text === null ? null : parseBytea(text));
  return toToken({
    ...j,
    token_hmac: bytes(j.token_hmac),
    parent_hmac: bytes(j.parent_hmac),
    created_at: new Date(j.created_at),
    expires_at: j.expires_at === null ? null : new Date(j.expires_at),
  });
}

function tokenRepo(db: Kysely<DB>): TokenRepo {
  const t = () => db.selectFrom('coffer_tokens').selectAll();
  return {
    async insert(rec) {
      await db
        .insertInto('coffer_tokens')
        .values({
          token_hmac: rec.hmac,
          accessor: rec.accessor,
          parent_hmac: rec.parentHmac,
          policies: rec.policies,
          token_type: rec.tokenType,
          display_name: rec.displayName,
          path: rec.path,
          meta: JSON.stringify(rec.meta),
          orphan: rec.orphan,
          renewable: rec.renewable,
          num_uses: rec.numUses,
          ttl_seconds: rec.ttlSeconds,
          explicit_max_ttl_seconds: rec.explicitMaxTtlSeconds,
          period_seconds: rec.periodSeconds,
          role: rec.role,
          entity_id: rec.entityId,
          created_at: rec.createdAt,
          expires_at: rec.expiresAt,
        })
        .execute();
    },
    byHmac: async (h) => {
      const r = await t().where('token_hmac', '=', h).executeTakeFirst();
      return r ? toToken(r) : null;
    },
    byAccessor: async (a) => {
      const r = await t().where('accessor', '=', a).executeTakeFirst();
      return r ? toToken(r) : null;
    },
    children: async (h) => (await t().where('parent_hmac', '=', h).execute()).map(toToken),
    delete: async (h) => {
      const r = await db.deleteFrom('coffer_tokens').where('token_hmac', '=', h).executeTakeFirst();
      return Number(r.numDeletedRows) > 0;
    },
    use: async (h) => {
      // 1 → -1, not 0: 0 means unlimited (see TokenStore.use).
      const r = await db
        .updateTable('coffer_tokens')
        .set({ num_uses: sql`CASE WHEN num_uses = 1 THEN -1 ELSE num_uses - 1 END` })
        .where('token_hmac', '=', h)
        .where('num_uses', '>', 0)
        .returning('num_uses')
        .executeTakeFirst();
      return r ? Math.max(0, r.num_uses) : null;
    },
    update: async (h, patch) => {
      await db
        .updateTable('coffer_tokens')
        .set({
          ...(patch.expiresAt !== undefined ? { expires_at: patch.expiresAt } : {}),
          ...(patch.ttlSeconds !== undefined ? { ttl_seconds: patch.ttlSeconds } : {}),
        })
        .where('token_hmac', '=', h)
        .execute();
    },
    expired: async (now, limit) =>
      (
        await db
          .selectFrom('coffer_tokens')
          .select('token_hmac')
          .where('expires_at', '<=', now)
          .orderBy('expires_at')
          .limit(limit)
          .execute()
      ).map((r) => r.token_hmac),
    accessors: async () =>
      (await db.selectFrom('coffer_tokens').select('accessor').where('token_type', '=', 'service').orderBy('accessor').execute()).map((r) => r.accessor),
    orphanChildren: async (h) => {
      await db.updateTable('coffer_tokens').set({ parent_hmac: null, orphan: true }).where('parent_hmac', '=', h).execute();
    },
    withMissingParent: async (limit) =>
      (
        await db
          .selectFrom('coffer_tokens as t')
          .select('t.token_hmac')
          .where('t.parent_hmac', 'is not', null)
          .where(({ not, exists, selectFrom }) =>
            not(exists(selectFrom('coffer_tokens as p').select('p.token_hmac').whereRef('p.token_hmac', '=', 't.parent_hmac'))),
          )
          .limit(limit)
          .execute()
      ).map((r) => r.token_hmac),
    usedUp: async (limit) =>
      (await db.selectFrom('coffer_tokens').select('token_hmac').where('num_uses', '<', 0).limit(limit).execute()).map((r) => r.token_hmac),
    leaseIdsOfMissingTokens: async (limit) =>
      (
        await db
          .selectFrom('coffer_leases as l')
          .select('l.lease_id')
          .where('l.token_hmac', 'is not', null)
          .where(({ not, exists, selectFrom }) =>
            not(exists(selectFrom('coffer_tokens as t').select('t.token_hmac').whereRef('t.token_hmac', '=', 'l.token_hmac'))),
          )
          .orderBy('l.lease_id')
          .limit(limit)
          .execute()
      ).map((r) => r.lease_id),
  };
}

/**
 * The hot path of every authenticated request, as one statement: the token row, its policies'
 * stored entries and, for a read, the entry and the newest live entry under a prefix
 * (getWithLast's two lookups). Entries are only looked up for an existing token. The token
 * row comes as one JSON column (the driver's per-column work is a good part of a query's cost
 * to this process), which also keeps the prepared statement's result shape fixed whatever
 * columns a migration adds.
 *
 * It serves a batch of requests at once: $1..$4 are arrays (token HMAC; path, prefix and end of
 * the prefix range, null for no read); $5, $6 list the write plans' paths (request position,
 * path), whose entries come back with their row versions; each answer row carries its request's position `i`
 * (1-based; no row: no such token). It runs with a generic plan (see preparedQuery), so every
 * lookup is written as a lateral, parameterised one (the token's `LIMIT 1` keeps it an index
 * probe however many tokens the planner's statistics count).
 */
const AUTH_READ = `
  SELECT q.i, to_json(t) AS token,
         p.wanted AS policy_wanted, p.paths AS policy_paths, p.vals AS policy_values,
         e.value AS read_value, l.path AS last_path, l.value AS last_value,
         vr.vals AS versioned_values, vr.vers AS versioned_versions,
         coffer_read_only() AS replica_read_only
    FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS q(hmac, path, prefix, prefix_end, i)
   CROSS JOIN LATERAL (SELECT * FROM coffer_tokens WHERE token_hmac = q.hmac LIMIT 1) AS t
   CROSS JOIN LATERAL (
         SELECT array_agg(n.path) AS wanted,
                array_agg(c.path) FILTER (WHERE c.value IS NOT NULL) AS paths,
                array_agg(c.value) FILTER (WHERE c.value IS NOT NULL) AS vals
           FROM (SELECT ('core/policies/acl/' || lower(btrim(x))) COLLATE "C" AS path
                   FROM unnest(t.policies) AS x
                  WHERE lower(btrim(x)) NOT IN ('root', 'response-wrapping')) AS n
           LEFT JOIN coffer_entries c ON c.path = n.path) AS p
    LEFT JOIN LATERAL (
         SELECT value FROM coffer_entries WHERE path = q.path COLLATE "C" AND value IS NOT NULL) AS e ON true
    LEFT JOIN LATERAL (
         SELECT path, value FROM coffer_entries
          WHERE path >= q.prefix COLLATE "C" AND path < q.prefix_end COLLATE "C" AND value IS NOT NULL
          ORDER BY path DESC LIMIT 1) AS l ON true
    LEFT JOIN LATERAL (
         SELECT array_agg(c.value ORDER BY v.n) AS vals, array_agg(coalesce(c.version, 0) ORDER BY v.n) AS vers
           FROM unnest($5::int[], $6::text[]) WITH ORDINALITY AS v(i, path, n)
           LEFT JOIN coffer_entries c ON c.path = v.path COLLATE "C"
          WHERE v.i = q.i) AS vr ON true`;

interface Pending<I, O> {
  item: I;
  keys: string[];
  resolve(r: O): void;
  reject(err: unknown): void;
}

/**
 * Coalesces concurrent calls into one statement: calls that arrive while `maxInFlight` batches
 * are out (or in the same turn of the event loop) go together in the next one, so under load
 * one round trip — and for writes one commit — serves many requests, and an idle server adds
 * no wait beyond that turn. A read still sees a snapshot taken after it arrived (the statement
 * starts later), so what it sees is what it would have seen alone.
 *
 * `keys`: a call whose keys meet those of a call already in the batch, or of a batch in flight,
 * waits for a later batch (in arrival order among its peers): a statement may change a row once,
 * and two statements in flight never wait on each other's rows (no deadlock between batches).
 */
class Batcher<I, O> {
  private queue: Pending<I, O>[] = [];
  private inFlight = 0;
  private scheduled = false;
  private readonly busy = new Set<string>();

  constructor(
    private readonly run: (items: I[]) => Promise<O[]>,
    /** Batches out at once (at most the connections of the pool they run on). */
    private readonly maxInFlight: number,
    private readonly maxBatch = 64,
    private readonly keys: (item: I) => string[] = () => [],
  ) {}

  submit(item: I): Promise<O> {
    return new Promise((resolve, reject) => {
      this.queue.push({ item, keys: this.keys(item), resolve, reject });
      this.schedule();
    });
  }

  private schedule(): void {
    if (this.scheduled || this.inFlight >= this.maxInFlight || this.queue.length === 0) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.send();
    });
  }

  private take(): Pending<I, O>[] {
    const batch: Pending<I, O>[] = [];
    const rest: Pending<I, O>[] = [];
    const taken = new Set<string>();
    for (const p of this.queue) {
      if (batch.length < this.maxBatch && p.keys.every((k) => !taken.has(k) && !this.busy.has(k))) {
        batch.push(p);
        for (const k of p.keys) taken.add(k);
      } else {
        rest.push(p);
        // Later calls on the same keys keep their order behind this one.
        for (const k of p.keys) taken.add(k);
      }
    }
    this.queue = rest;
    return batch;
  }

  private send(): void {
    if (this.inFlight >= this.maxInFlight || this.queue.length === 0) return;
    const batch = this.take();
    if (batch.length === 0) return;
    const keys = batch.flatMap((p) => p.keys);
    for (const k of keys) this.busy.add(k);
    this.inFlight++;
    this.run(batch.map((p) => p.item))
      .then(
        (answers) => batch.forEach((p, i) => p.resolve(answers[i])),
        (err) => batch.forEach((p) => p.reject(err)),
      )
      .finally(() => {
        for (const k of keys) this.busy.delete(k);
        this.inFlight--;
        this.schedule();
      });
  }
}

interface PendingAuthRead {
  hmac: Buffer;
  read: ReadPlan | undefined;
  write: WritePlan | undefined;
}

async function runAuthReads(db: Kysely<DB>, batch: PendingAuthRead[]): Promise<(AuthRead | null)[]> {
  const prefixes = batch.map((p) => p.read?.prefix ?? null);
  const planOf: number[] = [];
  const planPaths: string[] = [];
  batch.forEach((p, i) => {
    for (const path of p.write?.versioned ?? []) {
      planOf.push(i + 1);
      planPaths.push(path);
    }
  });
  const rows = await preparedQuery<any>(
    db,
    'coffer_auth_read',
    AUTH_READ,
    [batch.map((p) => p.hmac), batch.map((p) => p.read?.path ?? null), prefixes, prefixes.map((prefix) => (prefix === null ? null : prefixEnd(prefix))), planOf, planPaths],
    { hot: true },
  );
  const answers: (AuthRead | null)[] = batch.map(() => null);
  for (const r of rows) {
    const { read, write } = batch[Number(r.i) - 1];
    const paths: string[] = r.policy_paths ?? [];
    const values: Buffer[] = r.policy_values ?? [];
    const vvalues: (Buffer | null)[] = r.versioned_values ?? [];
    const vversions: (string | number)[] = r.versioned_versions ?? [];
    answers[Number(r.i) - 1] = {
      token: tokenFromJson(r.token),
      policyPaths: r.policy_wanted ?? [],
      policies: paths.map((path, i) => ({ path, value: values[i] })),
      read: read ? { ...read, value: r.read_value ?? null, last: r.last_path !== null ? { path: r.last_path, value: r.last_value } : null } : null,
      versioned: write ? { paths: write.versioned, entries: write.versioned.map((_, i) => ({ value: vvalues[i] ?? null, version: Number(vversions[i] ?? 0) })) } : null,
      replicaReadOnly: r.replica_read_only === true,
    };
  }
  return answers;
}

/** Concurrent optimistic writes in flight at once (each its own statement and commit). */
const CAS_WRITES_IN_FLIGHT = 4;

export interface PgStoreOptions {
  /**
   * Told of WAL rows this process committed: the records of a batched write (in position
   * order), or null after a transaction that wrote some (their records are in the WAL table).
   * The active node feeds its merkle index and shipping from it without reading the WAL back.
   */
  onWalWritten?: (committed: CommittedRows | null) => void;
}

export function pgStore(db: Kysely<DB>, opts: PgStoreOptions = {}): Store {
  const authReads = new Batcher<PendingAuthRead, AuthRead | null>((batch) => runAuthReads(db, batch), HOT_CONNECTIONS);
  const versionedReads = new Batcher<string[], Versioned[]>(async (batch) => {
    const all = await getVersionedMany(db, batch.flat());
    let at = 0;
    return batch.map((paths) => all.slice(at, (at += paths.length)));
  }, CAS_WRITES_IN_FLIGHT);
  const casWrites = new Batcher<CasWrite, number | null>(
    async (batch) => {
      // One keyring term per statement: the oldest in the batch (a newer one only passes more);
      // a batch of deletes encrypts nothing and passes any guard.
      const terms = batch.flatMap((w) => [...(w.anchor.value ? [w.anchor.value] : []), ...w.puts.map(([, v]) => v)]).map(termOf);
      const { outcomes, committed } = await casWriteBatch(db, batch, terms.length ? Math.min(...terms) : 2 ** 31 - 1);
      if (committed) opts.onWalWritten?.(committed);
      return outcomes;
    },
    CAS_WRITES_IN_FLIGHT,
    64,
    (w) => [w.anchor.path, ...w.puts.map(([p]) => p), ...w.deletes],
  );
  return {
    authRead: (hmac, plan) => authReads.submit({ hmac, read: plan && 'path' in plan ? plan : undefined, write: plan && 'versioned' in plan ? plan : undefined }),
    getVersioned: (paths) => versionedReads.submit(paths),
    casWrite: (w) =>
      casWrites.submit(w).catch((err) => {
        throw err instanceof StaleKeyTerm ? new KeyringStale() : err instanceof ReplicaReadOnly ? new MustForward() : err;
      }),
    get: (path) => getEntry(db, path),
    getWithLast: (path, prefix) => getWithLast(db, path, prefix),
    list: (prefix) => listChildren(db, 'coffer_entries', prefix),
    getLocal: (path) => getLocal(db, path),
    listLocal: (prefix) => listChildren(db, 'coffer_local_entries', prefix),
    transaction: async (fn) => {
      try {
        const seqs: number[] = [];
        const result = await db.transaction().execute((tx) => fn(txStore(tx, seqs)));
        if (seqs.length === 0) return { result, lastLsn: 0 };
        // Numbered inside the COMMIT (entries.ts header): read the positions back.
        opts.onWalWritten?.(null);
        return { result, lastLsn: await positionOf(db, seqs) };
      } catch (err) {
        if (err instanceof StaleKeyTerm) throw new KeyringStale();
        // The role guard refused (this cluster is a secondary): nothing was written; core
        // forwards the request to the primary.
        if (err instanceof ReplicaReadOnly) throw new MustForward();
        throw err;
      }
    },

    async readSeal() {
      const r = await db.selectFrom('coffer_seal').selectAll().where('id', '=', 1).executeTakeFirst();
      if (!r) return null;
      return {
        sealType: r.seal_type as SealRecord['sealType'],
        secretShares: r.secret_shares,
        secretThreshold: r.secret_threshold,
        wrappedRootKey: r.wrapped_root_key,
        sealKeyId: r.seal_key_id,
        keyring: r.keyring,
        clusterId: r.cluster_id,
        clusterName: r.cluster_name,
      };
    },
    async createSeal(rec) {
      const r = await db
        .insertInto('coffer_seal')
        .values({
          id: 1,
          seal_type: rec.sealType,
          secret_shares: rec.secretShares,
          secret_threshold: rec.secretThreshold,
          wrapped_root_key: rec.wrappedRootKey,
          seal_key_id: rec.sealKeyId,
          keyring: rec.keyring,
          cluster_id: rec.clusterId,
          cluster_name: rec.clusterName,
        })
        .onConflict((oc) => oc.column('id').doNothing())
        .executeTakeFirst();
      return Number(r.numInsertedOrUpdatedRows ?? 0) > 0;
    },
    async updateKeyring(blob, activeTerm) {
      await db.updateTable('coffer_seal').set({ keyring: blob, active_term: activeTerm }).where('id', '=', 1).execute();
    },
    async rotateKeyring(blob, activeTerm) {
      const r = await db
        .updateTable('coffer_seal')
        .set({ keyring: blob, active_term: activeTerm })
        .where('id', '=', 1)
        .where(sql<boolean>`coffer_writable()`)
        .executeTakeFirst();
      return Number(r.numUpdatedRows) === 1;
    },
    tokens: tokenRepo(db),
    leases: leaseRepo(db),
    wrapped: wrapRepo(db),
  };
}

function toLease(r: any): LeaseRecord {
  return {
    leaseId: r.lease_id,
    tokenHmac: r.token_hmac,
    kind: r.kind,
    path: r.path,
    issuedAt: r.issued_at,
    lastRenewal: r.last_renewal,
    expiresAt: r.expires_at,
    ttlSeconds: Number(r.ttl_seconds),
    maxExpiresAt: r.max_expires_at,
    renewable: r.renewable,
  };
}

function leaseRepo(db: Kysely<DB>): LeaseRepo {
  return {
    async insert(rec) {
      await db
        .insertInto('coffer_leases')
        .values({
          lease_id: rec.leaseId,
          token_hmac: rec.tokenHmac,
          kind: rec.kind,
          path: rec.path,
          issued_at: rec.issuedAt,
          last_renewal: rec.lastRenewal,
          expires_at: rec.expiresAt,
          ttl_seconds: rec.ttlSeconds,
          max_expires_at: rec.maxExpiresAt,
          renewable: rec.renewable,
        })
        .execute();
    },
    get: async (id) => {
      const r = await db.selectFrom('coffer_leases').selectAll().where('lease_id', '=', id).executeTakeFirst();
      return r ? toLease(r) : null;
    },
    update: async (id, patch) => {
      await db
        .updateTable('coffer_leases')
        .set({
          ...(patch.expiresAt !== undefined ? { expires_at: patch.expiresAt } : {}),
          ...(patch.lastRenewal !== undefined ? { last_renewal: patch.lastRenewal } : {}),
          ...(patch.ttlSeconds !== undefined ? { ttl_seconds: patch.ttlSeconds } : {}),
        })
        .where('lease_id', '=', id)
        .execute();
    },
    delete: async (id) => Number((await db.deleteFrom('coffer_leases').where('lease_id', '=', id).executeTakeFirst()).numDeletedRows) > 0,
    byToken: async (h) => (await db.selectFrom('coffer_leases').selectAll().where('token_hmac', '=', h).execute()).map(toLease),
    idsWithPrefix: async (prefix) =>
      (
        await db
          .selectFrom('coffer_leases')
          .select('lease_id')
          .where('lease_id', '>=', prefix)
          .where('lease_id', '<', prefixEnd(prefix))
          .orderBy('lease_id')
          .execute()
      ).map((r) => r.lease_id),
    expired: async (now, limit) =>
      (await db.selectFrom('coffer_leases').select('lease_id').where('expires_at', '<=', now).orderBy('expires_at').limit(limit).execute()).map((r) => r.lease_id),
  };
}

function toWrapped(r: any): WrappedRecord {
  return { tokenHmac: r.token_hmac, accessor: r.accessor, creationPath: r.creation_path, createdAt: r.created_at, expiresAt: r.expires_at, payload: r.payload };
}

function wrapRepo(db: Kysely<DB>): WrapRepo {
  return {
    async insert(rec) {
      await db
        .insertInto('coffer_wrapped')
        .values({ token_hmac: rec.tokenHmac, accessor: rec.accessor, creation_path: rec.creationPath, created_at: rec.createdAt, expires_at: rec.expiresAt, payload: rec.payload })
        .execute();
    },
    get: async (h) => {
      const r = await db.selectFrom('coffer_wrapped').selectAll().where('token_hmac', '=', h).executeTakeFirst();
      return r ? toWrapped(r) : null;
    },
    take: async (h) => {
      const r = await db.deleteFrom('coffer_wrapped').where('token_hmac', '=', h).returningAll().executeTakeFirst();
      return r ? toWrapped(r) : null;
    },
    deleteExpired: async (now) => Number((await db.deleteFrom('coffer_wrapped').where('expires_at', '<=', now).executeTakeFirst()).numDeletedRows),
  };
}

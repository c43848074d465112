/** Store (src/core/ports.ts) on Postgres through kysely. */
import { sql, type Kysely, type Transaction } from 'kysely';
import type { LeaseRecord, LeaseRepo, SealRecord, Store, StoreTx, TokenRecord, TokenRepo, WrapRepo, WrappedRecord } from '../core/ports';
import { deleteEntry, getEntries, getEntry, getWithLast, listChildren, prefixEnd, putEntries, putEntry, StaleKeyTerm } from './entries';
import { KeyringStale } from '../core/errors';
import { termOf } from '../core/keyring';
import { deleteLocal, getLocal, putLocal } from './local';
import type { DB } from './schema';

function txStore(tx: Transaction<DB>): StoreTx {
  return {
    get: async (path) => {
      const row = await tx.selectFrom('coffer_entries').select('value').where('path', '=', path).executeTakeFirst();
      return row?.value ?? null;
    },
    getMany: (paths) => getEntries(tx, paths),
    list: (prefix) => listChildren(tx, 'coffer_entries', prefix),
    put: async (path, value) => (await putEntry(tx, path, value, termOf(value))).seq,
    putMany: (entries) => putEntries(tx, entries, Math.min(...entries.map(([, v]) => termOf(v)))),
    delete: async (path) => (await deleteEntry(tx, path))?.seq ?? null,
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

export function pgStore(db: Kysely<DB>): Store {
  return {
    get: (path) => getEntry(db, path),
    getWithLast: (path, prefix) => getWithLast(db, path, prefix),
    list: (prefix) => listChildren(db, 'coffer_entries', prefix),
    getLocal: (path) => getLocal(db, path),
    listLocal: (prefix) => listChildren(db, 'coffer_local_entries', prefix),
    transaction: async (fn) => {
      try {
        return await db.transaction().execute((tx) => fn(txStore(tx)));
      } catch (err) {
        if (err instanceof StaleKeyTerm) throw new KeyringStale();
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

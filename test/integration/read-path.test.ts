/**
 * The request path's one-statement authentication (token + its policies + the read a KV
 * route plans, or the versioned entries a KV write reads first, in one round trip): what it
 * fetches, and that it changes nothing a caller can observe. Two Cores share one database, as two server processes of a cluster do: a
 * change made through one (policy, revocation, write) must apply on the other's very next
 * request — nothing is cached but decoded policy text, keyed by its ciphertext.
 */
import { Core } from '../../src/core/core';
import { NotFound, PermissionDenied } from '../../src/core/errors';
import type { Store } from '../../src/core/ports';
import type { LogicalResponse, Operation } from '../../src/core/request';
import { openPostgres, type Database } from '../../src/storage/db';
import { migrateToLatest } from '../../src/storage/migrate';
import { pgStore } from '../../src/storage/pg-store';
import { ManualClock } from '../helpers/core';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';

let tdb: TestDatabase;
const databases: Database[] = [];
const clock = new ManualClock();
/** Store calls made by `a`, by method name. */
const calls: string[] = [];
let a: Core;
let b: Core;
let root: string;

function counting(store: Store): Store {
  const wrap = <T extends object>(o: T, prefix: string): T =>
    new Proxy(o, {
      get(target, prop, receiver) {
        const v = Reflect.get(target, prop, receiver);
        if (typeof v !== 'function') return v;
        return (...args: unknown[]) => {
          calls.push(prefix + String(prop));
          return v.apply(target, args);
        };
      },
    });
  return { ...wrap(store, ''), tokens: wrap(store.tokens, 'tokens.'), leases: store.leases, wrapped: store.wrapped } as Store;
}

async function core(store: (s: Store) => Store = (s) => s): Promise<Core> {
  const database = openPostgres(tdb.url, 4);
  databases.push(database);
  return new Core({ store: store(pgStore(database.db)), clock, version: 'test' });
}

function call(c: Core, operation: Operation, path: string, token: string, data: Record<string, unknown> = {}, query: Record<string, string> = {}): Promise<LogicalResponse> {
  return c.handle({ operation, path, data, query, token, headers: {} });
}

async function denied(p: Promise<unknown>): Promise<void> {
  await expect(p).rejects.toBeInstanceOf(PermissionDenied);
}

beforeAll(async () => {
  tdb = await createTestDatabase('readpath');
  const migrating = openPostgres(tdb.url, 1);
  databases.push(migrating);
  await migrateToLatest(migrating.db);
  a = await core(counting);
  b = await core();
  const init = await a.initialize(1, 1);
  await a.unseal(init.keys[0]);
  await b.unseal(init.keys[0]);
  root = init.rootToken;
  await call(a, 'update', 'sys/mounts/secret', root, { type: 'kv', options: { version: '2' } });
  await call(a, 'update', 'sys/mounts/local-kv', root, { type: 'kv', options: { version: '2' }, local: true });
  await call(a, 'update', 'sys/mounts/v1', root, { type: 'kv' });
  for (let v = 1; v <= 3; v++) await call(a, 'update', 'secret/data/app/db', root, { data: { password: `p${v}` } });
  await call(a, 'update', 'secret/data/other', root, { data: { x: 1 } });
  await call(a, 'update', 'local-kv/data/k', root, { data: { local: true } });
  await call(a, 'update', 'v1/k', root, { one: 1 });
  await call(a, 'update', 'sys/policies/acl/reader', root, { policy: 'path "secret/data/app/*" { capabilities = ["read"] }' });
});

afterAll(async () => {
  for (const d of databases) await d.close();
  await tdb?.drop();
});

describe('one round trip per KV read', () => {
  test('a read is one store call (the token, its policies and the data together)', async () => {
    const t = (await a.tokens.create({ policies: ['default', 'reader'], ttlSeconds: 3600 })).token;
    await call(a, 'read', 'secret/data/app/db', t); // warm the mount table
    calls.length = 0;
    const r = await call(a, 'read', 'secret/data/app/db', t);
    expect(r.data).toMatchObject({ data: { password: 'p3' }, metadata: { version: 3 } });
    expect(calls).toEqual(['authRead']);
    calls.length = 0;
    await call(a, 'read', 'secret/data/app/db', root);
    expect(calls).toEqual(['authRead']);
  });

  test('older versions, deleted versions and missing keys answer as before', async () => {
    expect((await call(a, 'read', 'secret/data/app/db', root, {}, { version: '1' })).data).toMatchObject({ data: { password: 'p1' }, metadata: { version: 1 } });
    await expect(call(a, 'read', 'secret/data/app/nope', root)).rejects.toBeInstanceOf(NotFound);
    await expect(call(a, 'read', 'secret/data/app/db', root, {}, { version: '9' })).rejects.toBeInstanceOf(NotFound);
    await call(b, 'delete', 'secret/data/other', root);
    const del = await call(a, 'read', 'secret/data/other', root);
    expect(del.status).toBe(404);
    expect(del.data).toMatchObject({ data: null, metadata: { version: 1 } });
  });

  test('KV v1 reads are one store call too; local mounts read their own storage after', async () => {
    calls.length = 0;
    expect((await call(a, 'read', 'v1/k', root)).data).toEqual({ one: 1 });
    expect(calls).toEqual(['authRead']);
    await expect(call(a, 'read', 'v1/missing', root)).rejects.toBeInstanceOf(NotFound);
    calls.length = 0;
    expect((await call(a, 'read', 'local-kv/data/k', root)).data).toMatchObject({ data: { local: true } });
    // Local storage: the metadata, then the version.
    expect(calls).toEqual(['authRead', 'getLocal', 'getLocal']);
  });

  test('a refused read returns nothing of what was fetched', async () => {
    const t = (await a.tokens.create({ policies: ['reader'], ttlSeconds: 3600 })).token;
    await denied(call(a, 'read', 'secret/data/other', t));
    await denied(call(a, 'read', 'secret/data/app/db', 'hvs.not-a-token'));
    await denied(call(a, 'read', 'secret/data/app/db', ''));
  });

  test('a write through another process is read at once', async () => {
    await call(b, 'update', 'secret/data/app/db', root, { data: { password: 'from-b' } });
    expect((await call(a, 'read', 'secret/data/app/db', root)).data).toMatchObject({ data: { password: 'from-b' }, metadata: { version: 4 } });
  });
});

describe('two store calls per KV write', () => {
  test('a KV v2 or v1 write is the token read (with the entries it modifies) and the guarded write', async () => {
    calls.length = 0;
    const before = (await call(b, 'read', 'secret/data/app/db', root)).data as { metadata: { version: number } };
    calls.length = 0;
    const w = await call(a, 'update', 'secret/data/app/db', root, { data: { password: 'p4' } });
    expect(w.data).toMatchObject({ version: before.metadata.version + 1 });
    expect(calls).toEqual(['authRead', 'casWrite']);
    calls.length = 0;
    await call(a, 'update', 'v1/k', root, { one: 2 });
    await call(a, 'delete', 'v1/k', root);
    expect(calls).toEqual(['authRead', 'casWrite', 'authRead', 'casWrite']);
    calls.length = 0;
    await call(a, 'delete', 'secret/data/app/db', root);
    expect(calls).toEqual(['authRead', 'casWrite']);
    expect((await call(a, 'read', 'secret/data/app/db', root)).status).toBe(404);
    await call(a, 'update', 'secret/data/app/db', root, { data: { password: 'p3' } });
    await call(a, 'update', 'v1/k', root, { one: 1 });
  });

  test('a write whose prefetched versions went stale meanwhile reads again and still writes once', async () => {
    // b changes the key between a's token read and a's write: a's first guarded write finds the
    // metadata moved, reads it again (getVersioned) and writes the next version.
    const origCas = (a as unknown as { opts: { store: Store } }).opts.store.casWrite;
    let raced = false;
    (a as unknown as { opts: { store: Store } }).opts.store.casWrite = async (w) => {
      if (!raced) {
        raced = true;
        await call(b, 'update', 'secret/data/race', root, { data: { by: 'b' } });
      }
      return origCas(w);
    };
    try {
      await call(a, 'update', 'secret/data/race', root, { data: { by: 'a0' } });
      raced = false;
      calls.length = 0;
      const w = await call(a, 'update', 'secret/data/race', root, { data: { by: 'a' } });
      expect(calls).toEqual(['authRead', 'casWrite', 'getVersioned', 'casWrite']);
      expect(w.data).toMatchObject({ version: 4 });
      expect((await call(b, 'read', 'secret/data/race', root)).data).toMatchObject({ data: { by: 'a' }, metadata: { version: 4 } });
    } finally {
      (a as unknown as { opts: { store: Store } }).opts.store.casWrite = origCas;
    }
  });
});

describe('tokens and policies stay live', () => {
  test('the token record read with the request is the one the token repository reads', async () => {
    const store = pgStore(databases[0].db);
    const parent = await a.tokens.create({ policies: ['reader'], ttlSeconds: 3600 });
    const child = await a.tokens.create({
      policies: ['reader', 'default'], parent: parent.record, ttlSeconds: 120, explicitMaxTtlSeconds: 600, numUses: 5,
      meta: { team: 'ops', 'ü': 'ß "quoted"' }, displayName: 'token-x', role: 'r1', renewable: true,
    });
    const batch = await a.tokens.create({ policies: ['reader'], type: 'batch', ttlSeconds: 30, periodSeconds: 30, orphan: true });
    const rootHmac = a.tokens.digest(root);
    for (const hmac of [parent.record.hmac, child.record.hmac, batch.record.hmac, rootHmac]) {
      const viaRepo = await store.tokens.byHmac(hmac);
      expect(viaRepo).not.toBeNull();
      expect((await store.authRead(hmac))?.token).toEqual(viaRepo);
    }
    expect(await store.authRead(Buffer.alloc(32))).toBeNull();
  });

  test('a policy changed or deleted through another process applies on the next request', async () => {
    await call(a, 'update', 'sys/policies/acl/flip', root, { policy: 'path "secret/data/app/*" { capabilities = ["read"] }' });
    const t = (await a.tokens.create({ policies: ['flip'], ttlSeconds: 3600 })).token;
    await call(a, 'read', 'secret/data/app/db', t);
    await call(b, 'update', 'sys/policies/acl/flip', root, { policy: 'path "secret/data/other" { capabilities = ["read"] }' });
    await denied(call(a, 'read', 'secret/data/app/db', t));
    await call(b, 'update', 'sys/policies/acl/flip', root, { policy: 'path "secret/data/app/*" { capabilities = ["read"] }' });
    await call(a, 'read', 'secret/data/app/db', t);
    await call(b, 'delete', 'sys/policies/acl/flip', root);
    await denied(call(a, 'read', 'secret/data/app/db', t));
  });

  test('the stored default policy replaces the built-in one, from storage, on every request', async () => {
    const t = (await a.tokens.create({ policies: ['default'], ttlSeconds: 3600 })).token;
    await denied(call(a, 'read', 'secret/data/app/db', t));
    await call(b, 'update', 'sys/policies/acl/default', root, { policy: 'path "secret/data/app/*" { capabilities = ["read"] }' });
    await call(a, 'read', 'secret/data/app/db', t);
    await call(b, 'update', 'sys/policies/acl/default', root, { policy: 'path "auth/token/lookup-self" { capabilities = ["read"] }' });
    await denied(call(a, 'read', 'secret/data/app/db', t));
  });

  test('policy names stored untrimmed or in other cases resolve as before', async () => {
    // tokens.create stores names as given; the ACL trims and lower-cases them.
    const t = (await a.tokens.create({ policies: [' Reader '], ttlSeconds: 3600 })).token;
    await call(a, 'read', 'secret/data/app/db', t);
    await denied(call(a, 'read', 'secret/data/other', t));
    // A name Postgres may lower-case differently from JavaScript: the policy is read on its own.
    await call(a, 'update', 'sys/policies/acl/i̇x', root, { policy: 'path "secret/data/other" { capabilities = ["read"] }' });
    const u = (await a.tokens.create({ policies: ['İX'], ttlSeconds: 3600 })).token;
    await call(a, 'read', 'secret/data/other', u);
  });

  test('revocation through another process is immediate', async () => {
    const t = (await a.tokens.create({ policies: ['reader'], ttlSeconds: 3600 })).token;
    await call(a, 'read', 'secret/data/app/db', t);
    await call(b, 'update', 'auth/token/revoke', root, { token: t });
    await denied(call(a, 'read', 'secret/data/app/db', t));
  });

  test('expiry applies without a sweep', async () => {
    const t = (await a.tokens.create({ policies: ['reader'], ttlSeconds: 60 })).token;
    await call(a, 'read', 'secret/data/app/db', t);
    clock.advance(61);
    await denied(call(a, 'read', 'secret/data/app/db', t));
  });

  test('num_uses: each read spends a use, shared across processes; the last one revokes', async () => {
    const { token: t, record } = await a.tokens.create({ policies: ['reader'], ttlSeconds: 3600, numUses: 3 });
    await call(a, 'read', 'secret/data/app/db', t);
    await call(b, 'read', 'secret/data/app/db', t);
    await call(a, 'read', 'secret/data/app/db', t);
    await denied(call(a, 'read', 'secret/data/app/db', t));
    await denied(call(b, 'read', 'secret/data/app/db', t));
    const c = await sqlClient(tdb.url);
    try {
      // Revoked after the last use: no row is left.
      const { rows } = await c.query('SELECT count(*)::int AS n FROM coffer_tokens WHERE token_hmac = $1', [record.hmac]);
      expect(rows[0].n).toBe(0);
    } finally {
      await c.end();
    }
  });
});

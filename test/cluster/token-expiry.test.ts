/**
 * Expiry of tokens and login leases on a real server with the Redis (BullMQ) queue and a 2 s
 * Postgres sweep. A delayed queue job per expiring token/lease is the fast path; the sweep on
 * the active node is the backstop, so losing the jobs must delay a revocation by at most one
 * sweep interval and never lose it.
 *
 * "Gone" is checked from the API (lookup → 403) and in Postgres (the rows are deleted): an
 * expired token is refused from its expiry instant even before anything revokes it, so only
 * the child of an expired parent and the rows in the database show the revocation itself.
 *
 * The Redis keys live under a prefix unique to this file and are deleted at the end (other
 * test files share the Redis server: never FLUSHALL).
 */
import { randomBytes } from 'node:crypto';
import Redis from 'ioredis';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { waitFor } from '../helpers/wait';

const REDIS_URL = process.env.COFFER_TEST_REDIS ?? 'redis://127.0.0.1:6379';
const PREFIX = `coffer-test-expiry-${randomBytes(4).toString('hex')}`;
const SWEEP_SECONDS = 2;

let db: TestDatabase | undefined;
let server: CofferProcess;
let redis: Redis;
let root = '';

/** Keys matching `pattern`, by SCAN (never KEYS on a shared server). */
async function scanKeys(pattern: string): Promise<string[]> {
  const out: string[] = [];
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', pattern, 'COUNT', 500);
    out.push(...keys);
    cursor = next;
  } while (cursor !== '0');
  return out;
}

/** Deletes every key under this file's prefix; returns how many there were. */
async function deletePrefixKeys(): Promise<number> {
  const keys = await scanKeys(`${PREFIX}:*`);
  for (let i = 0; i < keys.length; i += 500) await redis.del(...keys.slice(i, i + 500));
  return keys.length;
}

/** The expiry jobs BullMQ holds for a token accessor or a lease id. */
const jobKeys = (kind: 'token' | 'lease', id: string) => scanKeys(`${PREFIX}:expiry.check:${kind}-${id.replace(/[*?[\]]/g, '\\$&')}-*`);

afterAll(async () => {
  await stopAllCoffers();
  if (redis) {
    await deletePrefixKeys().catch(() => undefined);
    expect(await scanKeys(`${PREFIX}:*`)).toEqual([]);
    redis.disconnect();
  }
  await db?.drop();
});

beforeAll(async () => {
  redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 2 });
  await redis.connect();
  db = await createTestDatabase('expiry');
  server = await startCoffer({
    dbUrl: db.url,
    extraHcl: `expiry_sweep_interval = "${SWEEP_SECONDS}s"\nqueue "redis" {\n url = "${REDIS_URL}"\n prefix = "${PREFIX}"\n}\n`,
  });
  ({ rootToken: root } = await initAndUnseal([server]));
  // The sweep runs on the active node only.
  await waitFor('the node to be active', async () => (await fetch(`${server.addr}/v1/sys/health`, { method: 'HEAD' })).status === 200);
  const minter = 'path "auth/token/create" { capabilities = ["update"] }';
  expect((await vault(server.addr, 'PUT', 'sys/policies/acl/minter', { token: root, body: { policy: minter } })).status).toBe(204);
});

interface Issued {
  token: string;
  accessor: string;
}

/** A token with `ttl` (child of root, allowed to create tokens) and a 60 s child of it. */
async function parentAndChild(ttl: string): Promise<{ parent: Issued; child: Issued; createdAt: number }> {
  const createdAt = Date.now();
  const p = await vault(server.addr, 'POST', 'auth/token/create', { token: root, body: { policies: ['minter'], ttl } });
  expect(p.status).toBe(200);
  const c = await vault(server.addr, 'POST', 'auth/token/create', { token: p.body.auth.client_token, body: { ttl: '60s' } });
  expect(c.status).toBe(200);
  expect(c.body.auth.lease_duration).toBe(60);
  const parent = { token: p.body.auth.client_token, accessor: p.body.auth.accessor };
  const child = { token: c.body.auth.client_token, accessor: c.body.auth.accessor };
  // Both alive to begin with.
  for (const t of [parent, child]) expect((await lookup(t.token)).status).toBe(200);
  return { parent, child, createdAt };
}

const lookup = (token: string) => vault(server.addr, 'POST', 'auth/token/lookup', { token: root, body: { token } });

async function tokenRows(accessors: string[]): Promise<number> {
  const c = await sqlClient(db!.url);
  try {
    const { rows } = await c.query(`SELECT count(*)::int AS n FROM coffer_tokens WHERE accessor = ANY($1)`, [accessors]);
    return rows[0].n;
  } finally {
    await c.end();
  }
}

async function leaseRows(where: string, params: unknown[]): Promise<number> {
  const c = await sqlClient(db!.url);
  try {
    const { rows } = await c.query(`SELECT count(*)::int AS n FROM coffer_leases WHERE ${where}`, params);
    return rows[0].n;
  } finally {
    await c.end();
  }
}

/** Both tokens answer 403 to lookup (by root and by themselves) and their rows are deleted. */
async function bothGone(parent: Issued, child: Issued): Promise<boolean> {
  for (const t of [parent, child]) {
    if ((await lookup(t.token)).status !== 403) return false;
    if ((await vault(server.addr, 'GET', 'auth/token/lookup-self', { token: t.token })).status !== 403) return false;
  }
  return (await tokenRows([parent.accessor, child.accessor])) === 0;
}

test('(a) a 3 s token and its 60 s child are both revoked after the parent expires', async () => {
  const { parent, child, createdAt } = await parentAndChild('3s');
  // The expiry jobs are in Redis (the fast path this case relies on).
  expect((await jobKeys('token', parent.accessor)).length).toBeGreaterThan(0);

  await waitFor('the parent and its child to be revoked', () => bothGone(parent, child), { timeoutMs: 20_000, intervalMs: 100 });
  const elapsed = (Date.now() - createdAt) / 1000;
  // Not before the parent's TTL (the child's own TTL is 60 s).
  expect(elapsed).toBeGreaterThanOrEqual(3);
  expect(await leaseRows(`lease_id LIKE 'auth/token/create/%'`, [])).toBe(0);
});

test('(b) with the queued expiry jobs lost (prefix keys deleted), the Postgres sweep still revokes both in time', async () => {
  // Long enough that deleting the jobs surely happens before they are due, even on a busy box.
  const ttlSeconds = 10;
  const { parent, child, createdAt } = await parentAndChild(`${ttlSeconds}s`);
  expect((await jobKeys('token', parent.accessor)).length).toBeGreaterThan(0);
  expect((await jobKeys('token', child.accessor)).length).toBeGreaterThan(0);

  // Lose every queued job of this cluster (only this prefix: Redis is shared).
  expect(await deletePrefixKeys()).toBeGreaterThan(0);
  expect(await jobKeys('token', parent.accessor)).toEqual([]);
  expect(await jobKeys('token', child.accessor)).toEqual([]);
  // The jobs were deleted before they were due, so only the sweep can do it now.
  expect((Date.now() - createdAt) / 1000).toBeLessThan(ttlSeconds);
  expect((await lookup(child.token)).status).toBe(200);

  await waitFor('the sweep to revoke the parent and its child', () => bothGone(parent, child), { timeoutMs: 30_000, intervalMs: 100 });
  const elapsed = (Date.now() - createdAt) / 1000;
  // TTL + one sweep interval + margin for a loaded 2-core machine.
  const margin = 6;
  expect(elapsed).toBeLessThan(ttlSeconds + SWEEP_SECONDS + margin);

  // The server still schedules through the queue after its keys vanished.
  const later = await vault(server.addr, 'POST', 'auth/token/create', { token: root, body: { ttl: '1h' } });
  expect(later.status).toBe(200);
  await waitFor('a new expiry job in Redis', async () => (await jobKeys('token', later.body.auth.accessor)).length > 0, { timeoutMs: 10_000 });
});

test('(c) a userpass login with a 2 s TTL: the lease leaves sys/leases/lookup (400) and the token stops working', async () => {
  const tok = (method: string, path: string, body?: unknown) => vault(server.addr, method, path, { token: root, body });
  expect((await tok('POST', 'sys/auth/userpass', { type: 'userpass' })).status).toBe(204);
  expect((await tok('POST', 'auth/userpass/users/carol', { password: 'pw', token_policies: 'default', token_ttl: '2s' })).status).toBe(204);
  const login = await vault(server.addr, 'POST', 'auth/userpass/login/carol', { body: { password: 'pw' } });
  expect(login.status).toBe(200);
  expect(login.body.auth.lease_duration).toBe(2);
  const token: string = login.body.auth.client_token;
  const accessor: string = login.body.auth.accessor;

  const listed = await tok('LIST', 'sys/leases/lookup/auth/userpass/login/carol/');
  expect(listed.status).toBe(200);
  expect(listed.body.data.keys).toHaveLength(1);
  const leaseId = `auth/userpass/login/carol/${listed.body.data.keys[0]}`;
  const looked = await tok('PUT', 'sys/leases/lookup', { lease_id: leaseId });
  expect(looked.status).toBe(200);
  expect(looked.body.data).toMatchObject({ id: leaseId, renewable: true });
  expect(looked.body.data.ttl).toBeLessThanOrEqual(2);
  expect((await vault(server.addr, 'GET', 'auth/token/lookup-self', { token })).status).toBe(200);
  expect((await jobKeys('lease', leaseId)).length).toBeGreaterThan(0);

  await waitFor('the lease to be unknown and the token refused', async () => {
    const l = await tok('PUT', 'sys/leases/lookup', { lease_id: leaseId });
    const self = await vault(server.addr, 'GET', 'auth/token/lookup-self', { token });
    return l.status === 400 && self.status === 403;
  }, { timeoutMs: 20_000, intervalMs: 100 });
  expect((await tok('PUT', 'sys/leases/lookup', { lease_id: leaseId })).body.errors).toEqual(['invalid lease']);
  expect((await vault(server.addr, 'POST', 'sys/capabilities-self', { token, body: { paths: ['sys/mounts'] } })).status).toBe(403);

  // And revoked, not just past its time: the lease no longer lists, both rows are deleted.
  await waitFor('the lease and token rows to be deleted', async () => {
    const l = await tok('LIST', 'sys/leases/lookup/auth/userpass/login/carol/');
    return l.status === 404 && (await leaseRows('lease_id = $1', [leaseId])) === 0 && (await tokenRows([accessor])) === 0;
  }, { timeoutMs: 20_000, intervalMs: 100 });
  // Renewing the expired lease is refused too.
  expect((await vault(server.addr, 'PUT', 'sys/leases/renew', { token: root, body: { lease_id: leaseId } })).status).toBe(400);
});

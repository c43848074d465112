/**
 * sys/wrapping and sys/leases, in this process, against real Postgres: a Core built as
 * src/main.ts builds it, driven through core.handle (no HTTP), with an injectable clock so
 * expiry is tested by moving time rather than waiting for it.
 */
import type { Core } from '../../src/core/core';
import type { Database } from '../../src/storage/db';
import { authBlock } from '../../src/core/auth/issue';
import type { LogicalResponse, Operation } from '../../src/core/request';
import { toHttpError } from '../../src/http/errors';
import { sqlClient, type TestDatabase } from '../helpers/pg';
import { inProcessCore, ManualClock } from '../helpers/core';


let tdb: TestDatabase;
let database: Database;
let core: Core;
let root: string;
const clock = new ManualClock();

beforeAll(async () => {
  ({ tdb, database, core, root } = await inProcessCore('leases_wrapping', clock));
  await call('update', 'sys/mounts/secret', { type: 'kv', options: { version: '2' } });
  await call('update', 'secret/data/app', { data: { password: 'hunter2' } });
});

afterAll(async () => {
  await database?.close();
  await tdb?.drop();
});

function call(operation: Operation, path: string, data: Record<string, unknown> = {}, token: string | null = root, headers: Record<string, string> = {}): Promise<LogicalResponse> {
  return core.handle({ operation, path, data, query: {}, token, headers });
}

/** The HTTP status and errors a rejected call would produce (through the one error table). */
async function failure(p: Promise<unknown>): Promise<{ status: number; errors: string[] }> {
  try {
    await p;
  } catch (err) {
    return toHttpError(err);
  }
  throw new Error('expected the call to fail');
}

const INVALID_WRAP = { status: 400, errors: ['wrapping token is not valid or does not exist'] };

async function wrappedRead(ttl = '60s') {
  const out = await call('read', 'secret/data/app', {}, root, { 'x-vault-wrap-ttl': ttl });
  expect(out.data).toBeNull();
  return out.wrapInfo!;
}

async function loginLease(user: string, ttlSeconds = 3600, policies = ['default']) {
  const { token, record } = await core.tokens.create({ policies, ttlSeconds, renewable: true, path: `auth/userpass/login/${user}` });
  const lease = await core.leases.createForToken(record, `auth/userpass/login/${user}`);
  return { token, record, lease };
}

describe('response wrapping', () => {
  test('a wrapped KV read unwraps once, then the token is spent', async () => {
    const info = await wrappedRead();
    expect(info).toMatchObject({ ttl: 60, creation_path: 'secret/data/app' });
    expect(info.token).toMatch(/^hvs\./);
    expect(info.creation_time).toBe(clock.now().toISOString().replace('.000Z', 'Z'));
    expect(info.wrapped_accessor).toBeUndefined();

    // At rest: keyed by HMAC, payload sealed by the barrier.
    const q = await sqlClient(tdb.url);
    try {
      const { rows } = await q.query('SELECT accessor, creation_path, payload FROM coffer_wrapped WHERE accessor = $1', [info.accessor]);
      expect(rows).toHaveLength(1);
      expect(rows[0].creation_path).toBe('secret/data/app');
      expect(Buffer.from(rows[0].payload).includes('hunter2')).toBe(false);
    } finally {
      await q.end();
    }

    const out = await call('update', 'sys/wrapping/unwrap', { token: info.token });
    expect(out.status).toBe(200);
    expect((out.data as { data: unknown }).data).toEqual({ password: 'hunter2' });
    expect(await failure(call('update', 'sys/wrapping/unwrap', { token: info.token }))).toEqual(INVALID_WRAP);
    expect(await core.tokens.lookup(info.token)).toBeNull();
  });

  test('the wrapping token unwraps itself as X-Vault-Token', async () => {
    const info = await wrappedRead();
    const out = await call('update', 'sys/wrapping/unwrap', {}, info.token);
    expect((out.data as { data: unknown }).data).toEqual({ password: 'hunter2' });
    // Spent: it no longer authenticates at all.
    expect((await failure(call('update', 'sys/wrapping/unwrap', {}, info.token))).status).toBe(403);
  });

  test('a wrapping token can do nothing but unwrap, look up and rewrap', async () => {
    const info = await wrappedRead();
    expect((await failure(call('read', 'secret/data/app', {}, info.token))).status).toBe(403);
    expect((await failure(call('update', 'sys/wrapping/wrap', { a: 1 }, info.token))).status).toBe(403);
    // Whether a refused request spends the single use is core's num_uses policy (Vault: it
    // does), so nothing is asserted about the token afterwards.
  });

  test('lookup is unauthenticated and leaves the token usable', async () => {
    const info = await wrappedRead('2m');
    const out = await call('update', 'sys/wrapping/lookup', { token: info.token }, null);
    expect(out.data).toEqual({ creation_path: 'secret/data/app', creation_time: info.creation_time, creation_ttl: 120 });
    expect(await failure(call('update', 'sys/wrapping/lookup', { token: 'hvs.nonsense' }, null))).toEqual(INVALID_WRAP);
    await call('update', 'sys/wrapping/unwrap', { token: info.token });
    expect(await failure(call('update', 'sys/wrapping/lookup', { token: info.token }, null))).toEqual(INVALID_WRAP);
  });

  test('rewrap spends the old token and keeps the TTL and creation path', async () => {
    const info = await wrappedRead('90s');
    const out = await call('update', 'sys/wrapping/rewrap', { token: info.token });
    const next = out.wrapInfo!;
    expect(out.data).toBeNull();
    expect(next.token).not.toBe(info.token);
    expect(next).toMatchObject({ ttl: 90, creation_path: 'secret/data/app' });
    expect(await failure(call('update', 'sys/wrapping/unwrap', { token: info.token }))).toEqual(INVALID_WRAP);
    const unwrapped = await call('update', 'sys/wrapping/unwrap', { token: next.token });
    expect((unwrapped.data as { data: unknown }).data).toEqual({ password: 'hunter2' });
  });

  test('sys/wrapping/wrap wraps an arbitrary map (default TTL 5m without the header)', async () => {
    const out = await call('update', 'sys/wrapping/wrap', { answer: 42, nested: { a: ['b'] } });
    expect(out.wrapInfo).toMatchObject({ ttl: 300, creation_path: 'sys/wrapping/wrap' });
    const withHeader = await call('update', 'sys/wrapping/wrap', { x: 'y' }, root, { 'x-vault-wrap-ttl': '45s' });
    expect(withHeader.wrapInfo).toMatchObject({ ttl: 45, creation_path: 'sys/wrapping/wrap' });
    const unwrapped = await call('update', 'sys/wrapping/unwrap', { token: out.wrapInfo!.token });
    expect(unwrapped.data).toEqual({ answer: 42, nested: { a: ['b'] } });
  });

  test('a zero or unparsable wrap TTL is a 400', async () => {
    expect((await failure(call('read', 'secret/data/app', {}, root, { 'x-vault-wrap-ttl': '0' }))).status).toBe(400);
    expect((await failure(call('update', 'sys/wrapping/wrap', { a: 1 }, root, { 'x-vault-wrap-ttl': 'soon' }))).status).toBe(400);
  });

  test('a wrapped auth response names the wrapped accessor and restores the auth block', async () => {
    const { token, record } = await core.tokens.create({ policies: ['default'], ttlSeconds: 600 });
    const out = await core.wrapping.wrap({ auth: authBlock(token, record) }, 60, 'auth/token/create');
    expect(out.wrapInfo!.wrapped_accessor).toBe(record.accessor);
    const unwrapped = await call('update', 'sys/wrapping/unwrap', { token: out.wrapInfo!.token });
    expect(unwrapped.auth).toMatchObject({ client_token: token, accessor: record.accessor });
  });

  test('an expired wrapping token can neither be looked up nor unwrapped', async () => {
    const info = await wrappedRead('60s');
    clock.advance(61);
    expect(await failure(call('update', 'sys/wrapping/lookup', { token: info.token }, null))).toEqual(INVALID_WRAP);
    expect(await failure(call('update', 'sys/wrapping/unwrap', { token: info.token }))).toEqual(INVALID_WRAP);
  });
});

describe('leases', () => {
  test('lookup returns Vault\'s fields; unknown is 400 invalid lease', async () => {
    const { lease } = await loginLease('bob', 3600);
    const out = await call('update', 'sys/leases/lookup', { lease_id: lease.leaseId });
    expect(out.data).toEqual({
      id: lease.leaseId,
      issue_time: lease.issuedAt.toISOString().replace('.000Z', 'Z'),
      expire_time: lease.expiresAt!.toISOString().replace('.000Z', 'Z'),
      last_renewal: null,
      renewable: true,
      ttl: 3600,
    });
    expect(await failure(call('update', 'sys/leases/lookup', { lease_id: 'auth/nope/123' }))).toEqual({ status: 400, errors: ['invalid lease'] });
    expect(await failure(call('update', 'sys/leases/renew', { lease_id: 'auth/nope/123' }))).toEqual({ status: 400, errors: ['invalid lease'] });
    expect(await failure(call('update', 'sys/leases/revoke', { lease_id: 'auth/nope/123' }))).toEqual({ status: 400, errors: ['invalid lease'] });
  });

  test('LIST leases/lookup/<prefix> is a folder listing and needs sudo', async () => {
    const a = await loginLease('carol');
    const b = await loginLease('carol');
    const top = await call('list', 'sys/leases/lookup/');
    expect(top.data!.keys).toContain('auth/');
    const users = await call('list', 'sys/leases/lookup/auth/userpass/login/');
    expect(users.data!.keys).toEqual(expect.arrayContaining(['bob/', 'carol/']));
    const carol = await call('list', 'sys/leases/lookup/auth/userpass/login/carol/');
    expect(carol.data!.keys).toEqual([a.lease.leaseId, b.lease.leaseId].map((id) => id.split('/').pop()).sort());
    expect((await failure(call('list', 'sys/leases/lookup/nothing/here/'))).status).toBe(404);
    // A default-policy token has no sudo, whichever way it asks.
    expect((await failure(call('list', 'sys/leases/lookup/auth/', {}, a.token))).status).toBe(403);
    expect((await failure(call('list', 'sys/leases/lookup', {}, a.token))).status).toBe(403);
  });

  test('renew extends the lease and its token, via body, URL and the legacy path', async () => {
    const { lease, record, token } = await loginLease('dave', 600);
    const out = await call('update', 'sys/leases/renew', { lease_id: lease.leaseId, increment: '2h' });
    expect(out).toMatchObject({ leaseId: lease.leaseId, renewable: true, leaseDuration: 7200, status: 200 });
    const tok = await core.tokens.repo.byHmac(record.hmac);
    expect(tok!.expiresAt!.getTime()).toBe(clock.now().getTime() + 7200_000);
    const looked = await call('update', 'sys/leases/lookup', { lease_id: lease.leaseId });
    expect(looked.data).toMatchObject({ ttl: 7200, last_renewal: clock.now().toISOString().replace('.000Z', 'Z') });

    expect(await call('update', `sys/leases/renew/${lease.leaseId}`, { increment: 60 })).toMatchObject({ leaseDuration: 60 });
    // The legacy alias node-vault's startLeaseRenewal uses; a default-policy token may renew.
    expect(await call('update', 'sys/renew', { lease_id: lease.leaseId, increment: 120 }, token)).toMatchObject({ leaseDuration: 120 });
  });

  test('renew is capped by the lease maximum, with a warning', async () => {
    const { token, record } = await core.tokens.create({ policies: ['default'], ttlSeconds: 60, explicitMaxTtlSeconds: 300, renewable: true });
    const lease = await core.leases.createForToken(record, 'auth/token/create');
    const out = await call('update', 'sys/leases/renew', { lease_id: lease.leaseId, increment: 3600 }, token);
    expect(out.leaseDuration).toBe(300);
    expect(out.warnings![0]).toMatch(/capped/);
  });

  test('revoking an auth lease revokes its token (body, URL and legacy paths)', async () => {
    for (const how of ['body', 'url', 'legacy'] as const) {
      const { token, lease } = await loginLease(`erin-${how}`);
      const out =
        how === 'body'
          ? await call('update', 'sys/leases/revoke', { lease_id: lease.leaseId })
          : await call('update', `${how === 'url' ? 'sys/leases/revoke' : 'sys/revoke'}/${lease.leaseId}`);
      expect(out.status).toBe(204);
      expect(await core.tokens.lookup(token)).toBeNull();
      expect(await core.leases.repo.get(lease.leaseId)).toBeNull();
    }
  });

  test('revoke-prefix revokes everything under the prefix and needs sudo', async () => {
    const f1 = await loginLease('frank');
    const f2 = await loginLease('frank');
    const other = await loginLease('grace');
    expect((await failure(call('update', 'sys/leases/revoke-prefix/auth/userpass/login/frank', {}, other.token))).status).toBe(403);
    // node-vault's revokePrefix calls the legacy path; no trailing slash still means a prefix.
    expect((await call('update', 'sys/revoke-prefix/auth/userpass/login/frank')).status).toBe(204);
    for (const f of [f1, f2]) expect(await core.tokens.lookup(f.token)).toBeNull();
    expect(await core.tokens.lookup(other.token)).not.toBeNull();
    expect((await call('update', 'sys/leases/revoke-force/auth/userpass/login/grace/')).status).toBe(204);
    expect(await core.tokens.lookup(other.token)).toBeNull();
  });

  test('list and revoke-prefix need sudo on top of the capability', async () => {
    // Stored the way core.aclFor reads policies; grants the capabilities but not sudo.
    const rules = [
      { path: 'sys/leases/lookup/*', capabilities: ['list'] },
      { path: 'sys/leases/revoke-prefix/*', capabilities: ['update'] },
    ];
    await core.barrier.transaction((tx) => tx.put('core/policies/acl/lease-admin', { name: 'lease-admin', rules }));
    const { token } = await core.tokens.create({ policies: ['lease-admin'], ttlSeconds: 600 });
    const victim = await loginLease('judy');
    expect((await failure(call('list', 'sys/leases/lookup/auth/', {}, token))).status).toBe(403);
    expect((await failure(call('update', 'sys/leases/revoke-prefix/auth/userpass/login/judy/', {}, token))).status).toBe(403);
    expect(await core.tokens.lookup(victim.token)).not.toBeNull();

    await core.barrier.transaction((tx) => tx.put('core/policies/acl/lease-admin', { name: 'lease-admin', rules: rules.map((r) => ({ ...r, capabilities: [...r.capabilities, 'sudo'] })) }));
    expect((await call('list', 'sys/leases/lookup/auth/', {}, token)).data!.keys).toContain('userpass/');
    expect((await call('update', 'sys/leases/revoke-prefix/auth/userpass/login/judy/', {}, token)).status).toBe(204);
    expect(await core.tokens.lookup(victim.token)).toBeNull();
  });

  test('revoking a token revokes its leases; tidy clears what expired', async () => {
    const { record, lease } = await loginLease('heidi', 30);
    await core.tokens.revoke(record.hmac);
    expect(await core.leases.repo.get(lease.leaseId)).toBeNull();

    // A lease left behind by a token deleted without its leases (a crash mid-revoke).
    const orphaned = await loginLease('mallory', 600);
    await core.tokens.repo.delete(orphaned.record.hmac);
    const stale = await loginLease('ivan', 30);
    const info = await wrappedRead('30s');
    clock.advance(31);
    const out = await call('update', 'sys/leases/tidy');
    expect(out.status).toBe(200);
    expect(out.warnings!.join(' ')).toMatch(/expired lease/);
    expect(out.warnings!.join(' ')).toMatch(/token no longer exists/);
    expect(await core.leases.repo.get(orphaned.lease.leaseId)).toBeNull();
    expect(await core.leases.repo.get(stale.lease.leaseId)).toBeNull();
    expect(await core.opts.store.wrapped.get(core.tokens.digest(info.token))).toBeNull();
    expect((await call('update', 'sys/leases/tidy')).status).toBe(204);
  });
});

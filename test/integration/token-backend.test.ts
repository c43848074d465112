/**
 * The token auth method (`auth/token/...`) in this process against real Postgres: one database
 * and one unsealed Core for the file, a clock the tests move by hand (no sleeps), and requests
 * through `core.handle` so ACL checks (including sudo) run exactly as for HTTP callers.
 * Policies are written straight to the barrier where `Core.aclFor` reads them.
 */
import { randomBytes } from 'node:crypto';
import type { Core } from '../../src/core/core';
import type { Database } from '../../src/storage/db';
import { rfc3339Nano } from '../../src/core/leases';
import { mountStoragePrefix } from '../../src/core/mounts';
import type { Capability } from '../../src/core/policy';
import type { AuthBlock, LogicalResponse, Operation } from '../../src/core/request';
import type { TestDatabase } from '../helpers/pg';
import { inProcessCore, ManualClock } from '../helpers/core';

const T0 = Date.parse('2026-03-01T00:00:00.000Z');
const SYSTEM_MAX = 32 * 24 * 3600;


let tdb: TestDatabase;
let database: Database;
let core: Core;
let root: string;
const clock = new ManualClock(T0);

beforeAll(async () => {
  ({ tdb, database, core, root } = await inProcessCore('token_backend', clock));
  await policy('creator', { 'auth/token/create': ['update'], 'auth/token/create-orphan': ['update'], 'auth/token/create/*': ['update'] });
  await policy('extra', {});
  await policy('ops', {});
});

afterAll(async () => {
  await database?.close();
  await tdb?.drop();
});

async function policy(name: string, rules: Record<string, Capability[]>): Promise<void> {
  await core.barrier.transaction((tx) => tx.put(`core/policies/acl/${name}`, { name, rules: Object.entries(rules).map(([path, capabilities]) => ({ path, capabilities })) }));
}

function call(operation: Operation, path: string, token: string, data: Record<string, unknown> = {}, query: Record<string, string> = {}): Promise<LogicalResponse> {
  return core.handle({ operation, path: `auth/token/${path}`, data, query, token, headers: {} });
}

async function create(data: Record<string, unknown>, token = root, path = 'create'): Promise<AuthBlock & { warnings?: string[] }> {
  const out = await call('update', path, token, data);
  return { ...out.auth!, warnings: out.warnings };
}

const self = async (token: string) => (await call('read', 'lookup-self', token)).data!;
const fails = (p: Promise<unknown>, kind: string, message?: string) => expect(p).rejects.toMatchObject({ kind, ...(message !== undefined ? { message } : {}) });

test('create: a child gets a subset of its parent\'s policies, plus default; display names and metadata', async () => {
  const parent = await create({ policies: ['creator', 'extra'], display_name: 'my app!', meta: { team: 'a' } });
  expect(parent).toMatchObject({
    policies: ['creator', 'default', 'extra'],
    token_policies: ['creator', 'default', 'extra'],
    metadata: { team: 'a' },
    lease_duration: SYSTEM_MAX,
    renewable: true,
    orphan: false,
    token_type: 'service',
  });
  expect(parent.client_token).toMatch(/^hvs\.[A-Za-z0-9]{24}$/);
  expect(parent.warnings).toBeUndefined();
  expect(await self(parent.client_token)).toMatchObject({ display_name: 'token-my-app', meta: { team: 'a' } });

  const p = parent.client_token;
  expect((await create({ policies: ['extra'] }, p)).policies).toEqual(['default', 'extra']);
  expect((await create({ policies: ['extra'], no_default_policy: true }, p)).policies).toEqual(['extra']);
  expect((await create({}, p)).policies).toEqual(['creator', 'default', 'extra']);
  await fails(create({ policies: ['extra', 'ops'] }, p), 'invalid_request', 'child policies must be subset of parent');
  await fails(create({ policies: ['root'] }, p), 'invalid_request', 'child policies must be subset of parent');

  // Root callers may assign anything; a policy that does not exist is a warning, not an error.
  const r = await create({ policies: 'ops,nope' });
  expect(r.policies).toEqual(['default', 'nope', 'ops']);
  expect(r.warnings).toEqual(['Policy "nope" does not exist']);
  // Without policies a root caller's child is another root token, which never expires.
  expect(await create({})).toMatchObject({ policies: ['root'], lease_duration: 0, renewable: false });
});

test('orphans: create-orphan needs only its path, no_parent needs sudo; orphans outlive their creator', async () => {
  const p = (await create({ policies: ['creator'] })).client_token;
  const orphan = await create({ policies: ['creator'] }, p, 'create-orphan');
  expect(orphan.orphan).toBe(true);
  await fails(create({ no_parent: true }, p), 'invalid_request', 'root or sudo privileges required to create orphan token');
  expect((await create({ no_parent: true, policies: ['extra'] })).orphan).toBe(true);

  await call('update', 'revoke', root, { token: p });
  await fails(self(p), 'permission_denied');
  expect(await self(orphan.client_token)).toMatchObject({ orphan: true });
});

test('revoke takes the whole subtree and its leases; revoke-orphan (sudo) leaves children as orphans', async () => {
  const a = await create({ policies: ['creator'] });
  const b = await create({ policies: ['creator'] }, a.client_token);
  const c = await create({ policies: ['creator'] }, b.client_token);
  const cRec = (await core.tokens.lookup(c.client_token))!;
  expect(await core.leases.repo.byToken(cRec.hmac)).toHaveLength(1);

  expect(await call('update', 'revoke', root, { token: a.client_token })).toEqual({ status: 204 });
  for (const t of [a, b, c]) await fails(self(t.client_token), 'permission_denied');
  expect(await core.leases.repo.byToken(cRec.hmac)).toHaveLength(0);
  // An unknown token revokes silently, as in Vault.
  expect(await call('update', 'revoke', root, { token: a.client_token })).toEqual({ status: 204 });

  const x = await create({ policies: ['creator'] });
  const y = await create({ policies: ['creator'] }, x.client_token);
  expect(await self(y.client_token)).toMatchObject({ orphan: false });
  await fails(call('update', 'revoke-orphan', x.client_token, { token: x.client_token }), 'permission_denied');
  expect(await call('update', 'revoke-orphan', root, { token: x.client_token })).toEqual({ status: 204 });
  await fails(self(x.client_token), 'permission_denied');
  expect(await self(y.client_token)).toMatchObject({ orphan: true });
  await fails(call('update', 'revoke-orphan', root, { token: x.client_token }), 'invalid_request', 'token to revoke not found');
});

test('lookup-self, lookup and lookup-accessor answer Vault\'s fields', async () => {
  const t0 = clock.now();
  const t = await create({ policies: ['extra'], ttl: '1h', explicit_max_ttl: '2h', meta: { team: 'a' }, display_name: 'app' });
  clock.advance(10);
  const expected = {
    accessor: t.accessor,
    creation_time: Math.floor(t0.getTime() / 1000),
    creation_ttl: 3600,
    display_name: 'token-app',
    entity_id: '',
    expire_time: rfc3339Nano(new Date(t0.getTime() + 3600_000)),
    explicit_max_ttl: 7200,
    id: t.client_token,
    issue_time: rfc3339Nano(t0),
    meta: { team: 'a' },
    num_uses: 0,
    orphan: false,
    path: 'auth/token/create',
    policies: ['default', 'extra'],
    renewable: true,
    ttl: 3590,
    type: 'service',
  };
  expect(expected.issue_time).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/); // Go's RFC3339Nano: no ".000"
  expect(await self(t.client_token)).toEqual(expected);
  expect((await call('update', 'lookup', root, { token: t.client_token })).data).toEqual(expected);
  expect((await call('read', 'lookup', root, {}, { token: t.client_token })).data).toEqual(expected);
  expect((await call('update', 'lookup-accessor', root, { accessor: t.accessor })).data).toEqual({ ...expected, id: '' });

  expect(await self(root)).toMatchObject({ policies: ['root'], path: 'auth/token/root', display_name: 'root', ttl: 0, expire_time: null, renewable: false, orphan: true, meta: null });
  await fails(call('update', 'lookup', root, { token: 'hvs.nosuchtoken' }), 'permission_denied', 'bad token');
  await fails(call('update', 'lookup-accessor', root, { accessor: 'nosuchaccessor' }), 'invalid_request', 'invalid accessor');
  // lookup needs its own capability: the default policy grants only lookup-self.
  await fails(call('update', 'lookup', t.client_token, { token: t.client_token }), 'permission_denied');
});

test('renew extends from now, capped by explicit_max_ttl, and moves the auth lease; expired tokens are refused', async () => {
  const t = await create({ policies: ['extra'], ttl: '1h', explicit_max_ttl: '2h' });
  const rec = (await core.tokens.lookup(t.client_token))!;
  clock.advance(1800);
  const r1 = await call('update', 'renew-self', t.client_token, { increment: '1h' });
  expect(r1.auth).toMatchObject({ client_token: t.client_token, accessor: t.accessor, lease_duration: 3600, renewable: true });
  const expires = new Date(clock.now().getTime() + 3600_000);
  expect(await self(t.client_token)).toMatchObject({ ttl: 3600, expire_time: rfc3339Nano(expires), creation_ttl: 3600, last_renewal: rfc3339Nano(clock.now()) });
  const [lease] = await core.leases.repo.byToken(rec.hmac);
  expect(lease).toMatchObject({ expiresAt: expires, ttlSeconds: 3600, lastRenewal: clock.now() });

  clock.advance(3000); // 80 minutes into a 2 h explicit max
  const r2 = await call('update', 'renew', root, { token: t.client_token, increment: 3600 });
  expect(r2.auth!.lease_duration).toBe(2400);
  expect(r2.warnings).toHaveLength(1);

  clock.advance(2400);
  await fails(self(t.client_token), 'permission_denied');
  await fails(call('update', 'renew', root, { token: t.client_token }), 'invalid_request', 'token not found');

  const fixed = await create({ policies: ['extra'], ttl: '1h', renewable: false });
  expect(fixed.renewable).toBe(false);
  await fails(call('update', 'renew-self', fixed.client_token), 'invalid_request', 'lease is not renewable');
  await fails(call('update', 'renew-self', root), 'invalid_request', 'lease is not renewable');
});

test('periodic tokens renew to their period whatever the increment; only sudo may ask for one', async () => {
  const t = await create({ policies: ['extra'], period: '1h', ttl: '5m' });
  expect(t.lease_duration).toBe(3600);
  expect(await self(t.client_token)).toMatchObject({ period: 3600, ttl: 3600 });
  clock.advance(3000);
  const r = await call('update', 'renew-self', t.client_token, { increment: '10h' });
  expect(r.auth!.lease_duration).toBe(3600);
  expect(await self(t.client_token)).toMatchObject({ ttl: 3600 });

  const p = (await create({ policies: ['creator'] })).client_token;
  await fails(create({ period: '1h' }, p), 'invalid_request', 'root or sudo privileges required to create periodic token');
});

test('accessors: listing needs sudo as well as list; batch tokens have none', async () => {
  await policy('lister', { 'auth/token/accessors/': ['list'] });
  await policy('sudo-lister', { 'auth/token/accessors/': ['list', 'sudo'] });
  const plain = await create({ policies: ['lister'] });
  const sudo = await create({ policies: ['sudo-lister'] });
  const batch = await create({ policies: ['extra'], type: 'batch' });
  await fails(call('list', 'accessors/', plain.client_token), 'permission_denied');
  const keys = (await call('list', 'accessors/', sudo.client_token)).data!.keys as string[];
  expect(keys).toEqual(expect.arrayContaining([plain.accessor, sudo.accessor]));
  const batchRec = (await core.tokens.lookup(batch.client_token))!;
  expect(keys).not.toContain(batchRec.accessor);
  expect((await call('list', 'accessors/', root)).data!.keys).toEqual(keys);
});

test('renew-accessor, revoke-accessor', async () => {
  const t = await create({ policies: ['extra'], ttl: '1h' });
  const r = await call('update', 'renew-accessor', root, { accessor: t.accessor, increment: 7200 });
  expect(r.auth).toMatchObject({ client_token: '', accessor: t.accessor, lease_duration: 7200 });
  expect(await self(t.client_token)).toMatchObject({ ttl: 7200 });
  await fails(call('update', 'renew-accessor', root, { accessor: 'nosuchaccessor' }), 'invalid_request', 'invalid accessor');

  expect(await call('update', 'revoke-accessor', root, { accessor: t.accessor })).toEqual({ status: 204 });
  await fails(self(t.client_token), 'permission_denied');
  expect((await call('update', 'revoke-accessor', root, { accessor: t.accessor })).warnings).toEqual(['No token found with this accessor']);
});

test('roles: CRUD as replicated data, and create/:role applies the role', async () => {
  await call('update', 'roles/ops', root, { allowed_policies: 'ops,extra', orphan: true, token_period: '1h', path_suffix: 'rev1' });
  const read = async () => (await call('read', 'roles/ops', root)).data!;
  expect(await read()).toMatchObject({
    name: 'ops', allowed_policies: ['extra', 'ops'], disallowed_policies: [], orphan: true, renewable: true,
    token_period: 3600, period: 0, path_suffix: 'rev1', token_type: 'default-service', token_explicit_max_ttl: 0,
  });
  // An update changes only the fields it names.
  await call('update', 'roles/ops', root, { renewable: false });
  expect(await read()).toMatchObject({ renewable: false, orphan: true, token_period: 3600, allowed_policies: ['extra', 'ops'] });
  await call('update', 'roles/ops', root, { renewable: true });
  expect((await call('list', 'roles/', root)).data).toEqual({ keys: ['ops'] });
  expect(await core.barrier.get(`${mountStoragePrefix(core.mounts.get('auth', 'token/')!)}roles/ops`)).not.toBeNull();

  // The role's allowed list replaces the subset rule: a caller without "ops" can grant it.
  const p = (await create({ policies: ['creator'] })).client_token;
  const t = await create({ policies: ['ops'] }, p, 'create/ops');
  expect(t).toMatchObject({ policies: ['default', 'ops'], orphan: true, lease_duration: 3600 });
  expect(await self(t.client_token)).toMatchObject({ path: 'auth/token/create/ops/rev1', role: 'ops', period: 3600 });
  expect((await create({}, p, 'create/ops')).policies).toEqual(['default', 'extra', 'ops']);
  await fails(create({ policies: ['root'] }, p, 'create/ops'), 'invalid_request');
  // role_name in the body of plain create is ignored (Vault): the role's path is what the ACL guards.
  await fails(create({ policies: ['ops'], role_name: 'ops' }, p), 'invalid_request', 'child policies must be subset of parent');

  await call('update', 'roles/strict', root, { disallowed_policies: 'extra' });
  await fails(create({ policies: ['extra'] }, root, 'create/strict'), 'invalid_request', 'token policy "extra" is disallowed by this role');
  await fails(call('update', 'roles/bad', root, { token_type: 'batch' }), 'invalid_request', "'token_type' cannot be 'batch' when role is set to generate non-orphan tokens");

  expect(await call('delete', 'roles/ops', root)).toMatchObject({ status: 204 });
  await fails(read(), 'not_found');
  await fails(create({}, p, 'create/ops'), 'invalid_request', 'unknown role ops');
});

test('batch tokens: hvb. prefix, no lease, no accessor, no renewal, no children; die with their parent', async () => {
  const p = (await create({ policies: ['creator'] })).client_token;
  const b = await create({ policies: ['creator'], type: 'batch', ttl: '10m' }, p);
  expect(b).toMatchObject({ accessor: '', renewable: false, token_type: 'batch', lease_duration: 600 });
  expect(b.client_token).toMatch(/^hvb\./);
  expect(await self(b.client_token)).toMatchObject({ type: 'batch', accessor: '', ttl: 600, renewable: false });
  const rec = (await core.tokens.lookup(b.client_token))!;
  expect(await core.leases.repo.byToken(rec.hmac)).toHaveLength(0);

  await fails(create({}, b.client_token), 'invalid_request', 'batch tokens cannot create more tokens');
  await fails(call('update', 'renew-self', b.client_token), 'invalid_request', 'batch tokens cannot be renewed');
  await fails(call('update', 'revoke-self', b.client_token), 'invalid_request', 'batch tokens cannot be revoked');
  await fails(create({ type: 'batch', period: '1h' }), 'invalid_request', 'batch tokens cannot have "period" set');
  await fails(create({ type: 'batch' }), 'invalid_request', 'batch tokens cannot be root tokens');

  await call('update', 'revoke', root, { token: p });
  await fails(self(b.client_token), 'permission_denied');
});

test('custom ids need root or sudo and must be new', async () => {
  const t = await create({ id: 'my-custom-token', policies: ['extra'] });
  expect(t.client_token).toBe('my-custom-token');
  await fails(create({ id: 'my-custom-token' }), 'invalid_request', 'cannot create a token with a duplicate ID');
  await fails(create({ id: 'hvs.abc' }), 'invalid_request', "custom token ID cannot have the 'hvs.' prefix");
  const p = (await create({ policies: ['creator'] })).client_token;
  await fails(create({ id: 'another' }, p), 'invalid_request', 'root or sudo privileges required to specify token id');
});

test('num_uses: the last use leaves a dead token (not an unlimited one) that tidy revokes', async () => {
  const t = await create({ policies: ['creator'], num_uses: 3 });
  // A refused request still spends a use (as in Vault): 2 left.
  await fails(create({}, t.client_token), 'invalid_request', 'restricted use token cannot generate child tokens');
  const rec = (await core.tokens.lookup(t.client_token))!;
  expect(await core.tokens.use(rec)).toBe('ok');
  expect(await core.tokens.use(rec)).toBe('last');
  expect(await core.tokens.lookup(t.client_token)).toBeNull();
  expect(await core.tokens.use(rec)).toBe('exhausted');
  await call('update', 'tidy', root);
  expect(await core.tokens.repo.byHmac(rec.hmac)).toBeNull();
});

test('num_uses through requests: the last authorised request revokes the token', async () => {
  const t = await create({ policies: ['creator'], num_uses: 2 });
  expect((await call('read', 'lookup-self', t.client_token)).data!.num_uses).toBe(1);
  await call('read', 'lookup-self', t.client_token);
  expect(await core.tokens.lookup(t.client_token)).toBeNull();
  await fails(call('read', 'lookup-self', t.client_token), 'permission_denied');
});

test('tidy revokes tokens whose parent is gone and leases whose token is gone', async () => {
  const ghost = { ...(await core.tokens.lookup(root))!, hmac: randomBytes(32) };
  const { record: stray } = await core.tokens.create({ policies: ['default'], parent: ghost, ttlSeconds: 3600 });
  const leaseId = `auth/token/create/${randomBytes(8).toString('hex')}`;
  await core.leases.repo.insert({
    leaseId, tokenHmac: randomBytes(32), kind: 'auth', path: 'auth/token/create', issuedAt: clock.now(), lastRenewal: null,
    expiresAt: null, ttlSeconds: 0, maxExpiresAt: null, renewable: false,
  });
  const out = await call('update', 'tidy', root);
  expect(out.warnings).toHaveLength(1);
  expect(await core.tokens.repo.byHmac(stray.hmac)).toBeNull();
  expect(await core.leases.repo.get(leaseId)).toBeNull();
});

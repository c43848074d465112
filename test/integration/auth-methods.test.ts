/**
 * Auth methods end to end through `core.handle`, in this process, on real Postgres (one
 * throwaway database for the file): sys/auth enable/list/tune/disable, userpass and AppRole
 * logins, and what ends up in the database (no password or secret ID in the clear, anywhere).
 *
 * Time is injected: the AppRole secret-ID TTL test moves a Clock forward instead of sleeping.
 */
import type { Clock } from '../../src/core/clock';
import type { Core } from '../../src/core/core';
import type { Database } from '../../src/storage/db';
import type { LogicalResponse, Operation } from '../../src/core/request';
import { toHttpError, type HttpError } from '../../src/http/errors';
import { sqlClient, type TestDatabase } from '../helpers/pg';
import { inProcessCore } from '../helpers/core';

let tdb: TestDatabase;
let database: Database;
let core: Core;
let root: string;
let offsetMs = 0;
const clock: Clock = { now: () => new Date(Date.now() + offsetMs) };

/** Every credential a test hands the server, to look for in the database at the end. */
const plaintexts: string[] = [];

beforeAll(async () => {
  ({ tdb, database, core, root } = await inProcessCore('auth_methods', clock));
});

afterAll(async () => {
  await database?.close();
  await tdb?.drop();
});

interface CallOpts {
  token?: string | null;
  remoteAddr?: string;
}

function call(operation: Operation, path: string, data: Record<string, unknown> = {}, o: CallOpts = {}): Promise<LogicalResponse> {
  return core.handle({ operation, path, data, query: {}, token: o.token === undefined ? root : o.token, headers: {}, remoteAddr: o.remoteAddr ?? '127.0.0.1' });
}

/** The HTTP error a failing call turns into (status and Vault's messages). */
async function fail(operation: Operation, path: string, data: Record<string, unknown> = {}, o: CallOpts = {}): Promise<HttpError> {
  try {
    await call(operation, path, data, o);
  } catch (err) {
    return toHttpError(err);
  }
  throw new Error(`${operation} ${path} succeeded; expected an error`);
}

const login = (mount: string, user: string, password: string, o: CallOpts = {}) => call('update', `auth/${mount}/login/${user}`, { password }, { token: null, ...o });
const approleLogin = (data: Record<string, unknown>, o: CallOpts = {}) => call('update', 'auth/approle/login', data, { token: null, ...o });

test('sys/auth: enable at default and custom paths, list, read, tune, refuse what Vault refuses', async () => {
  const enabled = await call('update', 'sys/auth/userpass', { type: 'userpass' });
  expect(enabled.status).toBe(204);
  expect(enabled.walLsn).toBeGreaterThan(0); // → X-Vault-Index
  await call('update', 'sys/auth/people', { type: 'userpass', description: 'humans', config: { default_lease_ttl: '1h' } });

  const list = (await call('read', 'sys/auth')).data!;
  expect(Object.keys(list).sort()).toEqual(['people/', 'token/', 'userpass/']);
  expect(list['token/']).toMatchObject({ type: 'token' });
  expect(list['people/']).toEqual({
    accessor: expect.stringMatching(/^userpass_/),
    config: { default_lease_ttl: 3600, max_lease_ttl: 0, token_type: 'default-service', force_no_cache: false },
    description: 'humans',
    external_entropy_access: false,
    local: false,
    options: null,
    plugin_version: '',
    running_plugin_version: '',
    running_sha256: '',
    seal_wrap: false,
    type: 'userpass',
    uuid: expect.stringMatching(/^[0-9a-f-]{36}$/),
  });
  expect((await call('read', 'sys/auth/people')).data).toEqual(list['people/']);

  const tuned = await call('update', 'sys/auth/people/tune', { default_lease_ttl: '30m', max_lease_ttl: 7200, description: 'people' });
  expect(tuned.walLsn).toBeGreaterThan(0);
  expect((await call('read', 'sys/auth/people/tune')).data).toMatchObject({ default_lease_ttl: 1800, max_lease_ttl: 7200, token_type: 'default-service', description: 'people' });
  // A nested mount path is tuned the same way.
  await call('update', 'sys/auth/team/eu', { type: 'approle' });
  await call('update', 'sys/auth/team/eu/tune', { max_lease_ttl: '2h' });
  expect((await call('read', 'sys/auth/team/eu/tune')).data).toMatchObject({ max_lease_ttl: 7200 });
  expect((await call('delete', 'sys/auth/team/eu')).status).toBe(204);
  expect(await fail('update', 'sys/auth/people/tune', { default_lease_ttl: '3h' })).toEqual({ status: 400, errors: ['default_lease_ttl cannot be greater than max_lease_ttl'] });

  expect(await fail('update', 'sys/auth/ldap', { type: 'ldap' })).toEqual({ status: 400, errors: ['plugin not found in the catalog: ldap'] });
  expect(await fail('update', 'sys/auth/userpass', { type: 'userpass' })).toEqual({ status: 400, errors: ['path is already in use at auth/userpass/'] });
  expect((await fail('update', 'sys/auth/token', { type: 'userpass' })).status).toBe(400);
  expect(await fail('delete', 'sys/auth/token')).toEqual({ status: 400, errors: ['token credential backend cannot be disabled'] });
  expect(await fail('read', 'sys/auth/nowhere')).toEqual({ status: 400, errors: ['No auth engine at nowhere/'] });
  // Enabling needs sudo: an ordinary token is refused before anything is checked.
  const plain = await core.tokens.create({ policies: ['default'], orphan: true });
  expect((await fail('update', 'sys/auth/other', { type: 'userpass' }, { token: plain.token })).status).toBe(403);
});

test('userpass: users, login, identical failure for wrong password and unknown user, password and policy changes', async () => {
  plaintexts.push('s3cret-Bob-pw', 'n3w-Bob-pw', 'guessed-pw');
  // Usernames are lowercased, as in Vault.
  await call('update', 'auth/userpass/users/Bob', { password: 's3cret-Bob-pw', token_policies: 'dev,Ops', token_ttl: '1h' });
  const user = (await call('read', 'auth/userpass/users/bob')).data!;
  expect(user).toEqual({
    token_bound_cidrs: [],
    token_explicit_max_ttl: 0,
    token_max_ttl: 0,
    token_no_default_policy: false,
    token_num_uses: 0,
    token_period: 0,
    token_policies: ['dev', 'ops'],
    token_ttl: 3600,
    token_type: 'default',
  });
  expect((await call('list', 'auth/userpass/users/')).data).toEqual({ keys: ['bob'] });

  const res = await login('userpass', 'BOB', 's3cret-Bob-pw');
  const auth = res.auth!;
  expect(auth).toMatchObject({
    policies: ['default', 'dev', 'ops'],
    token_policies: ['default', 'dev', 'ops'],
    metadata: { username: 'bob' },
    lease_duration: 3600,
    renewable: true,
    token_type: 'service',
    orphan: true,
  });
  expect(auth.client_token).toMatch(/^hvs\./);
  const rec = await core.tokens.lookup(auth.client_token);
  expect(rec).toMatchObject({ displayName: 'userpass-bob', path: 'auth/userpass/login/bob', accessor: auth.accessor });
  expect(await core.leases.repo.idsWithPrefix('auth/userpass/login/bob/')).toHaveLength(1);

  const wrong = await fail('update', 'auth/userpass/login/bob', { password: 'guessed-pw' }, { token: null });
  const unknown = await fail('update', 'auth/userpass/login/mallory', { password: 'guessed-pw' }, { token: null });
  expect(wrong).toEqual({ status: 400, errors: ['invalid username or password'] });
  expect(unknown).toEqual(wrong);

  await call('update', 'auth/userpass/users/bob/password', { password: 'n3w-Bob-pw' });
  expect((await fail('update', 'auth/userpass/login/bob', { password: 's3cret-Bob-pw' }, { token: null })).status).toBe(400);
  await call('update', 'auth/userpass/users/bob/policies', { policies: ['admin'] });
  expect((await login('userpass', 'bob', 'n3w-Bob-pw')).auth!.policies).toEqual(['admin', 'default']);
  // Set through the legacy name, echoed back under it too; other settings survived both updates.
  expect((await call('read', 'auth/userpass/users/bob')).data).toMatchObject({ policies: ['admin'], token_policies: ['admin'], token_ttl: 3600 });

  expect(await fail('update', 'auth/userpass/users/nobody/password', { password: 'x' })).toEqual({ status: 400, errors: ['username does not exist'] });
  expect(await fail('update', 'auth/userpass/users/carl', {})).toEqual({ status: 400, errors: ['missing password'] });
});

test('userpass: the mount config sets the TTL, display names follow the mount path, token_bound_cidrs limit logins', async () => {
  plaintexts.push('carol-pw-8h2k');
  await call('update', 'auth/people/users/carol', { password: 'carol-pw-8h2k', token_bound_cidrs: ['10.0.0.0/8'] });
  expect((await fail('update', 'auth/people/login/carol', { password: 'carol-pw-8h2k' }, { token: null })).status).toBe(403);
  const auth = (await login('people', 'carol', 'carol-pw-8h2k', { remoteAddr: '::ffff:10.1.2.3' })).auth!;
  expect(auth.lease_duration).toBe(1800); // the tuned default_lease_ttl of people/
  expect(auth.policies).toEqual(['default']);
  expect((await core.tokens.lookup(auth.client_token))!.displayName).toBe('people-carol');
});

test('sys/auth disable: revokes the tokens and leases the method issued and erases its users', async () => {
  plaintexts.push('dave-pw-77');
  await call('update', 'auth/people/users/dave', { password: 'dave-pw-77' });
  const token = (await login('people', 'dave', 'dave-pw-77')).auth!.client_token;
  expect((await core.leases.repo.idsWithPrefix('auth/people/')).length).toBeGreaterThanOrEqual(2);
  const mount = core.mounts.get('auth', 'people/')!;

  const res = await call('delete', 'sys/auth/people');
  expect(res.status).toBe(204);
  expect(res.walLsn).toBeGreaterThan(0);
  expect(await core.leases.repo.idsWithPrefix('auth/people/')).toEqual([]);
  expect(await core.tokens.lookup(token)).toBeNull();
  expect(await core.barrier.list(`auth/${mount.uuid}/`)).toEqual([]);
  expect((await call('read', 'sys/auth')).data!['people/']).toBeUndefined();
  // The route is gone (an anonymous caller learns only "permission denied", as in Vault).
  expect((await fail('update', 'auth/people/login/dave', { password: 'dave-pw-77' })).status).toBe(404);
  expect((await fail('update', 'auth/people/login/dave', { password: 'dave-pw-77' }, { token: null })).status).toBe(403);
  // userpass/ is untouched.
  expect(await core.leases.repo.idsWithPrefix('auth/userpass/login/')).toHaveLength(2);
});

test('approle: role, role-id, secret-id with num_uses=2 allows exactly two logins', async () => {
  await call('update', 'sys/auth/approle', { type: 'approle' });
  await call('update', 'auth/approle/role/Web', { token_policies: 'app', token_ttl: '10m', secret_id_num_uses: 5 });
  expect((await call('list', 'auth/approle/role/')).data).toEqual({ keys: ['web'] });
  expect((await call('read', 'auth/approle/role/web')).data).toMatchObject({
    bind_secret_id: true,
    secret_id_num_uses: 5,
    secret_id_ttl: 0,
    secret_id_bound_cidrs: [],
    local_secret_ids: false,
    token_policies: ['app'],
    token_ttl: 600,
  });
  const roleId = (await call('read', 'auth/approle/role/web/role-id')).data!.role_id as string;
  expect(roleId).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);

  expect(await fail('update', 'auth/approle/role/web/secret-id', { num_uses: 6 })).toEqual({ status: 400, errors: ["num_uses cannot be higher than the role's secret_id_num_uses"] });
  const gen = await call('update', 'auth/approle/role/web/secret-id', { num_uses: 2, metadata: '{"env":"prod"}' });
  expect(gen.walLsn).toBeGreaterThan(0);
  const sid = gen.data as { secret_id: string; secret_id_accessor: string; secret_id_num_uses: number; secret_id_ttl: number };
  expect(sid).toEqual({ secret_id: expect.any(String), secret_id_accessor: expect.any(String), secret_id_num_uses: 2, secret_id_ttl: 0 });
  plaintexts.push(roleId, sid.secret_id);

  const first = await approleLogin({ role_id: roleId, secret_id: sid.secret_id });
  expect(first.auth).toMatchObject({ policies: ['app', 'default'], metadata: { env: 'prod', role_name: 'web' }, lease_duration: 600, renewable: true, orphan: true });
  expect((await core.tokens.lookup(first.auth!.client_token))).toMatchObject({ displayName: 'approle', path: 'auth/approle/login' });
  expect(first.walLsn).toBeGreaterThan(0); // a use was consumed
  expect((await call('update', 'auth/approle/role/web/secret-id/lookup', { secret_id: sid.secret_id })).data).toMatchObject({ secret_id_num_uses: 1 });
  await approleLogin({ role_id: roleId, secret_id: sid.secret_id });
  const third = await fail('update', 'auth/approle/login', { role_id: roleId, secret_id: sid.secret_id }, { token: null });
  expect(third).toEqual({ status: 400, errors: ['invalid role or secret ID'] });
  // An unknown role ID fails alike; a missing secret ID says so.
  expect(await fail('update', 'auth/approle/login', { role_id: 'no-such-role', secret_id: sid.secret_id }, { token: null })).toEqual(third);
  expect(await fail('update', 'auth/approle/login', { role_id: roleId }, { token: null })).toEqual({ status: 400, errors: ['missing secret_id'] });
  expect(await core.leases.repo.idsWithPrefix('auth/approle/login/')).toHaveLength(2);

  // A custom role ID replaces the old one for logins.
  await call('update', 'auth/approle/role/web/role-id', { role_id: 'web-custom-role-id' });
  plaintexts.push('web-custom-role-id');
  const sid2 = (await call('update', 'auth/approle/role/web/secret-id', {})).data!.secret_id as string;
  plaintexts.push(sid2);
  expect((await approleLogin({ role_id: 'web-custom-role-id', secret_id: sid2 })).auth!.metadata).toEqual({ role_name: 'web' });
  expect((await fail('update', 'auth/approle/login', { role_id: roleId, secret_id: sid2 }, { token: null })).status).toBe(400);
});

test('approle: concurrent logins with a limited secret ID consume distinct uses', async () => {
  await call('update', 'auth/approle/role/race', { token_policies: 'p' });
  const roleId = (await call('read', 'auth/approle/role/race/role-id')).data!.role_id as string;
  const sid = (await call('update', 'auth/approle/role/race/secret-id', { num_uses: 3 })).data!.secret_id as string;
  plaintexts.push(roleId, sid);
  const results = await Promise.allSettled(Array.from({ length: 6 }, () => approleLogin({ role_id: roleId, secret_id: sid })));
  expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(3);
  for (const r of results) if (r.status === 'rejected') expect(toHttpError(r.reason)).toEqual({ status: 400, errors: ['invalid role or secret ID'] });
});

test('approle: accessors list, look up and destroy secret IDs; custom secret IDs; role delete removes them', async () => {
  await call('update', 'auth/approle/role/batch', { token_policies: ['jobs'] });
  const roleId = (await call('read', 'auth/approle/role/batch/role-id')).data!.role_id as string;
  const a = (await call('update', 'auth/approle/role/batch/secret-id', { cidr_list: '127.0.0.0/8' })).data!;
  const b = (await call('update', 'auth/approle/role/batch/custom-secret-id', { secret_id: 'my-own-secret-id-123' })).data!;
  plaintexts.push(a.secret_id as string, 'my-own-secret-id-123');
  expect(b.secret_id).toBe('my-own-secret-id-123');
  expect(await fail('update', 'auth/approle/role/batch/custom-secret-id', { secret_id: 'my-own-secret-id-123' })).toEqual({ status: 400, errors: ['SecretID is already registered'] });

  const keys = (await call('list', 'auth/approle/role/batch/secret-id/')).data!.keys as string[];
  expect(keys.sort()).toEqual([a.secret_id_accessor, b.secret_id_accessor].sort());
  const looked = (await call('update', 'auth/approle/role/batch/secret-id-accessor/lookup', { secret_id_accessor: a.secret_id_accessor })).data!;
  expect(looked).toMatchObject({ secret_id_accessor: a.secret_id_accessor, secret_id_num_uses: 0, cidr_list: ['127.0.0.0/8'], expiration_time: '0001-01-01T00:00:00Z', metadata: {} });
  expect(looked).not.toHaveProperty('secret_id');

  // cidr_list binds the secret ID to a network.
  expect((await fail('update', 'auth/approle/login', { role_id: roleId, secret_id: a.secret_id }, { token: null, remoteAddr: '192.0.2.1' })).status).toBe(400);
  await approleLogin({ role_id: roleId, secret_id: a.secret_id });

  await call('update', 'auth/approle/role/batch/secret-id-accessor/destroy', { secret_id_accessor: a.secret_id_accessor });
  expect((await fail('update', 'auth/approle/login', { role_id: roleId, secret_id: a.secret_id }, { token: null })).status).toBe(400);
  expect((await call('update', 'auth/approle/role/batch/secret-id/lookup', { secret_id: a.secret_id })).status).toBe(204);
  expect((await fail('update', 'auth/approle/role/batch/secret-id-accessor/lookup', { secret_id_accessor: a.secret_id_accessor })).status).toBe(404);

  await call('delete', 'auth/approle/role/batch/secret-id/destroy', { secret_id: 'my-own-secret-id-123' });
  expect((await fail('list', 'auth/approle/role/batch/secret-id/')).status).toBe(404);

  await call('update', 'auth/approle/role/batch/custom-secret-id', { secret_id: 'another-own-secret-id' });
  plaintexts.push('another-own-secret-id');
  await call('delete', 'auth/approle/role/batch');
  expect((await fail('read', 'auth/approle/role/batch')).status).toBe(404);
  const base = `auth/${core.mounts.get('auth', 'approle/')!.uuid}/`;
  expect(await core.barrier.list(`${base}secret-id/batch/`)).toEqual([]);
  expect(await core.barrier.list(`${base}secret-id-accessor/batch/`)).toEqual([]);
  expect((await fail('update', 'auth/approle/login', { role_id: roleId, secret_id: 'another-own-secret-id' }, { token: null })).status).toBe(400);
});

test('approle: bind_secret_id=false logs in with the role ID alone, from the bound network only', async () => {
  expect(await fail('update', 'auth/approle/role/open', { bind_secret_id: false })).toEqual({ status: 400, errors: ['at least one constraint should be enabled on the role'] });
  await call('update', 'auth/approle/role/open', { bind_secret_id: false, secret_id_bound_cidrs: '127.0.0.1/32', token_policies: 'svc' });
  const roleId = (await call('read', 'auth/approle/role/open/role-id')).data!.role_id as string;
  plaintexts.push(roleId);
  const res = await approleLogin({ role_id: roleId });
  expect(res.auth).toMatchObject({ policies: ['default', 'svc'], metadata: { role_name: 'open' } });
  expect(await fail('update', 'auth/approle/login', { role_id: roleId }, { token: null, remoteAddr: '10.0.0.1' })).toEqual({
    status: 400,
    errors: ['source address "10.0.0.1" unauthorized by CIDR restrictions on the role'],
  });
  expect(await fail('update', 'auth/approle/role/open/secret-id', {})).toEqual({ status: 400, errors: ['bind_secret_id is not set on the role'] });
});

test('approle: a secret ID stops working once its TTL has passed (injected clock)', async () => {
  await call('update', 'auth/approle/role/short', { token_policies: 'p', secret_id_ttl: '60s' });
  const roleId = (await call('read', 'auth/approle/role/short/role-id')).data!.role_id as string;
  const gen = (await call('update', 'auth/approle/role/short/secret-id', {})).data!;
  plaintexts.push(roleId, gen.secret_id as string);
  expect(gen.secret_id_ttl).toBe(60);
  await approleLogin({ role_id: roleId, secret_id: gen.secret_id });
  try {
    offsetMs = 61_000;
    // The root token has no TTL, so it still works with the clock moved.
    expect((await call('update', 'auth/approle/role/short/secret-id/lookup', { secret_id: gen.secret_id })).status).toBe(204);
    expect(await fail('update', 'auth/approle/login', { role_id: roleId, secret_id: gen.secret_id }, { token: null })).toEqual({ status: 400, errors: ['invalid role or secret ID'] });
  } finally {
    offsetMs = 0;
  }
  // The failed login deleted the expired entry: it is gone even with the clock back.
  expect((await fail('list', 'auth/approle/role/short/secret-id/')).status).toBe(404);
});

test('the database holds no password, secret ID or role ID in the clear', async () => {
  expect(plaintexts.length).toBeGreaterThan(10);
  const q = await sqlClient(tdb.url);
  try {
    const rows = [
      ...(await q.query<{ path: string; value: Buffer | null }>('SELECT path, value FROM coffer_entries')).rows,
      ...(await q.query<{ path: string; value: Buffer | null }>('SELECT path, value FROM coffer_local_entries')).rows,
      ...(await q.query<{ path: string; value: Buffer | null }>('SELECT path, value_hash AS value FROM coffer_wal')).rows,
    ];
    const tokens = (await q.query<{ row: string }>('SELECT row_to_json(t)::text AS row FROM coffer_tokens t')).rows;
    expect(rows.some((r) => r.path.includes('/user/bob'))).toBe(true);
    for (const secret of plaintexts) {
      const needle = Buffer.from(secret);
      for (const r of rows) {
        expect(r.path.includes(secret)).toBe(false);
        expect(r.value?.includes(needle) ?? false).toBe(false);
      }
      for (const t of tokens) expect(t.row.includes(secret)).toBe(false);
    }
  } finally {
    await q.end();
  }
});

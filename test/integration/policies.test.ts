/**
 * ACL policies end to end, in this process, against real Postgres: policies written through
 * sys/policies/acl and sys/policy, tokens carrying them, and KV v2 requests allowed or refused
 * by Core.handle exactly as the HTTP layer would drive it (no HTTP here).
 */
import { systemClock } from '../../src/core/clock';
import { Core } from '../../src/core/core';
import { NotFound, PermissionDenied } from '../../src/core/errors';
import type { LogicalResponse, Operation } from '../../src/core/request';
import { toHttpError } from '../../src/http/errors';
import { openPostgres, type Database } from '../../src/storage/db';
import { migrateToLatest } from '../../src/storage/migrate';
import { pgStore } from '../../src/storage/pg-store';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';

let tdb: TestDatabase;
let database: Database;
let core: Core;
let root: string;

function call(operation: Operation, path: string, data: Record<string, unknown> = {}, token: string | null = root): Promise<LogicalResponse> {
  return core.handle({ operation, path, data, query: {}, token, headers: {} });
}

/** The HTTP status and errors a rejected call would produce (through the one error table). */
async function failure(p: Promise<unknown>): Promise<{ status: number; errors: string[]; err: unknown }> {
  try {
    await p;
  } catch (err) {
    return { ...toHttpError(err), err };
  }
  throw new Error('expected the call to fail');
}

async function denied(p: Promise<unknown>): Promise<void> {
  const f = await failure(p);
  expect(f.err).toBeInstanceOf(PermissionDenied);
  expect(f.status).toBe(403);
}

async function putPolicy(name: string, policy: string): Promise<LogicalResponse> {
  return call('update', `sys/policies/acl/${name}`, { policy });
}

/** A token with `default` (tokens.create does not add it, unlike Vault) plus `policies`. */
async function tokenWith(...policies: string[]): Promise<string> {
  return (await core.tokens.create({ policies: ['default', ...policies], ttlSeconds: 3600 })).token;
}

const writeKv = (path: string, token: string, data: Record<string, unknown> = { v: 1 }) => call('update', `secret/data/${path}`, { data }, token);
const readKv = (path: string, token: string) => call('read', `secret/data/${path}`, {}, token);

const APP_RW = `
# The app's own secrets, but never its admin area.
path "secret/data/app/*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "secret/metadata/app/*" {
  capabilities = ["list", "read"]
}
path "secret/data/app/admin/*" {
  capabilities = ["deny"]
}
`;

beforeAll(async () => {
  tdb = await createTestDatabase('policies');
  database = openPostgres(tdb.url, 4);
  await migrateToLatest(database.db);
  core = new Core({ store: pgStore(database.db), clock: systemClock, version: 'test' });
  const init = await core.initialize(1, 1);
  await core.unseal(init.keys[0]);
  root = init.rootToken;
  await call('update', 'sys/mounts/secret', { type: 'kv', options: { version: '2' } });
  for (const p of ['app/existing', 'app/admin/key', 'other/x', 'drop/existing']) await writeKv(p, root, { seed: p });
});

afterAll(async () => {
  await database?.close();
  await tdb?.drop();
});

describe('policy CRUD', () => {
  test('write (HCL) returns 204 with a WAL index; read returns the text; names are lowercased', async () => {
    const out = await putPolicy('App-RW', APP_RW);
    expect(out.status).toBe(204);
    expect(out.data ?? null).toBeNull();
    expect(out.walLsn).toBeGreaterThan(0);
    const read = await call('read', 'sys/policies/acl/app-rw');
    expect(read.data).toEqual({ name: 'app-rw', policy: APP_RW });
    // Stored as replicated data in the shape Core.aclFor reads.
    const stored = await core.barrier.get<{ name: string; raw: string; rules: unknown[] }>('core/policies/acl/app-rw');
    expect(stored).toMatchObject({ name: 'app-rw', raw: APP_RW });
    expect(stored!.rules).toHaveLength(3);
  });

  test('JSON and base64 bodies are accepted; read returns the decoded text', async () => {
    const json = JSON.stringify({ path: { 'secret/data/drop/*': { capabilities: ['create'] } } });
    await putPolicy('creator', json);
    expect((await call('read', 'sys/policies/acl/creator')).data).toEqual({ name: 'creator', policy: json });
    const hcl = 'path "secret/*" { capabilities = ["read", "list"] }';
    await putPolicy('broad', Buffer.from(hcl).toString('base64'));
    expect((await call('read', 'sys/policies/acl/broad')).data).toEqual({ name: 'broad', policy: hcl });
  });

  test('the legacy API: sys/policy/:name with `rules`, read back as `rules`', async () => {
    const rules = 'path "secret/data/drop/*" { capabilities = ["update"] }';
    const out = await call('update', 'sys/policy/updater', { rules });
    expect(out.warnings).toEqual(["'rules' is deprecated, please use 'policy' instead"]);
    expect((await call('read', 'sys/policy/updater')).data).toEqual({ name: 'updater', rules });
    expect((await call('update', 'sys/policy/updater', { policy: rules })).status).toBe(204);
  });

  test('lists include default and root (root last), legacy list has `policies` too', async () => {
    const list = await call('list', 'sys/policies/acl/');
    expect(list.data).toEqual({ keys: ['app-rw', 'broad', 'creator', 'default', 'updater', 'root'] });
    const legacy = await call('read', 'sys/policy');
    expect(legacy.data).toEqual({ keys: list.data!.keys, policies: list.data!.keys });
  });

  test('root and default read without being stored; a missing policy is 404', async () => {
    expect((await call('read', 'sys/policies/acl/root')).data).toEqual({ name: 'root', policy: '' });
    const def = (await call('read', 'sys/policies/acl/default')).data as { policy: string };
    expect(def.policy).toContain('path "auth/token/lookup-self"');
    const f = await failure(call('read', 'sys/policies/acl/nope'));
    expect(f.err).toBeInstanceOf(NotFound);
    expect(f.status).toBe(404);
  });

  test('root cannot be written or deleted, default cannot be deleted', async () => {
    expect(await failure(putPolicy('root', 'path "a" { capabilities = ["read"] }'))).toMatchObject({ status: 400, errors: ['cannot update "root" policy'] });
    expect(await failure(call('delete', 'sys/policies/acl/root'))).toMatchObject({ status: 400, errors: ['cannot delete "root" policy'] });
    expect(await failure(call('delete', 'sys/policy/default'))).toMatchObject({ status: 400, errors: ['cannot delete default policy'] });
  });

  test('invalid or empty policies are 400 and name the problem', async () => {
    expect(await failure(putPolicy('bad', 'path "a" { capabilities = ["reed"] }'))).toMatchObject({ status: 400, errors: ['failed to parse policy: path "a": invalid capability "reed"'] });
    expect(await failure(putPolicy('bad', ''))).toMatchObject({ status: 400, errors: ["'policy' parameter not supplied or empty"] });
    await expect(core.barrier.get('core/policies/acl/bad')).resolves.toBeNull();
  });

  test('the policy text is encrypted at rest', async () => {
    const c = await sqlClient(tdb.url);
    try {
      const { rows } = await c.query<{ value: Buffer }>("SELECT value FROM coffer_entries WHERE path = 'core/policies/acl/app-rw'");
      expect(rows).toHaveLength(1);
      expect(rows[0].value.toString('latin1')).not.toContain('secret/data/app');
    } finally {
      await c.end();
    }
  });
});

describe('enforcement on KV v2', () => {
  let app: string;
  beforeAll(async () => {
    app = await tokenWith('app-rw');
  });

  test('reads and writes under secret/data/app/ are allowed, elsewhere denied', async () => {
    expect((await readKv('app/existing', app)).data).toMatchObject({ data: { seed: 'app/existing' } });
    await writeKv('app/new', app);
    await writeKv('app/existing', app, { v: 2 });
    await denied(readKv('other/x', app));
    await denied(writeKv('other/y', app));
    await denied(call('read', 'sys/mounts', {}, app));
  });

  test('LIST on the metadata folder is allowed, elsewhere denied', async () => {
    expect((await call('list', 'secret/metadata/app/', {}, app)).data).toMatchObject({ keys: expect.arrayContaining(['existing', 'new']) });
    await denied(call('list', 'secret/metadata/', {}, app));
    await denied(call('list', 'secret/metadata/other/', {}, app));
  });

  test('a more specific deny beats the broader grant, in the same policy', async () => {
    await denied(readKv('app/admin/key', app));
    await denied(writeKv('app/admin/new', app));
  });

  test('deny in one policy beats a broader grant from another', async () => {
    await putPolicy('no-admin', 'path "secret/data/app/admin/*" { capabilities = ["deny"] }');
    const t = await tokenWith('broad', 'no-admin');
    expect((await readKv('other/x', t)).data).toMatchObject({ data: { seed: 'other/x' } });
    expect((await readKv('app/admin/key', await tokenWith('broad'))).data).toMatchObject({ data: { seed: 'app/admin/key' } });
    await denied(readKv('app/admin/key', t));
    // `broad` grants read and list only.
    await denied(writeKv('other/x', t));
  });

  test('create-only can write a new key but not overwrite one (KV existence check)', async () => {
    const t = await tokenWith('creator');
    await writeKv('drop/new-1', t);
    await denied(writeKv('drop/new-1', t));
    await denied(writeKv('drop/existing', t));
    await denied(readKv('drop/new-1', t));
  });

  test('update-only can overwrite an existing key but not create one', async () => {
    const t = await tokenWith('updater');
    await writeKv('drop/existing', t, { v: 2 });
    await denied(writeKv('drop/new-2', t));
  });

  test('a policy change applies to existing tokens on their next request; delete revokes', async () => {
    const t = await tokenWith('creator');
    await denied(readKv('drop/existing', t));
    await putPolicy('creator', 'path "secret/data/drop/*" { capabilities = ["create", "read"] }');
    expect((await readKv('drop/existing', t)).data).toBeTruthy();
    const del = await call('delete', 'sys/policies/acl/creator');
    expect(del.status).toBe(204);
    expect(del.walLsn).toBeGreaterThan(0);
    await denied(readKv('drop/existing', t));
    expect((await failure(call('read', 'sys/policies/acl/creator'))).status).toBe(404);
    // Deleting what is not there is still 204.
    expect((await call('delete', 'sys/policies/acl/creator')).status).toBe(204);
  });

  test('a token without the default policy cannot even look itself up', async () => {
    const bare = (await core.tokens.create({ policies: ['app-rw'] })).token;
    await denied(call('update', 'sys/capabilities-self', { paths: ['secret/data/app/x'] }, bare));
  });
});

describe('sudo', () => {
  // sys/rotate is root-protected in Vault (PathsSpecial.Root).
  test('a root-protected route needs sudo besides the capability', async () => {
    await putPolicy('rotate-nosudo', 'path "sys/rotate" { capabilities = ["update"] }');
    await putPolicy('rotate-sudo', 'path "sys/rotate" { capabilities = ["update", "sudo"] }');
    await putPolicy('rotate-sudo-only', 'path "sys/rotate" { capabilities = ["sudo"] }');
    await denied(call('update', 'sys/rotate', {}, await tokenWith('rotate-nosudo')));
    await denied(call('update', 'sys/rotate', {}, await tokenWith('rotate-sudo-only')));
    const term = core.barrier.currentKeyring.active.term;
    expect((await call('update', 'sys/rotate', {}, await tokenWith('rotate-sudo'))).status).toBe(204);
    expect(core.barrier.currentKeyring.active.term).toBeGreaterThan(term);
  });

  test('deny overrides sudo', async () => {
    await putPolicy('rotate-deny', 'path "sys/rotate" { capabilities = ["deny"] }');
    await denied(call('update', 'sys/rotate', {}, await tokenWith('rotate-sudo', 'rotate-deny')));
  });
});

describe('capabilities endpoints', () => {
  let app: string;
  let appAccessor: string;
  beforeAll(async () => {
    const { token, record } = await core.tokens.create({ policies: ['default', 'app-rw'], ttlSeconds: 3600 });
    app = token;
    appAccessor = record.accessor;
  });

  const expected = {
    'secret/data/app/x': ['create', 'delete', 'read', 'update'],
    'secret/data/app/admin/k': ['deny'],
    'secret/data/other/x': ['deny'],
    'secret/metadata/app/': ['list', 'read'],
    'cubbyhole/mine': ['create', 'delete', 'list', 'read', 'update'],
  };

  test('capabilities-self: every path, sorted; no `capabilities` key for several paths', async () => {
    const out = await call('update', 'sys/capabilities-self', { paths: Object.keys(expected) }, app);
    expect(out.data).toEqual(expected);
  });

  test('capabilities-self: one path (comma string or legacy `path`) also fills `capabilities`', async () => {
    const one = { 'secret/data/app/x': expected['secret/data/app/x'], capabilities: expected['secret/data/app/x'] };
    expect((await call('update', 'sys/capabilities-self', { paths: 'secret/data/app/x' }, app)).data).toEqual(one);
    expect((await call('update', 'sys/capabilities-self', { path: 'secret/data/app/x' }, app)).data).toEqual(one);
    expect((await call('update', 'sys/capabilities-self', { paths: 'secret/data/app/x,secret/data/other/x' }, app)).data).toEqual({
      'secret/data/app/x': expected['secret/data/app/x'],
      'secret/data/other/x': ['deny'],
    });
  });

  test('capabilities-self for root is ["root"]; no paths is 400', async () => {
    expect((await call('update', 'sys/capabilities-self', { paths: ['anything'] })).data).toEqual({ anything: ['root'], capabilities: ['root'] });
    expect(await failure(call('update', 'sys/capabilities-self', {}, app))).toMatchObject({ status: 400, errors: ['paths must be supplied'] });
  });

  test('capabilities (by token) and capabilities-accessor', async () => {
    const paths = Object.keys(expected);
    expect((await call('update', 'sys/capabilities', { token: app, paths })).data).toEqual(expected);
    expect((await call('update', 'sys/capabilities-accessor', { accessor: appAccessor, paths })).data).toEqual(expected);
    expect(await failure(call('update', 'sys/capabilities', { token: 'hvs.nope', paths }))).toMatchObject({ status: 400, errors: ['invalid token'] });
    expect(await failure(call('update', 'sys/capabilities-accessor', { accessor: 'nope', paths }))).toMatchObject({ status: 400, errors: ['invalid accessor'] });
    expect(await failure(call('update', 'sys/capabilities-accessor', { paths }))).toMatchObject({ status: 400, errors: ['missing accessor'] });
  });

  test('capabilities and capabilities-accessor need `update` on their path, not sudo', async () => {
    await denied(call('update', 'sys/capabilities', { token: app, paths: ['a'] }, app));
    await putPolicy('cap-reader', 'path "sys/capabilities" { capabilities = ["update"] }\npath "sys/capabilities-accessor" { capabilities = ["update"] }');
    const t = await tokenWith('cap-reader');
    expect((await call('update', 'sys/capabilities', { token: app, paths: ['secret/data/app/x'] }, t)).data).toMatchObject({ capabilities: expected['secret/data/app/x'] });
    expect((await call('update', 'sys/capabilities-accessor', { accessor: appAccessor, paths: ['secret/data/other/x'] }, t)).data).toMatchObject({ capabilities: ['deny'] });
  });
});

describe('?help=1', () => {
  it('answers with the route description and its OpenAPI item, not the data', async () => {
    const out = await core.handle({ operation: 'read', path: 'secret/data/app/x', data: {}, query: { help: '1' }, token: root, headers: {} });
    expect(out.data!.help).toMatch(/Key-Value/);
    expect(Object.keys((out.data!.openapi as { paths: object }).paths)).toEqual(['/secret/data/{path}']);
  });
});

describe('parameter constraints', () => {
  it('are refused at write time (fail closed) until the ACL enforces them', async () => {
    const policy = 'path "secret/data/x" {\n capabilities = ["update"]\n denied_parameters = { "password" = [] }\n}';
    await expect(core.handle({ operation: 'update', path: 'sys/policies/acl/constrained', data: { policy }, query: {}, token: root, headers: {} })).rejects.toMatchObject({
      kind: 'invalid_request',
      message: expect.stringMatching(/not enforced by Coffer yet/),
    });
    await expect(core.handle({ operation: 'read', path: 'sys/policies/acl/constrained', data: {}, query: {}, token: root, headers: {} })).rejects.toMatchObject({ kind: 'not_found' });
  });
});

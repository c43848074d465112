/**
 * The unmodified node-vault client (npm node-vault 0.12, a dev dependency) against a real
 * `coffer server` process on a fresh, uninitialised Postgres database: its README flow, then
 * every generated command whose Vault path Coffer implements. Each step records what node-vault
 * actually put on the wire (through its `debug` hook) and checks the method and path against
 * node_modules/node-vault/src/commands.js, so a change on either side shows up here.
 *
 * The steps share one server and run in order (each is its own test so a failure names the
 * step); later steps use what earlier ones created.
 *
 * Generated commands NOT exercised, because Coffer does not implement their Vault path
 * (each answers 404 "no handler for route ..."):
 *   - generateRootInit / generateRootCancel (PUT / DELETE sys/generate-root/attempt),
 *     generateRootUpdate (PUT sys/generate-root/update): no root-token generation.
 *   - audits (GET sys/audit), enableAudit / disableAudit (PUT / DELETE sys/audit/:name):
 *     no audit devices.
 *   - remount (POST sys/remount): mounts cannot be moved.
 *   - encryptData, decryptData, rewrapData (POST transit/{encrypt,decrypt,rewrap}/:name),
 *     transitCreateKey / transitReadKey / transitDeleteKey (transit/keys/:name),
 *     transitListKeys (LIST transit/keys): no transit engine (sys/mounts accepts only kv).
 *   - generateDatabaseCredentials (GET :databasePath/creds/:name): no database engine.
 *   - kubernetesLogin (auth/kubernetes/login), addKubernetesRole / getKubernetesRole /
 *     deleteKubernetesRole (auth/kubernetes/role/:name), gcpLogin (auth/gcp/login),
 *     githubLogin (auth/github/login), awsIamLogin (auth/aws/login), ldapLogin, oktaLogin,
 *     radiusLogin (auth/{ldap,okta,radius}/login/:username), certLogin (auth/cert/login),
 *     jwtLogin (auth/jwt/login): sys/auth only enables userpass and approle.
 *   - help(path) (the generic GET <path>?help=1): Coffer has no help output; it ignores
 *     `help=1` and serves the ordinary request.
 */
import nodeVault from 'node-vault';
import { createTestDatabase, type TestDatabase } from '../helpers/pg';
import { startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { waitFor } from '../helpers/wait';

let db: TestDatabase;
let server: CofferProcess;

afterAll(async () => {
  await stopAllCoffers();
  await db?.drop();
});

/** `METHOD /v1/path?query` of every request node-vault sent, from its debug hook. */
const wire: string[] = [];
function debug(...args: unknown[]): void {
  // index.js calls debug(options.method, uri) right before each request; other debug calls
  // have a format string, a status code or a body first.
  const [method, uri] = args;
  if (typeof method === 'string' && /^[A-Z]+$/.test(method) && typeof uri === 'string' && /^https?:\/\//.test(uri)) {
    const u = new URL(uri);
    wire.push(`${method} ${u.pathname}${u.search}`);
  }
}
const lastSent = () => wire[wire.length - 1];

function client(opts: { token?: string; noCustomHTTPVerbs?: boolean } = {}): nodeVault.client {
  return nodeVault({ endpoint: server.addr, debug, ...opts });
}

/** The ApiResponseError a call rejected with (fails the test if it resolved). */
async function failure(p: Promise<unknown>): Promise<{ status: number; body: any; message: string }> {
  let value: unknown;
  try {
    value = await p;
  } catch (err) {
    const e = err as nodeVault.ApiResponseError;
    if (!e.response) throw err;
    return { status: e.response.statusCode, body: e.response.body, message: e.message };
  }
  throw new Error(`expected the request to be refused, but it succeeded: ${JSON.stringify(value)}`);
}

/** The next `event` of a node-vault client, or the error event, within a bound. */
function nextEvent(c: nodeVault.client, event: string, errorEvent: string, timeoutMs = 15_000): Promise<any> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${event} within ${timeoutMs} ms`)), timeoutMs);
    c.once(event, (v: unknown) => {
      clearTimeout(timer);
      resolve(v);
    });
    c.once(errorEvent, (v: any) => {
      clearTimeout(timer);
      reject(new Error(`${errorEvent}: ${v?.message ?? v?.error?.message ?? JSON.stringify(v)}`));
    });
  });
}

describe('node-vault 0.12, unmodified, against coffer server', () => {
  let vault: nodeVault.client;
  let unsealKey = '';
  let rootToken = '';

  beforeAll(async () => {
    db = await createTestDatabase('nodevault');
    server = await startCoffer({ dbUrl: db.url });
    vault = client();
  });

  /** Runs a tokenSource command and puts the root token back in the shared client. */
  async function asRoot<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } finally {
      vault.token = rootToken;
    }
  }

  // ------------------------------------------------------------------ README: init and unseal

  test('README: initialized, health and status before init', async () => {
    expect(await vault.initialized()).toEqual({ initialized: false });
    expect(lastSent()).toBe('GET /v1/sys/init');
    // health resolves whatever the status (501 here): node-vault exempts sys/health.
    const h = await vault.health();
    expect(lastSent()).toBe('GET /v1/sys/health');
    expect(h).toMatchObject({ initialized: false, sealed: true });
    const s = await vault.status();
    expect(lastSent()).toBe('GET /v1/sys/seal-status');
    expect(s).toMatchObject({ sealed: true, initialized: false });
  });

  test('README: init, set vault.token, unseal, status, health, leader', async () => {
    const init = await vault.init({ secret_shares: 1, secret_threshold: 1 });
    expect(lastSent()).toBe('PUT /v1/sys/init');
    expect(init.keys).toHaveLength(1);
    expect(typeof init.root_token).toBe('string');
    expect(init.root_token.length).toBeGreaterThan(0);
    unsealKey = init.keys[0];
    rootToken = init.root_token;
    vault.token = rootToken;

    expect(await vault.initialized()).toEqual({ initialized: true });
    const sealed = await vault.status();
    expect(sealed).toMatchObject({ sealed: true, t: 1, n: 1, progress: 0 });

    // The README passes secret_shares too; node-vault's schema drops it and sends only `key`.
    const unsealed = await vault.unseal({ secret_shares: 1, key: unsealKey });
    expect(lastSent()).toBe('PUT /v1/sys/unseal');
    expect(unsealed).toMatchObject({ sealed: false, t: 1, n: 1, progress: 0 });
    expect(await vault.status()).toMatchObject({ sealed: false, t: 1, n: 1, progress: 0, initialized: true });

    const h = await waitFor('the node to be active', async () => {
      const r = await vault.health();
      return r.standby === false ? r : null;
    });
    expect(h).toMatchObject({ initialized: true, sealed: false, standby: false });
    expect(typeof h.cluster_id).toBe('string');
    expect(h.cluster_id.length).toBeGreaterThan(0);
    // With query flags (node-vault puts them in the query string).
    const h2 = await vault.health({ standbyok: true, sealedcode: 299 });
    expect(lastSent()).toBe('GET /v1/sys/health?standbyok=true&sealedcode=299');
    expect(h2).toMatchObject({ initialized: true, sealed: false });

    const leader = await vault.leader();
    expect(lastSent()).toBe('GET /v1/sys/leader');
    expect(leader).toMatchObject({ ha_enabled: true, is_self: true, leader_address: server.addr });
  });

  // ------------------------------------------------------------------ mounts and KV

  test('mounts, mount (KV v2 at secret/ and KV v1 at kv1/), unmount', async () => {
    const before = await vault.mounts();
    expect(lastSent()).toBe('GET /v1/sys/mounts');
    expect(before.data['sys/']).toMatchObject({ type: 'system' });
    expect(before.data['secret/']).toBeUndefined();

    await vault.mount({ mount_point: 'secret', type: 'kv', options: { version: '2' } });
    expect(lastSent()).toBe('POST /v1/sys/mounts/secret');
    await vault.mount({ mount_point: 'kv1', type: 'kv', description: 'README flow' });
    await vault.mount({ mount_point: 'scratch', type: 'kv' });

    const after = await vault.mounts();
    expect(after.data['secret/']).toMatchObject({ type: 'kv', options: { version: '2' } });
    expect(after.data['kv1/']).toMatchObject({ type: 'kv', description: 'README flow' });
    // Vault copies sys/ data to the top level; scripts read `mounts['secret/']` there.
    expect(after['secret/']).toMatchObject({ type: 'kv', options: { version: '2' } });

    await vault.unmount({ mount_point: 'scratch' });
    expect(lastSent()).toBe('DELETE /v1/sys/mounts/scratch');
    expect((await vault.mounts()).data['scratch/']).toBeUndefined();
  });

  test('README: write, read, delete on KV v1 (secret/hello style, with a lease field)', async () => {
    await vault.write('kv1/hello', { value: 'world', lease: '1s' });
    expect(lastSent()).toBe('POST /v1/kv1/hello');
    const r = await vault.read('kv1/hello');
    expect(lastSent()).toBe('GET /v1/kv1/hello');
    expect(r.data).toEqual({ value: 'world', lease: '1s' });
    const l = await vault.list('kv1/');
    expect(lastSent()).toBe('LIST /v1/kv1/');
    expect(l.data.keys).toEqual(['hello']);
    await vault.delete('kv1/hello');
    expect(lastSent()).toBe('DELETE /v1/kv1/hello');
    const gone = await failure(vault.read('kv1/hello'));
    expect(gone.status).toBe(404);
    expect(gone.body).toEqual({ errors: [] });
  });

  test('KV v2 through raw paths: write, update (PATCH), read, list with LIST and with GET ?list=1, delete', async () => {
    const w = await vault.write('secret/data/hello', { data: { value: 'world' } });
    expect(lastSent()).toBe('POST /v1/secret/data/hello');
    expect(w.data).toMatchObject({ version: 1, destroyed: false });

    const u = await vault.update('secret/data/hello', { data: { extra: 'x' } });
    expect(lastSent()).toBe('PATCH /v1/secret/data/hello');
    expect(u.data.version).toBe(2);

    const r = await vault.read('secret/data/hello');
    expect(lastSent()).toBe('GET /v1/secret/data/hello');
    expect(r.data.data).toEqual({ value: 'world', extra: 'x' });
    expect(r.data.metadata.version).toBe(2);

    await vault.write('secret/data/dir/nested', { data: { n: 1 } });
    // node-vault's default: the real LIST verb.
    const listed = await vault.list('secret/metadata/');
    expect(lastSent()).toBe('LIST /v1/secret/metadata/');
    expect(listed.data.keys).toEqual(['dir/', 'hello']);
    // noCustomHTTPVerbs: GET ?list=1, same answer.
    const plain = client({ token: rootToken, noCustomHTTPVerbs: true });
    const listed2 = await plain.list('secret/metadata/');
    expect(lastSent()).toBe('GET /v1/secret/metadata/?list=1');
    expect(listed2.data.keys).toEqual(['dir/', 'hello']);
    expect((await plain.list('secret/metadata/dir')).data.keys).toEqual(['nested']);
    expect(lastSent()).toBe('GET /v1/secret/metadata/dir?list=1');
    // An empty folder is a 404 with no errors, which node-vault rejects.
    expect((await failure(vault.list('secret/metadata/nothing/'))).status).toBe(404);

    await vault.delete('secret/data/hello');
    expect(lastSent()).toBe('DELETE /v1/secret/data/hello');
    const deleted = await failure(vault.read('secret/data/hello'));
    expect(deleted.status).toBe(404);
    expect(deleted.body.data.data).toBeNull();
    expect(deleted.body.data.metadata.deletion_time).not.toBe('');
    // The older version is still there; the key is still listed (soft delete).
    expect((await vault.read('secret/data/hello?version=1')).data.data).toEqual({ value: 'world' });
    expect((await vault.list('secret/metadata/')).data.keys).toContain('hello');
  });

  test('destroySecretVersions: POST secret/destroy/:path', async () => {
    await vault.destroySecretVersions({ path: 'hello', versions: [1] });
    expect(lastSent()).toBe('POST /v1/secret/destroy/hello');
    const destroyed = await failure(vault.read('secret/data/hello?version=1'));
    expect(destroyed.status).toBe(404);
    expect(destroyed.body.data).toMatchObject({ data: null, metadata: { version: 1, destroyed: true } });
    // Writing again makes version 3, readable.
    await vault.write('secret/data/hello', { data: { value: 'again' } });
    expect((await vault.read('secret/data/hello')).data).toMatchObject({ data: { value: 'again' }, metadata: { version: 3 } });
  });

  // ------------------------------------------------------------------ policies

  test('addPolicy (PUT sys/policy/:name with node-vault-style `rules`), getPolicy, policies, removePolicy', async () => {
    const rules = 'path "secret/data/app/*" {\n  capabilities = ["create", "read", "update"]\n}\n';
    await vault.addPolicy({ name: 'app', rules });
    expect(lastSent()).toBe('PUT /v1/sys/policy/app');
    await vault.addPolicy({ name: 'minter', policy: 'path "auth/token/create" { capabilities = ["update"] }' });

    const got = await vault.getPolicy({ name: 'app' });
    expect(lastSent()).toBe('GET /v1/sys/policy/app');
    expect(got.data).toEqual({ name: 'app', rules });
    expect(got.rules).toBe(rules);

    const list = await vault.policies();
    expect(lastSent()).toBe('GET /v1/sys/policy');
    expect(list.policies).toEqual(['app', 'default', 'minter', 'root']);
    expect(list.data.keys).toEqual(['app', 'default', 'minter', 'root']);

    await vault.removePolicy({ name: 'app' });
    expect(lastSent()).toBe('DELETE /v1/sys/policy/app');
    expect((await failure(vault.getPolicy({ name: 'app' }))).status).toBe(404);
    expect((await vault.policies()).policies).toEqual(['default', 'minter', 'root']);
  });

  // ------------------------------------------------------------------ tokens

  describe('tokens', () => {
    let child: { token: string; accessor: string };

    test('tokenCreate (a tokenSource: it switches the client to the new token), tokenCreateOrphan', async () => {
      const res = await asRoot(async () => {
        const r = await vault.tokenCreate({ policies: ['default'], ttl: '1h', meta: { app: 'x' }, display_name: 'ci' });
        expect(lastSent()).toBe('POST /v1/auth/token/create');
        expect(vault.token).toBe(r.auth.client_token);
        return r;
      });
      expect(res.auth).toMatchObject({ policies: ['default'], lease_duration: 3600, renewable: true, orphan: false, metadata: { app: 'x' } });
      child = { token: res.auth.client_token, accessor: res.auth.accessor };

      const orphan = await asRoot(() => vault.tokenCreateOrphan({ ttl: '1h' }));
      expect(lastSent()).toBe('POST /v1/auth/token/create-orphan');
      expect(orphan.auth).toMatchObject({ orphan: true, lease_duration: 3600 });
      expect(vault.token).toBe(rootToken);
    });

    test('tokenLookup, tokenLookupSelf, tokenLookupAccessor', async () => {
      const l = await vault.tokenLookup({ token: child.token });
      expect(lastSent()).toBe('POST /v1/auth/token/lookup');
      expect(l.data).toMatchObject({ id: child.token, accessor: child.accessor, policies: ['default'], meta: { app: 'x' }, display_name: 'token-ci', path: 'auth/token/create' });

      const self = await vault.tokenLookupSelf();
      expect(lastSent()).toBe('GET /v1/auth/token/lookup-self');
      expect(self.data).toMatchObject({ id: rootToken, policies: ['root'], path: 'auth/token/root' });

      const byAccessor = await vault.tokenLookupAccessor({ accessor: child.accessor });
      expect(lastSent()).toBe('POST /v1/auth/token/lookup-accessor');
      expect(byAccessor.data).toMatchObject({ id: '', accessor: child.accessor, policies: ['default'] });
    });

    test('tokenRenew (tokenSource), tokenRenewSelf, tokenAccessors (the LIST verb, sudo)', async () => {
      const renewed = await asRoot(async () => {
        const r = await vault.tokenRenew({ token: child.token, increment: '2h' });
        expect(vault.token).toBe(child.token);
        return r;
      });
      expect(lastSent()).toBe('POST /v1/auth/token/renew');
      expect(renewed.auth).toMatchObject({ client_token: child.token, lease_duration: 7200 });

      const asChild = client({ token: child.token });
      const self = await asChild.tokenRenewSelf({ increment: 1800 });
      expect(lastSent()).toBe('POST /v1/auth/token/renew-self');
      expect(self.auth).toMatchObject({ client_token: child.token, lease_duration: 1800 });
      const ttl = (await asChild.tokenLookupSelf()).data.ttl;
      expect(ttl).toBeGreaterThan(1700);
      expect(ttl).toBeLessThanOrEqual(1800);

      const accessors = await vault.tokenAccessors();
      expect(lastSent()).toBe('LIST /v1/auth/token/accessors');
      expect(accessors.data.keys).toContain(child.accessor);
      // Listing accessors needs sudo: the default policy cannot.
      expect((await failure(asChild.tokenAccessors())).status).toBe(403);
    });

    test('startTokenRenewal: the renewal helper renews the client token (token:renewed)', async () => {
      const t = await asRoot(() => vault.tokenCreate({ policies: ['default'], ttl: '1m' }));
      const c = client({ token: t.auth.client_token });
      const renewed = nextEvent(c, 'token:renewed', 'token:error:renew');
      try {
        await c.startTokenRenewal({ ttl: 1, increment: 600 });
        const result = await renewed;
        expect(result.auth).toMatchObject({ client_token: t.auth.client_token, lease_duration: 600 });
      } finally {
        c.stopAllRenewals();
      }
      expect((await c.tokenLookupSelf()).data.ttl).toBeGreaterThan(500);
    });

    test('tokenRevoke, tokenRevokeAccessor, tokenRevokeSelf', async () => {
      await vault.tokenRevoke({ token: child.token });
      expect(lastSent()).toBe('POST /v1/auth/token/revoke');
      const gone = await failure(vault.tokenLookup({ token: child.token }));
      expect(gone).toMatchObject({ status: 403, message: 'bad token' });
      expect((await failure(client({ token: child.token }).tokenLookupSelf())).status).toBe(403);

      const byAccessor = await asRoot(() => vault.tokenCreate({ policies: ['default'], ttl: '1h' }));
      await vault.tokenRevokeAccessor({ accessor: byAccessor.auth.accessor });
      expect(lastSent()).toBe('POST /v1/auth/token/revoke-accessor');
      expect((await failure(vault.tokenLookup({ token: byAccessor.auth.client_token }))).status).toBe(403);
      expect((await failure(vault.tokenLookupAccessor({ accessor: byAccessor.auth.accessor }))).status).toBe(400);

      const selfish = await asRoot(() => vault.tokenCreate({ policies: ['default'], ttl: '1h' }));
      const c = client({ token: selfish.auth.client_token });
      await c.tokenRevokeSelf();
      expect(lastSent()).toBe('POST /v1/auth/token/revoke-self');
      expect((await failure(c.tokenLookupSelf())).status).toBe(403);
      expect((await failure(vault.tokenLookup({ token: selfish.auth.client_token }))).status).toBe(403);
    });

    test('tokenRevokeOrphan: the parent goes, its child stays as an orphan; tokenRevoke takes the subtree', async () => {
      const parent = await asRoot(() => vault.tokenCreate({ policies: ['minter'], ttl: '1h' }));
      const p = client({ token: parent.auth.client_token });
      const kid = await p.tokenCreate({ ttl: '30m' });
      expect(kid.auth.orphan).toBe(false);
      await vault.tokenRevokeOrphan({ token: parent.auth.client_token });
      expect(lastSent()).toBe('POST /v1/auth/token/revoke-orphan');
      expect((await failure(vault.tokenLookup({ token: parent.auth.client_token }))).status).toBe(403);
      const survivor = await vault.tokenLookup({ token: kid.auth.client_token });
      expect(survivor.data.orphan).toBe(true);

      // Contrast: plain revoke takes the children along.
      const parent2 = await asRoot(() => vault.tokenCreate({ policies: ['minter'], ttl: '1h' }));
      const kid2 = await client({ token: parent2.auth.client_token }).tokenCreate({ ttl: '30m' });
      await vault.tokenRevoke({ token: parent2.auth.client_token });
      expect((await failure(vault.tokenLookup({ token: kid2.auth.client_token }))).status).toBe(403);
    });

    test('token roles: addTokenRole, getTokenRole, tokenRoles (GET ?list=true), tokenCreateRole, removeTokenRole', async () => {
      await vault.addTokenRole({ role_name: 'ci', allowed_policies: 'default,minter', renewable: true, orphan: false });
      expect(lastSent()).toBe('POST /v1/auth/token/roles/ci');
      const role = await vault.getTokenRole({ role_name: 'ci' });
      expect(lastSent()).toBe('GET /v1/auth/token/roles/ci');
      expect(role.data).toMatchObject({ name: 'ci', allowed_policies: ['default', 'minter'], renewable: true, orphan: false });
      const roles = await vault.tokenRoles();
      expect(lastSent()).toBe('GET /v1/auth/token/roles?list=true');
      expect(roles.data.keys).toEqual(['ci']);

      const t = await asRoot(() => vault.tokenCreateRole({ role_name: 'ci', ttl: '10m', policies: ['minter'] }));
      expect(lastSent()).toBe('POST /v1/auth/token/create/ci');
      expect(t.auth).toMatchObject({ policies: ['default', 'minter'], lease_duration: 600 });
      expect((await vault.tokenLookup({ token: t.auth.client_token })).data).toMatchObject({ role: 'ci', path: 'auth/token/create/ci' });
      // Not allowed by the role.
      const refused = await failure(asRoot(() => vault.tokenCreateRole({ role_name: 'ci', policies: ['root'] })));
      expect(refused.status).toBe(400);

      await vault.removeTokenRole({ role_name: 'ci' });
      expect(lastSent()).toBe('DELETE /v1/auth/token/roles/ci');
      expect((await failure(vault.getTokenRole({ role_name: 'ci' }))).status).toBe(404);
      expect((await failure(vault.tokenRoles())).status).toBe(404);
    });
  });

  // ------------------------------------------------------------------ auth methods

  describe('auth methods', () => {
    test('enableAuth, auths, userpassLogin (tokenSource) after writing auth/userpass/users/bob', async () => {
      await vault.enableAuth({ mount_point: 'userpass', type: 'userpass', description: 'people' });
      expect(lastSent()).toBe('POST /v1/sys/auth/userpass');
      const auths = await vault.auths();
      expect(lastSent()).toBe('GET /v1/sys/auth');
      expect(auths.data['userpass/']).toMatchObject({ type: 'userpass', description: 'people' });
      expect(auths.data['token/']).toMatchObject({ type: 'token' });
      expect(auths['userpass/']).toMatchObject({ type: 'userpass' });

      await vault.write('auth/userpass/users/bob', { password: 's3cret', token_policies: 'default', token_ttl: '1h' });
      const bob = client();
      const login = await bob.userpassLogin({ username: 'bob', password: 's3cret' });
      expect(lastSent()).toBe('POST /v1/auth/userpass/login/bob');
      expect(login.auth).toMatchObject({ policies: ['default'], lease_duration: 3600, renewable: true, metadata: { username: 'bob' } });
      expect(bob.token).toBe(login.auth.client_token);
      expect((await bob.tokenLookupSelf()).data).toMatchObject({ path: 'auth/userpass/login/bob', meta: { username: 'bob' } });

      const bad = await failure(client().userpassLogin({ username: 'bob', password: 'wrong' }));
      expect(bad.status).toBe(400);
      expect(bad.message).toMatch(/invalid username or password/);
    });

    test('approle: addApproleRole, getApproleRoleId, getApproleRoleSecret, approleLogin, getApproleRole, approleRoles and the secret-id commands', async () => {
      await vault.enableAuth({ mount_point: 'approle', type: 'approle' });
      await vault.addApproleRole({ role_name: 'web', policies: 'default', token_ttl: 600, secret_id_num_uses: 0 });
      expect(lastSent()).toBe('POST /v1/auth/approle/role/web');

      const roleId = (await vault.getApproleRoleId({ role_name: 'web' })).data.role_id;
      expect(lastSent()).toBe('GET /v1/auth/approle/role/web/role-id');
      expect(typeof roleId).toBe('string');

      const secret = (await vault.getApproleRoleSecret({ role_name: 'web', metadata: JSON.stringify({ env: 'test' }) })).data;
      expect(lastSent()).toBe('POST /v1/auth/approle/role/web/secret-id');
      expect(typeof secret.secret_id).toBe('string');
      expect(typeof secret.secret_id_accessor).toBe('string');

      const app = client();
      const login = await app.approleLogin({ role_id: roleId, secret_id: secret.secret_id });
      expect(lastSent()).toBe('POST /v1/auth/approle/login');
      expect(login.auth).toMatchObject({ policies: ['default'], lease_duration: 600, metadata: { role_name: 'web' } });
      expect(app.token).toBe(login.auth.client_token);
      expect((await app.tokenLookupSelf()).data.path).toBe('auth/approle/login');

      const role = await vault.getApproleRole({ role_name: 'web' });
      expect(lastSent()).toBe('GET /v1/auth/approle/role/web');
      expect(role.data).toMatchObject({ token_ttl: 600, token_policies: ['default'], bind_secret_id: true });

      const roles = await vault.approleRoles();
      expect(lastSent()).toBe('LIST /v1/auth/approle/role');
      expect(roles.data.keys).toEqual(['web']);

      const accessors = await vault.approleSecretAccessors({ role_name: 'web' });
      expect(lastSent()).toBe('LIST /v1/auth/approle/role/web/secret-id');
      expect(accessors.data.keys).toEqual([secret.secret_id_accessor]);

      const looked = await vault.approleSecretLookup({ role_name: 'web', secret_id: secret.secret_id });
      expect(lastSent()).toBe('POST /v1/auth/approle/role/web/secret-id/lookup');
      expect(looked.data).toMatchObject({ secret_id_accessor: secret.secret_id_accessor, metadata: { env: 'test' } });
      const byAccessor = await vault.approleSecretAccessorLookup({ role_name: 'web', secret_id_accessor: secret.secret_id_accessor });
      expect(lastSent()).toBe('POST /v1/auth/approle/role/web/secret-id-accessor/lookup');
      expect(byAccessor.data).toMatchObject({ secret_id_accessor: secret.secret_id_accessor });

      // Destroy by secret id and by accessor: neither logs in afterwards.
      await vault.approleSecretDestroy({ role_name: 'web', secret_id: secret.secret_id });
      expect(lastSent()).toBe('POST /v1/auth/approle/role/web/secret-id/destroy');
      expect((await failure(client().approleLogin({ role_id: roleId, secret_id: secret.secret_id }))).status).toBe(400);
      const second = (await vault.getApproleRoleSecret({ role_name: 'web' })).data;
      await vault.approleSecretAccessorDestroy({ role_name: 'web', secret_id_accessor: second.secret_id_accessor });
      expect(lastSent()).toBe('POST /v1/auth/approle/role/web/secret-id-accessor/destroy');
      expect((await failure(client().approleLogin({ role_id: roleId, secret_id: second.secret_id }))).status).toBe(400);

      // A custom role id replaces the generated one.
      await vault.updateApproleRoleId({ role_name: 'web', role_id: 'web-role-id' });
      expect(lastSent()).toBe('POST /v1/auth/approle/role/web/role-id');
      expect((await vault.getApproleRoleId({ role_name: 'web' })).data.role_id).toBe('web-role-id');
      const third = (await vault.getApproleRoleSecret({ role_name: 'web' })).data;
      expect((await failure(client().approleLogin({ role_id: roleId, secret_id: third.secret_id }))).status).toBe(400);
      const relogin = await client().approleLogin({ role_id: 'web-role-id', secret_id: third.secret_id });
      expect(relogin.auth.client_token).toEqual(expect.any(String));

      await vault.deleteApproleRole({ role_name: 'web' });
      expect(lastSent()).toBe('DELETE /v1/auth/approle/role/web');
      expect((await failure(vault.getApproleRole({ role_name: 'web' }))).status).toBe(404);
      expect((await failure(vault.approleRoles())).status).toBe(404);
    });

    test('disableAuth revokes the method\'s logins and removes it from auths', async () => {
      await vault.write('auth/userpass/users/dora', { password: 'pw', token_policies: 'default' });
      const dora = client();
      await dora.userpassLogin({ username: 'dora', password: 'pw' });
      await vault.enableAuth({ mount_point: 'temp', type: 'userpass' });
      await vault.write('auth/temp/users/tim', { password: 'pw' });
      const tim = client();
      await tim.userpassLogin({ mount_point: 'temp', username: 'tim', password: 'pw' });
      expect(lastSent()).toBe('POST /v1/auth/temp/login/tim');

      await vault.disableAuth({ mount_point: 'temp' });
      expect(lastSent()).toBe('DELETE /v1/sys/auth/temp');
      expect((await vault.auths()).data['temp/']).toBeUndefined();
      expect((await failure(tim.tokenLookupSelf())).status).toBe(403);
      // Another method's login is untouched.
      expect((await dora.tokenLookupSelf()).data.meta).toEqual({ username: 'dora' });
    });
  });

  // ------------------------------------------------------------------ leases

  describe('leases (renew and revoke go to sys/leases/*, revokePrefix to the legacy sys/revoke-prefix)', () => {
    async function bobLease(): Promise<{ client: nodeVault.client; leaseId: string }> {
      const before = new Set<string>(await vault.list('sys/leases/lookup/auth/userpass/login/bob/').then((r) => r.data.keys, () => []));
      const c = client();
      await c.userpassLogin({ username: 'bob', password: 's3cret' });
      const after: string[] = (await vault.list('sys/leases/lookup/auth/userpass/login/bob/')).data.keys;
      const fresh = after.filter((k) => !before.has(k));
      expect(fresh).toHaveLength(1);
      return { client: c, leaseId: `auth/userpass/login/bob/${fresh[0]}` };
    }

    test('renew: PUT sys/leases/renew extends the login lease and its token', async () => {
      const { client: bob, leaseId } = await bobLease();
      const r = await vault.renew({ lease_id: leaseId, increment: 600 });
      expect(lastSent()).toBe('PUT /v1/sys/leases/renew');
      expect(r).toMatchObject({ lease_id: leaseId, renewable: true, lease_duration: 600 });
      const ttl = (await bob.tokenLookupSelf()).data.ttl;
      expect(ttl).toBeGreaterThan(500);
      expect(ttl).toBeLessThanOrEqual(600);
    });

    test('startLeaseRenewal: the helper calls renew and emits lease:renewed', async () => {
      const { leaseId } = await bobLease();
      const renewed = nextEvent(vault, 'lease:renewed', 'lease:error:renew');
      try {
        vault.startLeaseRenewal(leaseId, 1, { increment: 900 });
        const ev = await renewed;
        expect(ev.leaseId).toBe(leaseId);
        expect(ev.result).toMatchObject({ lease_id: leaseId, lease_duration: 900 });
      } finally {
        vault.stopAllRenewals();
      }
    });

    test('revoke: PUT sys/leases/revoke revokes the lease and its token', async () => {
      const { client: bob, leaseId } = await bobLease();
      await vault.revoke({ lease_id: leaseId });
      expect(lastSent()).toBe('PUT /v1/sys/leases/revoke');
      expect((await failure(bob.tokenLookupSelf())).status).toBe(403);
      expect((await failure(vault.renew({ lease_id: leaseId }))).status).toBe(400);
    });

    test('revokePrefix: PUT sys/revoke-prefix/auth/userpass/login/bob revokes every bob login', async () => {
      const one = await bobLease();
      const two = await bobLease();
      await vault.revokePrefix({ path_prefix: 'auth/userpass/login/bob' });
      expect(lastSent()).toBe('PUT /v1/sys/revoke-prefix/auth/userpass/login/bob');
      expect((await failure(one.client.tokenLookupSelf())).status).toBe(403);
      expect((await failure(two.client.tokenLookupSelf())).status).toBe(403);
      expect((await failure(vault.list('sys/leases/lookup/auth/userpass/login/bob/'))).status).toBe(404);
    });
  });

  // ------------------------------------------------------------------ response wrapping

  test('wrapping: X-Vault-Wrap-TTL through requestOptions.headers, then unwrap (POST sys/wrapping/unwrap)', async () => {
    await vault.write('secret/data/wrapped', { data: { pin: '1234' } });
    const wrapped = await vault.read('secret/data/wrapped', { headers: { 'X-Vault-Wrap-TTL': '60s' } });
    expect(wrapped.data).toBeNull();
    expect(wrapped.wrap_info).toMatchObject({ ttl: 60, creation_path: 'secret/data/wrapped' });

    const unwrapped = await vault.unwrap({ token: wrapped.wrap_info.token });
    expect(lastSent()).toBe('POST /v1/sys/wrapping/unwrap');
    expect(unwrapped.data.data).toEqual({ pin: '1234' });
    const again = await failure(vault.unwrap({ token: wrapped.wrap_info.token }));
    expect(again.status).toBe(400);
    expect(again.message).toMatch(/wrapping token is not valid or does not exist/);

    // sys/wrapping/wrap through write(): arbitrary data.
    const w = await vault.write('sys/wrapping/wrap', { a: 'b' }, { headers: { 'X-Vault-Wrap-TTL': '30s' } });
    expect(w.wrap_info).toMatchObject({ ttl: 30, creation_path: 'sys/wrapping/wrap' });
    expect((await vault.unwrap({ token: w.wrap_info.token })).data).toEqual({ a: 'b' });

    // A wrapped token create (generated command with requestOptions): the client keeps its
    // token, since the response has no auth; the holder of the wrapping token unwraps it by
    // sending it as X-Vault-Token with an empty body.
    const wrappedToken = await vault.tokenCreate({ policies: ['default'], ttl: '10m', requestOptions: { headers: { 'X-Vault-Wrap-TTL': '45s' } } });
    expect(vault.token).toBe(rootToken);
    expect(wrappedToken.auth).toBeNull();
    expect(wrappedToken.wrap_info).toMatchObject({ ttl: 45, creation_path: 'auth/token/create' });
    const holder = client({ token: wrappedToken.wrap_info.token });
    const inner = await holder.unwrap();
    expect(inner.auth).toMatchObject({ policies: ['default'], lease_duration: 600 });
    expect(inner.auth.accessor).toBe(wrappedToken.wrap_info.wrapped_accessor);
    expect((await client({ token: inner.auth.client_token }).tokenLookupSelf()).data.ttl).toBeGreaterThan(500);
    // Single use: the wrapping token is gone.
    expect((await failure(holder.unwrap())).status).toBeGreaterThanOrEqual(400);
  });

  // ------------------------------------------------------------------ operations

  test('rotate (PUT sys/rotate): a new key term, data still readable', async () => {
    const before = (await vault.read('sys/key-status')).data.term;
    await vault.rotate();
    expect(lastSent()).toBe('PUT /v1/sys/rotate');
    expect((await vault.read('sys/key-status')).data.term).toBe(before + 1);
    expect((await vault.read('secret/data/hello')).data.data).toEqual({ value: 'again' });
    await vault.write('secret/data/after-rotate', { data: { ok: true } });
    expect((await vault.read('secret/data/after-rotate')).data.data).toEqual({ ok: true });
  });

  test('stepDown (PUT sys/step-down): the node gives up the active lease, then takes it back', async () => {
    await vault.stepDown();
    expect(lastSent()).toBe('PUT /v1/sys/step-down');
    const h = await vault.health();
    expect(h.sealed).toBe(false);
    await waitFor('the node to be active again', async () => (await vault.health()).standby === false, { timeoutMs: 20_000, intervalMs: 100 });
    expect(await vault.leader()).toMatchObject({ is_self: true, leader_address: server.addr });
    expect((await vault.read('secret/data/hello')).data.data).toEqual({ value: 'again' });
  });

  test('seal (PUT sys/seal), then unseal again: requests refused while sealed, data and tokens intact after', async () => {
    await vault.seal();
    expect(lastSent()).toBe('PUT /v1/sys/seal');
    expect(await vault.status()).toMatchObject({ sealed: true, t: 1, n: 1, progress: 0 });
    expect(await vault.health()).toMatchObject({ initialized: true, sealed: true });
    const refused = await failure(vault.read('secret/data/hello'));
    expect(refused.status).toBe(503);
    expect(refused.message).toMatch(/sealed/i);

    expect(await vault.unseal({ secret_shares: 1, key: unsealKey })).toMatchObject({ sealed: false, progress: 0 });
    expect((await vault.read('secret/data/hello')).data.data).toEqual({ value: 'again' });
    expect((await vault.tokenLookupSelf()).data.policies).toEqual(['root']);
    expect((await vault.list('secret/metadata/')).data.keys).toEqual(expect.arrayContaining(['after-rotate', 'dir/', 'hello', 'wrapped']));
  });
});

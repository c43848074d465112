/**
 * A restricted token, checked the way RESTler's checkers probe an API: after a resource is
 * freed (a token revoked — by itself, by accessor, through its parent — or a KV version
 * destroyed, or a key's metadata deleted) nothing may still reach it; and a policy grants
 * exactly what it says (a `deny` on one path beats a broader grant, nothing outside the grant
 * is reachable). Real server process, real Postgres; the HTTP helper so every status is seen.
 */
import { createHash } from 'node:crypto';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';

let db: TestDatabase;
let server: CofferProcess;
let root = '';

afterAll(async () => {
  await stopAllCoffers();
  await db?.drop();
});

const APP_POLICY = `
path "secret/data/app/*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "secret/metadata/app/*" {
  capabilities = ["list", "read", "delete"]
}
path "secret/data/app/forbidden" {
  capabilities = ["deny"]
}
`;

const MINTER_POLICY = 'path "auth/token/create" { capabilities = ["update"] }';

const call = (method: string, path: string, token: string, body?: unknown) => vault(server.addr, method, path, { token, body });

async function login(user = 'alice'): Promise<{ token: string; accessor: string }> {
  const r = await vault(server.addr, 'POST', `auth/userpass/login/${user}`, { body: { password: 'correct horse' } });
  expect(r.status).toBe(200);
  expect(r.body.auth.policies).toEqual(['app', 'default']);
  return { token: r.body.auth.client_token, accessor: r.body.auth.accessor };
}

/** Requests a live `app` token is allowed to make (whatever their outcome for it). */
const APP_REQUESTS: [string, string, unknown?][] = [
  ['GET', 'secret/data/app/x'],
  ['POST', 'secret/data/app/x', { data: { v: 'after-free' } }],
  ['DELETE', 'secret/data/app/x'],
  ['LIST', 'secret/metadata/app/'],
  ['GET', 'secret/metadata/app/x'],
  ['DELETE', 'secret/metadata/app/x'],
  ['GET', 'auth/token/lookup-self'],
  ['POST', 'auth/token/renew-self', {}],
  ['POST', 'auth/token/revoke-self', {}],
  ['POST', 'sys/capabilities-self', { paths: ['secret/data/app/x'] }],
  ['POST', 'sys/leases/renew', { lease_id: 'auth/userpass/login/alice/x' }],
  // Routes that do not exist: a dead token must not learn that either (403 before 404).
  ['GET', 'nonexistent/path'],
];

/** Every request in APP_REQUESTS with `token`, as "METHOD path → status" for a readable diff. */
async function statuses(token: string): Promise<string[]> {
  const out: string[] = [];
  for (const [method, path, body] of APP_REQUESTS) {
    const r = await call(method, path, token, body);
    out.push(`${method} ${path} → ${r.status}`);
  }
  return out;
}
const allForbidden = () => APP_REQUESTS.map(([method, path]) => `${method} ${path} → 403`);

/** Leases whose token no longer exists (a revocation that left something behind). */
async function danglingLeases(): Promise<string[]> {
  const c = await sqlClient(db.url);
  try {
    const { rows } = await c.query<{ lease_id: string }>(
      `SELECT lease_id FROM coffer_leases l WHERE NOT EXISTS (SELECT 1 FROM coffer_tokens t WHERE t.token_hmac = l.token_hmac)`,
    );
    return rows.map((r) => r.lease_id);
  } finally {
    await c.end();
  }
}

async function tokenRows(accessors: string[]): Promise<number> {
  const c = await sqlClient(db.url);
  try {
    const { rows } = await c.query(`SELECT count(*)::int AS n FROM coffer_tokens WHERE accessor = ANY($1)`, [accessors]);
    return rows[0].n;
  } finally {
    await c.end();
  }
}

describe('a token restricted to secret/*/app/*', () => {
  beforeAll(async () => {
    db = await createTestDatabase('restricted');
    server = await startCoffer({ dbUrl: db.url });
    ({ rootToken: root } = await initAndUnseal([server]));
    await mountKv2(server.addr, root);
    expect((await call('PUT', 'sys/policies/acl/app', root, { policy: APP_POLICY })).status).toBe(204);
    expect((await call('PUT', 'sys/policies/acl/minter', root, { policy: MINTER_POLICY })).status).toBe(204);
    expect((await call('POST', 'sys/auth/userpass', root, { type: 'userpass' })).status).toBe(204);
    expect((await call('POST', 'auth/userpass/users/alice', root, { password: 'correct horse', token_policies: 'app' })).status).toBe(204);
    // Things the user must not reach, present so a 403 cannot be a 404 in disguise.
    for (const p of ['secret/data/other', 'secret/data/app/forbidden']) {
      expect((await call('POST', p, root, { data: { secret: `value of ${p}` } })).status).toBe(200);
    }
  });

  test('the user can create, read, update, list and delete under app/', async () => {
    const { token } = await login();
    const w1 = await call('POST', 'secret/data/app/x', token, { data: { v: 1 } });
    expect(w1.status).toBe(200);
    expect(w1.body.data.version).toBe(1);
    const w2 = await call('POST', 'secret/data/app/x', token, { data: { v: 2 } });
    expect(w2.body.data.version).toBe(2);
    const r = await call('GET', 'secret/data/app/x', token);
    expect(r.status).toBe(200);
    expect(r.body.data.data).toEqual({ v: 2 });
    const l = await call('LIST', 'secret/metadata/app/', token);
    expect(l.status).toBe(200);
    expect(l.body.data.keys).toEqual(['forbidden', 'x']);
    expect((await call('DELETE', 'secret/data/app/x', token)).status).toBe(204);
    expect((await call('GET', 'secret/data/app/x', token)).status).toBe(404);
    expect((await call('GET', 'secret/data/app/x?version=1', token)).body.data.data).toEqual({ v: 1 });
    const caps = await call('POST', 'sys/capabilities-self', token, { paths: ['secret/data/app/x', 'secret/data/app/forbidden', 'secret/data/other'] });
    expect(caps.body.data).toEqual({
      'secret/data/app/x': ['create', 'delete', 'read', 'update'],
      'secret/data/app/forbidden': ['deny'],
      'secret/data/other': ['deny'],
    });
  });

  test('403 outside the grant: another key, the denied key (deny beats app/*), sys/mounts writes, sys/policies, token creation', async () => {
    const { token } = await login();
    const refused: [string, string, unknown?][] = [
      ['GET', 'secret/data/other'],
      ['POST', 'secret/data/other', { data: { pwned: true } }],
      ['DELETE', 'secret/data/other'],
      ['GET', 'secret/data/app/forbidden'],
      ['POST', 'secret/data/app/forbidden', { data: { pwned: true } }],
      ['DELETE', 'secret/data/app/forbidden'],
      ['PATCH', 'secret/data/app/forbidden', { data: { pwned: true } }],
      ['LIST', 'secret/metadata/'],
      ['POST', 'secret/destroy/app/x', { versions: [1] }],
      ['POST', 'sys/mounts/evil', { type: 'kv' }],
      ['DELETE', 'sys/mounts/secret'],
      ['POST', 'sys/mounts/secret/tune', { max_lease_ttl: '1h' }],
      ['POST', 'sys/auth/evil', { type: 'userpass' }],
      ['LIST', 'sys/policies/acl'],
      ['GET', 'sys/policies/acl/app'],
      ['PUT', 'sys/policies/acl/app', { policy: 'path "*" { capabilities = ["sudo","create","read","update","delete","list"] }' }],
      ['PUT', 'sys/policies/acl/mine', { policy: 'path "*" { capabilities = ["read"] }' }],
      ['DELETE', 'sys/policies/acl/app'],
      ['GET', 'sys/policy'],
      ['PUT', 'sys/policy/app', { rules: 'path "*" { capabilities = ["read"] }' }],
      ['POST', 'auth/token/create', { policies: ['root'] }],
      ['POST', 'auth/userpass/users/alice', { password: 'x', token_policies: 'root' }],
    ];
    const got: string[] = [];
    for (const [method, path, body] of refused) got.push(`${method} ${path} → ${(await call(method, path, token, body)).status}`);
    expect(got).toEqual(refused.map(([method, path]) => `${method} ${path} → 403`));
    // Nothing changed behind the refusals.
    expect((await call('GET', 'secret/data/other', root)).body.data.data).toEqual({ secret: 'value of secret/data/other' });
    expect((await call('GET', 'secret/data/app/forbidden', root)).body.data.data).toEqual({ secret: 'value of secret/data/app/forbidden' });
    expect((await call('GET', 'sys/policies/acl/app', root)).body.data.policy).toBe(APP_POLICY);
    expect((await call('GET', 'sys/mounts', root)).body.data['evil/']).toBeUndefined();
  });

  test('after auth/token/revoke-self the same token gets 403 everywhere', async () => {
    const { token, accessor } = await login();
    expect((await call('GET', 'secret/data/app/x?version=1', token)).status).toBe(200);
    expect((await call('POST', 'auth/token/revoke-self', token, {})).status).toBe(204);
    expect(await statuses(token)).toEqual(allForbidden());
    expect((await call('POST', 'auth/token/lookup', root, { token })).status).toBe(403);
    expect((await call('POST', 'auth/token/lookup-accessor', root, { accessor })).status).toBe(400);
    // The other header spelling is refused as well.
    const bearer = await vault(server.addr, 'GET', 'secret/data/app/x?version=1', { headers: { Authorization: `Bearer ${token}` } });
    expect(bearer.status).toBe(403);
    // Revoked, not merely refused: its row is gone, and no lease was left behind without a token.
    expect(await tokenRows([accessor])).toBe(0);
    expect(await danglingLeases()).toEqual([]);
  });

  test('a token revoked through its accessor by root is gone', async () => {
    const { token, accessor } = await login();
    expect((await call('GET', 'auth/token/lookup-self', token)).status).toBe(200);
    expect((await call('POST', 'auth/token/revoke-accessor', root, { accessor })).status).toBe(204);
    expect(await statuses(token)).toEqual(allForbidden());
    expect((await call('POST', 'auth/token/lookup', root, { token })).status).toBe(403);
    expect((await call('POST', 'auth/token/lookup-accessor', root, { accessor })).status).toBe(400);
    // And cannot be renewed back into life.
    expect((await call('POST', 'auth/token/renew', root, { token })).status).toBe(400);
    expect(await tokenRows([accessor])).toBe(0);
    expect(await danglingLeases()).toEqual([]);
  });

  test('a child (and grandchild) created by a parent token is gone after the parent is revoked', async () => {
    const parent = await call('POST', 'auth/token/create', root, { policies: ['app', 'minter'], ttl: '1h' });
    expect(parent.status).toBe(200);
    const p = parent.body.auth.client_token as string;
    const child = await call('POST', 'auth/token/create', p, { ttl: '30m' });
    expect(child.status).toBe(200);
    expect(child.body.auth.policies).toEqual(['app', 'default', 'minter']);
    const c = child.body.auth.client_token as string;
    const grandchild = await call('POST', 'auth/token/create', c, { policies: ['app'], ttl: '20m' });
    expect(grandchild.status).toBe(200);
    const g = grandchild.body.auth.client_token as string;
    for (const t of [c, g]) expect((await call('GET', 'secret/data/app/x?version=1', t)).status).toBe(200);

    expect((await call('POST', 'auth/token/revoke', root, { token: p })).status).toBe(204);
    for (const t of [p, c, g]) {
      expect(await statuses(t)).toEqual(allForbidden());
      expect((await call('POST', 'auth/token/lookup', root, { token: t })).status).toBe(403);
    }
    const accessors = [parent.body.auth.accessor, child.body.auth.accessor, grandchild.body.auth.accessor];
    for (const accessor of accessors) {
      expect((await call('POST', 'auth/token/lookup-accessor', root, { accessor })).status).toBe(400);
    }
    expect(await tokenRows(accessors)).toBe(0);
    expect(await danglingLeases()).toEqual([]);
  });

  test('other spellings of the denied path reach nothing', async () => {
    const { token } = await login();
    const spellings = [
      'secret//data/app/forbidden',
      'secret/data/app//forbidden',
      'secret/data/app/%66orbidden',
      'secret/data/app/forbidden/',
      'secret/data/app/x%2F..%2Fforbidden',
      'secret/data/app/forbidden%00',
      'secret/data/app/forbidden.',
      'secret/data/app/forbidden?version=1',
    ];
    for (const p of spellings) {
      for (const [method, body] of [['GET', undefined], ['POST', { data: { pwned: p } }], ['DELETE', undefined]] as const) {
        const r = await call(method, p, token, body);
        // 403, or refused as a path (400/404): never served.
        expect([`${method} ${p}`, [400, 403, 404].includes(r.status)]).toEqual([`${method} ${p}`, true]);
        expect(JSON.stringify(r.body ?? '')).not.toContain('value of secret/data/app/forbidden');
      }
    }
    const stored = await call('GET', 'secret/data/app/forbidden', root);
    expect(stored.body.data).toMatchObject({ data: { secret: 'value of secret/data/app/forbidden' }, metadata: { version: 1 } });
  });

  test('a deleted policy grants nothing to the tokens that still name it', async () => {
    const policy = 'path "secret/data/temp/*" { capabilities = ["read"] }';
    expect((await call('PUT', 'sys/policies/acl/temp', root, { policy })).status).toBe(204);
    expect((await call('POST', 'secret/data/temp/k', root, { data: { k: 1 } })).status).toBe(200);
    const t = (await call('POST', 'auth/token/create', root, { policies: ['temp'], ttl: '1h' })).body.auth.client_token as string;
    expect((await call('GET', 'secret/data/temp/k', t)).status).toBe(200);
    expect((await call('DELETE', 'sys/policies/acl/temp', root)).status).toBe(204);
    expect((await call('GET', 'secret/data/temp/k', t)).status).toBe(403);
    // The token still exists (with the dangling name), it just reaches nothing through it.
    expect((await call('GET', 'auth/token/lookup-self', t)).body.data.policies).toEqual(['default', 'temp']);
  });

  describe('KV versions after destroy and after metadata delete', () => {
    const hashed = createHash('sha256').update('app/x').digest('hex');
    /** Stored (non-tombstone) version rows of secret/app/x, as a DBA would count them. */
    async function storedVersions(): Promise<number[]> {
      const c = await sqlClient(db.url);
      try {
        const { rows } = await c.query<{ path: string }>(
          `SELECT path FROM coffer_entries WHERE path LIKE 'logical/%/versions/' || $1 || '/%' AND value IS NOT NULL ORDER BY path`,
          [hashed],
        );
        return rows.map((r) => Number(r.path.split('/').pop()));
      } finally {
        await c.end();
      }
    }
    let token = '';

    beforeAll(async () => {
      ({ token } = await login());
      // app/x has versions 1 ({v:1}) and 2 ({v:2}, soft-deleted) from the first test; start
      // this part from a clean key.
      expect((await call('DELETE', 'secret/metadata/app/x', token)).status).toBe(204);
      for (const v of ['one', 'two']) expect((await call('POST', 'secret/data/app/x', token, { data: { v } })).status).toBe(200);
      expect((await call('POST', 'secret/data/app/y', token, { data: { v: 'y' } })).status).toBe(200);
    });

    test('after secret/destroy/app/x of version 1, version 1 reads 404 with data null; version 2 remains', async () => {
      expect(await storedVersions()).toEqual([1, 2]);
      // The app policy does not grant destroy; root does it.
      expect((await call('POST', 'secret/destroy/app/x', token, { versions: [1] })).status).toBe(403);
      expect((await call('POST', 'secret/destroy/app/x', root, { versions: [1] })).status).toBe(204);

      const v1 = await call('GET', 'secret/data/app/x?version=1', token);
      expect(v1.status).toBe(404);
      expect(v1.body.data.data).toBeNull();
      expect(v1.body.data.metadata).toMatchObject({ version: 1, destroyed: true });
      const v2 = await call('GET', 'secret/data/app/x?version=2', token);
      expect(v2.status).toBe(200);
      expect(v2.body.data.data).toEqual({ v: 'two' });
      expect((await call('GET', 'secret/data/app/x', token)).body.data.data).toEqual({ v: 'two' });
      // A destroyed version cannot be undeleted back.
      expect((await call('POST', 'secret/undelete/app/x', root, { versions: [1] })).status).toBe(204);
      expect((await call('GET', 'secret/data/app/x?version=1', token)).status).toBe(404);
      // The ciphertext is gone from storage, not just hidden.
      expect(await storedVersions()).toEqual([2]);
      const meta = await call('GET', 'secret/metadata/app/x', token);
      expect(meta.body.data.versions['1']).toMatchObject({ destroyed: true });
      expect(meta.body.data.versions['2']).toMatchObject({ destroyed: false });
    });

    test('after a metadata delete every version is gone, LIST no longer shows the key, and a new write does not resurrect them', async () => {
      expect((await call('DELETE', 'secret/metadata/app/x', token)).status).toBe(204);
      for (const q of ['', '?version=1', '?version=2']) {
        const r = await call('GET', `secret/data/app/x${q}`, token);
        expect(r.status).toBe(404);
        expect(r.body?.data?.data ?? null).toBeNull();
      }
      expect((await call('GET', 'secret/metadata/app/x', token)).status).toBe(404);
      expect((await call('GET', 'secret/data/app/x', root)).status).toBe(404);
      const l = await call('LIST', 'secret/metadata/app/', token);
      expect(l.status).toBe(200);
      expect(l.body.data.keys).toEqual(['forbidden', 'y']);
      expect(await storedVersions()).toEqual([]);

      // Writing the key again starts a new history at version 1; old version 2 stays gone.
      const w = await call('POST', 'secret/data/app/x', token, { data: { v: 'fresh' } });
      expect(w.body.data.version).toBe(1);
      expect((await call('GET', 'secret/data/app/x?version=2', token)).status).toBe(404);
      expect((await call('GET', 'secret/data/app/x', token)).body.data.data).toEqual({ v: 'fresh' });
      expect((await call('GET', 'secret/metadata/app/x', token)).body.data).toMatchObject({ current_version: 1, oldest_version: 1 });
    });
  });
});

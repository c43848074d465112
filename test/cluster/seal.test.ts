/**
 * Seal lifecycle on real processes sharing one Postgres database: sys/init, seal-status,
 * per-process Shamir unseal (progress, nonce, reset, wrong shares), sys/rotate across processes
 * (checked byte by byte in SQL), sys/seal, and the static (auto-unseal) seal.
 *
 * The steps of the Shamir part share one cluster and run in order; each is its own test so a
 * failure names the step.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { mountKv2, startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { waitFor } from '../helpers/wait';

const dbs: TestDatabase[] = [];
afterAll(async () => {
  await stopAllCoffers();
  await Promise.all(dbs.map((d) => d.drop()));
});

async function freshDb(label: string): Promise<TestDatabase> {
  const db = await createTestDatabase(label);
  dbs.push(db);
  return db;
}

const sealStatus = async (p: CofferProcess) => (await vault(p.addr, 'GET', 'sys/seal-status')).body;
const unsealKey = (p: CofferProcess, key: string) => vault(p.addr, 'PUT', 'sys/unseal', { body: { key } });

/** The stored value of a KV v2 version entry, read as a DBA would. */
async function storedVersion(dbUrl: string, key: string, version: number): Promise<Buffer> {
  const hashed = createHash('sha256').update(key).digest('hex');
  // Version numbers are zero-padded in the path so path order is version order.
  const padded = String(version).padStart(20, '0');
  const c = await sqlClient(dbUrl);
  try {
    const { rows } = await c.query<{ path: string; value: Buffer }>(
      `SELECT path, value FROM coffer_entries WHERE path LIKE 'logical/%/versions/' || $1 || '/' || $2::text`,
      [hashed, padded],
    );
    expect(rows).toHaveLength(1);
    expect(rows[0].path).toMatch(new RegExp(`^logical/[0-9a-f-]{36}/versions/${hashed}/${padded}$`));
    return rows[0].value;
  } finally {
    await c.end();
  }
}

function termOfStored(value: Buffer): number {
  expect(value[0]).toBe(0x01);
  return value.readUInt32BE(1);
}

describe('Shamir seal on two processes of one cluster', () => {
  let db: TestDatabase;
  let a: CofferProcess;
  let b: CofferProcess;
  let keys: string[] = [];
  let keysB64: string[] = [];
  let root = '';

  beforeAll(async () => {
    db = await freshDb('seal');
    [a, b] = await Promise.all([startCoffer({ dbUrl: db.url }), startCoffer({ dbUrl: db.url })]);
  });

  test('before init: not initialised, health 501, seal-status describes an empty shamir seal', async () => {
    const init = await vault(a.addr, 'GET', 'sys/init');
    expect(init.status).toBe(200);
    expect(init.body).toEqual({ initialized: false });

    const h = await vault(a.addr, 'GET', 'sys/health');
    expect(h.status).toBe(501);
    expect(h.body).toMatchObject({ initialized: false, sealed: true });
    expect((await fetch(`${b.addr}/v1/sys/health`, { method: 'HEAD' })).status).toBe(501);

    for (const p of [a, b]) {
      const s = await vault(p.addr, 'GET', 'sys/seal-status');
      expect(s.status).toBe(200);
      expect(s.body).toMatchObject({ type: 'shamir', initialized: false, sealed: true, t: 0, n: 0, progress: 0, nonce: '' });
      expect(typeof s.body.version).toBe('string');
      expect(s.body.cluster_id).toBeUndefined();
    }
  });

  test('PUT sys/init 5/3: five hex keys, the same in base64, a root token; a second init is 400', async () => {
    const r = await vault(a.addr, 'PUT', 'sys/init', { body: { secret_shares: 5, secret_threshold: 3 } });
    expect(r.status).toBe(200);
    keys = r.body.keys;
    keysB64 = r.body.keys_base64;
    root = r.body.root_token;
    expect(keys).toHaveLength(5);
    expect(keysB64).toHaveLength(5);
    expect(new Set(keys).size).toBe(5);
    for (const [i, k] of keys.entries()) {
      expect(k).toMatch(/^[0-9a-f]+$/);
      expect(Buffer.from(k, 'hex').equals(Buffer.from(keysB64[i], 'base64'))).toBe(true);
    }
    expect(root).toMatch(/^hvs\.[A-Za-z0-9]{24}$/);
    expect(r.body.recovery_keys).toBeUndefined();

    for (const p of [a, b]) {
      const again = await vault(p.addr, 'PUT', 'sys/init', { body: { secret_shares: 5, secret_threshold: 3 } });
      expect(again.status).toBe(400);
      expect(again.body.errors).toEqual([expect.stringMatching(/already initialized/)]);
    }
    expect((await vault(b.addr, 'GET', 'sys/init')).body).toEqual({ initialized: true });
    // Init does not leave the process unsealed (Shamir): the shares are needed.
    for (const p of [a, b]) expect(await sealStatus(p)).toMatchObject({ type: 'shamir', initialized: true, sealed: true, t: 3, n: 5, progress: 0 });
  });

  test('while sealed: a KV request is 503 with errors, sys/health is 503', async () => {
    for (const p of [a, b]) {
      const kv = await vault(p.addr, 'GET', 'secret/data/anything', { token: root });
      expect(kv.status).toBe(503);
      expect(kv.body).toEqual({ errors: [expect.stringMatching(/sealed/)] });
      const w = await vault(p.addr, 'PUT', 'secret/data/anything', { token: root, body: { data: { x: 1 } } });
      expect(w.status).toBe(503);
      expect(w.body.errors.length).toBeGreaterThan(0);
      const h = await vault(p.addr, 'GET', 'sys/health');
      expect(h.status).toBe(503);
      expect(h.body).toMatchObject({ initialized: true, sealed: true });
    }
  });

  test('unseal A: progress counts shares, keeps its nonce, ignores a repeat; the third (hex and base64 mixed) unseals', async () => {
    const r1 = await unsealKey(a, keys[0]);
    expect(r1.status).toBe(200);
    expect(r1.body).toMatchObject({ sealed: true, t: 3, n: 5, progress: 1 });
    const nonce = r1.body.nonce;
    expect(nonce).toMatch(/^[0-9a-f-]{36}$/);

    // The same share again (in its other spelling) does not count twice.
    const repeat = await unsealKey(a, keysB64[0]);
    expect(repeat.body).toMatchObject({ sealed: true, progress: 1, nonce });

    const r2 = await unsealKey(a, keysB64[1]);
    expect(r2.status).toBe(200);
    expect(r2.body).toMatchObject({ sealed: true, t: 3, n: 5, progress: 2, nonce });
    expect(await sealStatus(a)).toMatchObject({ sealed: true, progress: 2, nonce });

    const r3 = await unsealKey(a, keys[2]);
    expect(r3.status).toBe(200);
    expect(r3.body).toMatchObject({ sealed: false, t: 3, n: 5, progress: 0, nonce: '' });
    expect(r3.body.cluster_id).toMatch(/^[0-9a-f-]{36}$/);
    expect(typeof r3.body.cluster_name).toBe('string');

    expect(await sealStatus(a)).toMatchObject({ sealed: false, initialized: true });
    await waitFor('A to answer sys/health as unsealed', async () => [200, 429].includes((await vault(a.addr, 'GET', 'sys/health')).status));
  });

  test('B is still sealed (each process unseals itself); reset clears its progress', async () => {
    expect(await sealStatus(b)).toMatchObject({ sealed: true, progress: 0, nonce: '' });
    expect((await vault(b.addr, 'GET', 'secret/data/x', { token: root })).status).toBe(503);

    const r1 = await unsealKey(b, keys[3]);
    expect(r1.body).toMatchObject({ sealed: true, progress: 1 });
    expect(r1.body.nonce).not.toBe('');
    const reset = await vault(b.addr, 'PUT', 'sys/unseal', { body: { reset: true } });
    expect(reset.status).toBe(200);
    expect(reset.body).toMatchObject({ sealed: true, progress: 0, nonce: '' });
    expect(await sealStatus(b)).toMatchObject({ sealed: true, progress: 0, nonce: '' });

    // Neither a key nor reset: the caller's error.
    const none = await vault(b.addr, 'PUT', 'sys/unseal', { body: {} });
    expect(none.status).toBe(400);
    expect(none.body.errors.length).toBeGreaterThan(0);
  });

  test("three shares of another cluster's init: 400, progress back to 0, still sealed", async () => {
    const otherDb = await freshDb('seal_other');
    const other = await startCoffer({ dbUrl: otherDb.url });
    const init = await vault(other.addr, 'PUT', 'sys/init', { body: { secret_shares: 5, secret_threshold: 3 } });
    expect(init.status).toBe(200);
    const foreign: string[] = init.body.keys;
    await other.kill();

    expect((await unsealKey(b, foreign[0])).body).toMatchObject({ sealed: true, progress: 1 });
    expect((await unsealKey(b, foreign[1])).body).toMatchObject({ sealed: true, progress: 2 });
    const bad = await unsealKey(b, foreign[2]);
    expect(bad.status).toBe(400);
    expect(bad.body.errors).toEqual([expect.stringMatching(/unseal key is incorrect/)]);
    expect(await sealStatus(b)).toMatchObject({ sealed: true, progress: 0, nonce: '' });
    expect((await vault(b.addr, 'GET', 'secret/data/x', { token: root })).status).toBe(503);
  });

  test('a malformed share (wrong length, or a repeated share index) is the caller\'s error, 400, not 500', async () => {
    // Vault wraps every failure to combine shares in ErrInvalidKey and answers 400.
    const wrongLength = randomBytes(16).toString('hex');
    const sameIndex = Buffer.from(keys[3], 'hex');
    sameIndex[0] ^= 0xff; // a different share with the same x coordinate (the last byte) as keys[3]
    const outcomes: Record<string, number> = {};
    for (const [name, bad] of [
      ['wrong length', wrongLength],
      ['repeated share index', sameIndex.toString('hex')],
    ] as const) {
      expect((await unsealKey(b, keys[3])).body).toMatchObject({ progress: 1 });
      expect((await unsealKey(b, bad)).body).toMatchObject({ progress: 2 });
      const r = await unsealKey(b, keys[4]);
      outcomes[name] = r.status;
      expect(await sealStatus(b)).toMatchObject({ sealed: true, progress: 0 });
    }
    expect(outcomes).toEqual({ 'wrong length': 400, 'repeated share index': 400 });
  });

  test('B unseals with its own three shares (a different three than A used)', async () => {
    expect((await unsealKey(b, keysB64[4])).body).toMatchObject({ sealed: true, progress: 1 });
    expect((await unsealKey(b, keys[3])).body).toMatchObject({ sealed: true, progress: 2 });
    const r = await unsealKey(b, keysB64[1]);
    expect(r.status).toBe(200);
    expect(r.body).toMatchObject({ sealed: false });
    expect(r.body.cluster_id).toBe((await sealStatus(a)).cluster_id);
  });

  test('sys/rotate: 204, key-status term 2; k1 (before) and k2 (written on B after) readable on both processes', async () => {
    await mountKv2(a.addr, root);
    const w1 = await vault(a.addr, 'PUT', 'secret/data/k1', { token: root, body: { data: { v: 'one' } } });
    expect(w1.status).toBe(200);

    const ks1 = await vault(a.addr, 'GET', 'sys/key-status', { token: root });
    expect(ks1.status).toBe(200);
    expect(ks1.body.data.term).toBe(1);

    // sys/rotate needs a token.
    expect((await vault(a.addr, 'PUT', 'sys/rotate')).status).toBe(403);
    const rot = await vault(a.addr, 'PUT', 'sys/rotate', { token: root });
    expect(rot.status).toBe(204);
    const ks2 = await vault(a.addr, 'GET', 'sys/key-status', { token: root });
    expect(ks2.status).toBe(200);
    expect(ks2.body.data).toMatchObject({ term: 2 });
    expect(ks2.body.term).toBe(2); // sys responses copy data keys to the top level

    const w2 = await vault(b.addr, 'PUT', 'secret/data/k2', { token: root, body: { data: { v: 'two' } } });
    expect(w2.status).toBe(200);
    for (const p of [b, a]) {
      for (const [k, v] of [['k2', 'two'], ['k1', 'one']]) {
        const r = await vault(p.addr, 'GET', `secret/data/${k}`, { token: root });
        expect(r.status).toBe(200);
        expect(r.body.data.data).toEqual({ v });
      }
    }
    // In SQL: k1's version entry is 0x01 | term 1 | ..., untouched by the rotation.
    expect(termOfStored(await storedVersion(db.url, 'k1', 1))).toBe(1);
  });

  test('k2, written on B after sys/rotate returned on A, is stored under term 2', async () => {
    // Vault: once sys/rotate has returned, "future values are encrypted with the new key",
    // whichever node takes the write. B loaded the keyring at unseal and reloads it only when
    // it meets a term it does not know, so nothing tells it about the new term before it writes.
    const k2Term = termOfStored(await storedVersion(db.url, 'k2', 1));
    expect(k2Term).toBe(2);
  });

  test('writes after rotation: A writes term 2; B, once it has read a term-2 value, writes term 2 too', async () => {
    const w3 = await vault(a.addr, 'PUT', 'secret/data/k3', { token: root, body: { data: { v: 'three' } } });
    expect(w3.status).toBe(200);
    expect(termOfStored(await storedVersion(db.url, 'k3', 1))).toBe(2);
    // B meets term 2 here and reloads its keyring from storage.
    const r3 = await vault(b.addr, 'GET', 'secret/data/k3', { token: root });
    expect(r3.status).toBe(200);
    expect(r3.body.data.data).toEqual({ v: 'three' });
    expect((await vault(b.addr, 'GET', 'sys/key-status', { token: root })).body.data.term).toBe(2);

    const w4 = await vault(b.addr, 'PUT', 'secret/data/k4', { token: root, body: { data: { v: 'four' } } });
    expect(w4.status).toBe(200);
    expect(termOfStored(await storedVersion(db.url, 'k4', 1))).toBe(2);
    for (const p of [a, b]) {
      for (const [k, v] of [['k1', 'one'], ['k2', 'two'], ['k3', 'three'], ['k4', 'four']]) {
        const r = await vault(p.addr, 'GET', `secret/data/${k}`, { token: root });
        expect(r.status).toBe(200);
        expect(r.body.data.data).toEqual({ v });
      }
    }
  });

  test('sys/seal: needs root; seals only that process, which answers 503; unseal again works', async () => {
    expect((await vault(a.addr, 'PUT', 'sys/seal')).status).toBe(403);
    expect((await vault(a.addr, 'PUT', 'sys/seal', { token: 'hvs.not-a-token' })).status).toBe(403);
    const s = await vault(a.addr, 'PUT', 'sys/seal', { token: root });
    expect(s.status).toBe(204);

    const kv = await vault(a.addr, 'GET', 'secret/data/k1', { token: root });
    expect(kv.status).toBe(503);
    expect(kv.body.errors.length).toBeGreaterThan(0);
    expect(await sealStatus(a)).toMatchObject({ sealed: true, initialized: true, progress: 0 });
    expect((await vault(a.addr, 'GET', 'sys/health')).status).toBe(503);

    // B is untouched.
    expect(await sealStatus(b)).toMatchObject({ sealed: false });
    expect((await vault(b.addr, 'GET', 'secret/data/k1', { token: root })).body.data.data).toEqual({ v: 'one' });

    for (const k of [keys[4], keysB64[2], keys[0]]) expect((await unsealKey(a, k)).status).toBe(200);
    expect(await sealStatus(a)).toMatchObject({ sealed: false });
    for (const k of ['k1', 'k2', 'k3', 'k4']) {
      const r = await vault(a.addr, 'GET', `secret/data/${k}`, { token: root });
      expect(r.status).toBe(200);
    }
  });
  test('sys/seal with a token on an already sealed process is not a 500', async () => {
    // A is unsealed again here; seal it, then seal it once more with the same token. Vault
    // answers 204 (sealing a sealed node is a no-op); a sealed error (503) would do too. Coffer
    // looks the token up in a token store that has no HMAC key while sealed and fails with 500.
    expect((await vault(a.addr, 'PUT', 'sys/seal', { token: root })).status).toBe(204);
    const again = await vault(a.addr, 'PUT', 'sys/seal', { token: root });
    const stepDown = await vault(a.addr, 'PUT', 'sys/step-down', { token: root });
    for (const k of [keys[0], keys[1], keys[2]]) expect((await unsealKey(a, k)).status).toBe(200);
    const acceptable = (status: number) => ([204, 503].includes(status) ? '204 or 503' : status);
    expect({ seal: acceptable(again.status), stepDown: acceptable(stepDown.status) }).toEqual({ seal: '204 or 503', stepDown: '204 or 503' });
  });
});

describe('static seal (auto-unseal)', () => {
  test('init returns recovery keys and unseals at once; a restart auto-unseals; a wrong key stays sealed and says why', async () => {
    const db = await freshDb('seal_static');
    const sealKey = randomBytes(32).toString('hex');
    const s1 = await startCoffer({ dbUrl: db.url, staticSealKeyHex: sealKey });
    expect(await sealStatus(s1)).toMatchObject({ type: 'static', initialized: false, sealed: true });

    const init = await vault(s1.addr, 'PUT', 'sys/init', { body: { recovery_shares: 5, recovery_threshold: 3 } });
    expect(init.status).toBe(200);
    expect(init.body.recovery_keys).toHaveLength(5);
    expect(init.body.recovery_keys_base64).toHaveLength(5);
    for (const [i, k] of (init.body.recovery_keys as string[]).entries()) {
      expect(Buffer.from(k, 'hex').equals(Buffer.from(init.body.recovery_keys_base64[i], 'base64'))).toBe(true);
    }
    expect(init.body.keys).toEqual([]);
    const root: string = init.body.root_token;
    expect(root).toMatch(/^hvs\./);

    // Unsealed at once, without any unseal call.
    expect(await sealStatus(s1)).toMatchObject({ type: 'static', initialized: true, sealed: false, recovery_seal: true, t: 3, n: 5 });
    await mountKv2(s1.addr, root);
    expect((await vault(s1.addr, 'PUT', 'secret/data/auto', { token: root, body: { data: { ok: true } } })).status).toBe(200);
    // An unseal call on an unsealed process just reports the status.
    const u = await unsealKey(s1, init.body.recovery_keys[0]);
    expect(u.status).toBe(200);
    expect(u.body).toMatchObject({ sealed: false });

    await s1.kill('SIGKILL');

    // Same database, same key: unsealed with no unseal call.
    const s2 = await startCoffer({ dbUrl: db.url, staticSealKeyHex: sealKey });
    await waitFor('the restarted process to auto-unseal', async () => (await sealStatus(s2)).sealed === false, { timeoutMs: 15_000 });
    const r = await vault(s2.addr, 'GET', 'secret/data/auto', { token: root });
    expect(r.status).toBe(200);
    expect(r.body.data.data).toEqual({ ok: true });
    await s2.kill('SIGKILL');

    // Same database, another key: stays sealed and its output names the problem.
    const s3 = await startCoffer({ dbUrl: db.url, staticSealKeyHex: randomBytes(32).toString('hex') });
    await waitFor('the wrong-key process to report why it cannot unseal', () => /auto-unseal failed[\s\S]*does not open this cluster's root key|does not open this cluster's root key[\s\S]*auto-unseal failed/.test(s3.output()), {
      timeoutMs: 15_000,
    });
    expect(await sealStatus(s3)).toMatchObject({ type: 'static', initialized: true, sealed: true });
    expect((await vault(s3.addr, 'GET', 'secret/data/auto', { token: root })).status).toBe(503);
    expect((await vault(s3.addr, 'GET', 'sys/health')).status).toBe(503);
    // Recovery keys do not unseal an auto-unseal seal.
    const u3 = await unsealKey(s3, init.body.recovery_keys[0]);
    expect(u3.status).toBe(400);
    expect(u3.body.errors).toEqual([expect.stringMatching(/auto-unseal/)]);
    expect(await sealStatus(s3)).toMatchObject({ sealed: true });
    // The output names the key id, never the key material.
    expect(s3.output()).toMatch(/test-key-1/);
    expect(s3.output()).not.toContain(sealKey);
  });
});

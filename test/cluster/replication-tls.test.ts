/**
 * Replication over mutual TLS between two clusters whose API listeners use TLS (certificates
 * from a test CA made here, trusted by the secondary through `ca_file`): the primary mints a
 * replication CA at primary/enable, the activation bundle carries the secondary's leaf, and
 * every replication call goes over the cluster listeners with client certificates.
 */
import 'reflect-metadata';
import { webcrypto, X509Certificate } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as https from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tls from 'node:tls';
import * as x509 from '@peculiar/x509';
import { startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { freePort } from '../helpers/replication';
import { waitFor } from '../helpers/wait';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

const INTERNAL = '/v1/sys/replication/performance/internal';
const ALG = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
type Keys = { publicKey: webcrypto.CryptoKey; privateKey: webcrypto.CryptoKey };

const dbs: TestDatabase[] = [];
const dir = mkdtempSync(join(tmpdir(), 'coffer-tls-test-'));
afterAll(async () => {
  await stopAllCoffers();
  for (const d of dbs) await d.drop();
  rmSync(dir, { recursive: true, force: true });
});

// ------------------------------------------------------------------ a test CA for the API listeners

const pemKey = async (k: webcrypto.CryptoKey) =>
  `-----BEGIN PRIVATE KEY-----\n${Buffer.from(await webcrypto.subtle.exportKey('pkcs8', k)).toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '')}\n-----END PRIVATE KEY-----\n`;

async function testCa(cn: string) {
  const keys = (await webcrypto.subtle.generateKey(ALG, true, ['sign', 'verify'])) as Keys;
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: '01',
    name: `CN=${cn}`,
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 86_400_000),
    keys,
    signingAlgorithm: ALG,
    extensions: [new x509.BasicConstraintsExtension(true, undefined, true), new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign, true)],
  });
  return { cert, keys, pem: cert.toString('pem') + '\n' };
}

/** A certificate from `ca` for 127.0.0.1 (server and client use). */
async function testLeaf(ca: Awaited<ReturnType<typeof testCa>>, cn: string, serial: string) {
  const keys = (await webcrypto.subtle.generateKey(ALG, true, ['sign', 'verify'])) as Keys;
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial,
    subject: `CN=${cn}`,
    issuer: ca.cert.subject,
    notBefore: new Date(Date.now() - 60_000),
    notAfter: new Date(Date.now() + 86_400_000),
    publicKey: keys.publicKey,
    signingKey: ca.keys.privateKey,
    signingAlgorithm: ALG,
    extensions: [
      new x509.SubjectAlternativeNameExtension([{ type: 'ip', value: '127.0.0.1' }]),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
    ],
  });
  return { cert: cert.toString('pem') + '\n', key: await pemKey(keys.privateKey) };
}

// ------------------------------------------------------------------ HTTPS client (fetch takes no CA)

interface Tls {
  ca?: string;
  cert?: string;
  key?: string;
  /** Replication certificates name roles, not hosts: skip the host name check (the chain is still verified). */
  anyName?: boolean;
}

function request(url: string, method: string, o: { token?: string; body?: unknown; headers?: Record<string, string>; tls?: Tls } = {}): Promise<{ status: number; body: any }> {
  const payload = o.body === undefined ? undefined : JSON.stringify(o.body);
  return new Promise((resolve, reject) => {
    const req = https.request(
      url,
      {
        method,
        agent: false,
        ca: o.tls?.ca,
        cert: o.tls?.cert,
        key: o.tls?.key,
        ...(o.tls?.anyName ? { checkServerIdentity: () => undefined } : {}),
        headers: { ...(o.token ? { 'x-vault-token': o.token } : {}), ...(payload ? { 'content-type': 'application/json' } : {}), ...(o.headers ?? {}) },
        timeout: 10_000,
      },
      (res) => {
        let text = '';
        res.on('data', (c) => (text += c));
        res.on('end', () => {
          let body: any = text;
          try {
            body = text ? JSON.parse(text) : null;
          } catch {
            /* text */
          }
          resolve({ status: res.statusCode ?? 0, body });
        });
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

/** A TLS client on the cluster listener: resolves with what happened (handshake refused, or an HTTP answer). */
function rawCluster(port: number, creds: { cert?: string; key?: string }): Promise<{ error: string | null; received: string }> {
  return new Promise((resolve) => {
    let received = '';
    let error: string | null = null;
    const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, ...creds }, () => {
      s.write(`POST ${INTERNAL}/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`);
    });
    s.on('data', (d) => (received += d.toString()));
    s.on('error', (e) => (error = e.message));
    s.on('close', () => resolve({ error, received }));
    s.setTimeout(5000, () => s.destroy(new Error('timeout')));
  });
}

function peerCertificate(port: number, creds: { cert?: string; key?: string } = {}): Promise<tls.PeerCertificate> {
  return new Promise((resolve, reject) => {
    const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false, ...creds }, () => {
      const c = s.getPeerCertificate(true);
      s.destroy();
      resolve(c);
    });
    s.on('error', reject);
  });
}

const credentialHeader = (id: string, secret: string) => `${Buffer.from(id).toString('base64url')}.${secret}`;

// ------------------------------------------------------------------ clusters

interface TlsCluster {
  p: CofferProcess;
  addr: string;
  clusterAddr: string;
  clusterPort: number;
  token: string;
  db: TestDatabase;
}

async function startTlsCluster(label: string, server: { cert: string; key: string }): Promise<TlsCluster> {
  const db = await createTestDatabase(label);
  dbs.push(db);
  writeFileSync(join(dir, `${label}.crt`), server.cert);
  writeFileSync(join(dir, `${label}.key`), server.key);
  const clusterPort = await freePort();
  const clusterAddr = `https://127.0.0.1:${clusterPort}`;
  const p = await startCoffer({
    dbUrl: db.url,
    logLevel: 'debug',
    listenerHcl:
      `listener "tcp" {\n  address = "127.0.0.1:0"\n  tls_cert_file = "${join(dir, `${label}.crt`)}"\n  tls_key_file = "${join(dir, `${label}.key`)}"\n}\n` +
      `cluster_addr = "${clusterAddr}"\n`,
  });
  expect(p.addr).toMatch(/^https:\/\/127\.0\.0\.1:\d+$/);
  const ca = site.pem;
  const init = await request(`${p.addr}/v1/sys/init`, 'PUT', { body: { secret_shares: 1, secret_threshold: 1 }, tls: { ca } });
  expect(init.status).toBe(200);
  expect((await request(`${p.addr}/v1/sys/unseal`, 'PUT', { body: { key: init.body.keys[0] }, tls: { ca } })).status).toBe(200);
  return { p, addr: p.addr, clusterAddr, clusterPort, token: init.body.root_token, db };
}

let site: Awaited<ReturnType<typeof testCa>>;

test('replication over mutual TLS: ca_file, streaming, forwarding, refusals at the TLS layer, per-secondary leaves, no key leaks', async () => {
  site = await testCa('Coffer test site CA');
  const caFile = join(dir, 'site-ca.pem');
  writeFileSync(caFile, site.pem);
  const ca = site.pem;
  const api = (c: TlsCluster, method: string, path: string, body?: unknown) => request(`${c.addr}/v1/${path}`, method, { token: c.token, body, tls: { ca } });
  const status = async (c: TlsCluster) => (await request(`${c.addr}/v1/sys/replication/performance/status`, 'GET', { tls: { ca } })).body.data;

  const pri = await startTlsCluster('rtls-primary', await testLeaf(site, 'primary.test', '02'));
  const sec = await startTlsCluster('rtls-secondary', await testLeaf(site, 'secondary.test', '03'));
  expect(pri.p.output()).toContain(`Cluster listener (replication, mutual TLS) on ${pri.clusterAddr}`);

  expect((await api(pri, 'POST', 'sys/mounts/secret', { type: 'kv', options: { version: '2' } })).status).toBe(204);
  for (let i = 0; i < 20; i++) expect((await api(pri, 'POST', `secret/data/before/${i}`, { data: { i } })).status).toBe(200);
  expect((await api(pri, 'POST', 'sys/replication/performance/primary/enable', {})).status).toBe(200);

  // The primary's cluster listener presents its own leaf, from a CA that is not the site's.
  const priLeaf = await waitFor('the primary cluster listener to have its certificate', () => peerCertificate(pri.clusterPort).catch(() => null));
  expect(priLeaf.subject.CN).toMatch(/^coffer-primary:/);
  expect(priLeaf.issuer.CN).toMatch(/^Coffer replication CA/);

  const tok = await api(pri, 'POST', 'sys/replication/performance/primary/secondary-token', { id: 'dc2' });
  expect(tok.status).toBe(200);
  const activation: string = tok.body.wrap_info.token;

  // Without ca_file the primary's API certificate is not trusted: refused before the token is spent.
  const untrusted = await api(sec, 'POST', 'sys/replication/performance/secondary/enable', { token: activation });
  expect(untrusted.status).toBeGreaterThanOrEqual(400);
  expect(JSON.stringify(untrusted.body)).toMatch(/certificate/i);
  // A ca_file that does not exist is refused with a message, not ignored.
  expect((await api(sec, 'POST', 'sys/replication/performance/secondary/enable', { token: activation, ca_file: join(dir, 'nope.pem') })).status).toBe(400);

  const en = await api(sec, 'POST', 'sys/replication/performance/secondary/enable', { token: activation, ca_file: caFile });
  expect([en.status, en.body?.errors]).toEqual([200, undefined]);
  await waitFor('the secondary to stream', async () => (await status(sec)).state === 'stream-wals', { timeoutMs: 30_000 });

  // Replicated before and after; a write on the secondary is forwarded and read back there.
  await waitFor('bootstrapped data', async () => (await api(sec, 'GET', 'secret/data/before/19')).status === 200, { timeoutMs: 20_000 });
  for (let i = 0; i < 20; i++) expect((await api(pri, 'POST', `secret/data/after/${i}`, { data: { i } })).status).toBe(200);
  await waitFor('streamed data', async () => (await api(sec, 'GET', 'secret/data/after/19')).status === 200, { timeoutMs: 20_000 });
  expect((await api(sec, 'GET', 'secret/data/after/7')).body.data.data).toEqual({ i: 7 });
  const fw = await api(sec, 'POST', 'secret/data/from-secondary', { data: { x: 1 } });
  expect([fw.status, fw.body.warnings ?? []]).toEqual([200, []]);
  expect((await api(sec, 'GET', 'secret/data/from-secondary')).body.data.data).toEqual({ x: 1 });
  expect((await api(pri, 'GET', 'secret/data/from-secondary')).body.data.data).toEqual({ x: 1 });

  // The secondary's cluster listener presents the leaf issued for "dc2" by the primary's CA.
  const secLeaf = await peerCertificate(sec.clusterPort);
  expect(secLeaf.subject.CN).toBe('dc2');
  expect(secLeaf.issuer.CN).toBe(priLeaf.issuer.CN);

  // ---- refusals at the TLS layer: no client certificate, or one from another CA (even named "dc2")
  for (const port of [pri.clusterPort, sec.clusterPort]) {
    // The server ends the connection with a TLS alert (the client sees an error, or just the
    // close): not one byte of HTTP comes back, and it is not a timeout.
    const none = await rawCluster(port, {});
    expect([none.received, none.error]).not.toContain('timeout');
    expect(none.received).toBe('');
    const foreign = await rawCluster(port, await testLeaf(site, 'dc2', '04'));
    expect([foreign.received, foreign.error]).not.toContain('timeout');
    expect(foreign.received).toBe('');
  }

  // ---- a leaf issued for one secondary cannot carry another secondary's credential
  const bundle = async (id: string) => {
    const t = await api(pri, 'POST', 'sys/replication/performance/primary/secondary-token', { id });
    const wrapping = JSON.parse(Buffer.from(String(t.body.wrap_info.token).slice('cofferact.'.length), 'base64url').toString('utf8'));
    expect(wrapping.tls).toBe(true);
    const u = await request(`${pri.addr}/v1/sys/wrapping/unwrap`, 'POST', { token: wrapping.token, body: {}, tls: { ca } });
    expect(u.status).toBe(200);
    return u.body.data as { secondary_id: string; secret: string; tls: { ca: string; cert: string; key: string; primary_name: string; primary_cluster_addr: string } };
  };
  const a = await bundle('tls-a');
  const b = await bundle('tls-b');
  expect(a.tls.ca).toBe(b.tls.ca);
  expect(a.tls.ca).not.toMatch(/PRIVATE KEY/);
  expect(a.tls.primary_cluster_addr).toBe(pri.clusterAddr);
  expect(new X509Certificate(a.tls.cert).verify(new X509Certificate(a.tls.ca).publicKey)).toBe(true);
  expect(new X509Certificate(secLeaf.raw).verify(new X509Certificate(a.tls.ca).publicKey)).toBe(true);
  const beat = (leaf: { cert: string; key: string } | null, cred: { secondary_id: string; secret: string }, base = pri.clusterAddr) =>
    request(`${base}${INTERNAL}/heartbeat`, 'POST', {
      body: {},
      headers: { 'x-coffer-replication': credentialHeader(cred.secondary_id, cred.secret) },
      tls: leaf ? { ca: a.tls.ca, cert: leaf.cert, key: leaf.key, anyName: true } : { ca },
    });
  // Control for the refusals above: a leaf from the replication CA gets through TLS to HTTP.
  expect((await rawCluster(pri.clusterPort, { cert: a.tls.cert, key: a.tls.key })).received).toMatch(/^HTTP\/1\.1 403/);
  expect((await beat(a.tls, a)).status).toBe(200); // its own leaf and credential
  expect((await beat(b.tls, b)).status).toBe(200);
  expect((await beat(a.tls, b)).status).toBe(403); // A's leaf, B's credential
  expect((await beat(b.tls, a)).status).toBe(403);
  // The right credential on the API listener (no client certificate) is refused: TLS mode.
  const viaApi = await beat(null, a, pri.addr);
  expect(viaApi.status).toBe(403);
  expect(JSON.stringify(viaApi.body)).toMatch(/cluster listener/);
  // A secondary takes batches only from the primary's leaf: another secondary's leaf is refused.
  const push = await request(`${sec.clusterAddr}${INTERNAL}/apply`, 'POST', {
    body: { from_lsn: 1, to_lsn: 1, entries: [] },
    headers: { 'x-coffer-replication': credentialHeader(a.secondary_id, a.secret) },
    tls: { ca: a.tls.ca, cert: a.tls.cert, key: a.tls.key, anyName: true },
  });
  expect(push.status).toBe(403);
  for (const id of ['tls-a', 'tls-b']) expect((await api(pri, 'POST', 'sys/replication/performance/primary/revoke-secondary', { id })).status).toBe(204);

  // ---- converged: same data, same merkle root
  const converged = await waitFor(
    'the secondary to catch up with the same merkle root',
    async () => {
      const p = await status(pri);
      const s = await status(sec);
      return p.last_wal > 0 && s.last_remote_wal === p.last_wal && s.merkle_root === p.merkle_root ? { p, s } : null;
    },
    { timeoutMs: 30_000, intervalMs: 200 },
  );
  expect(converged.s.merkle_root).not.toBe('');
  expect(converged.p.known_secondaries).toEqual(['dc2']);

  // ---- the CA key never ships: only the primary's local storage holds it, encrypted
  for (const c of [pri, sec]) {
    const sql = await sqlClient(c.db.url);
    try {
      for (const table of ['coffer_entries', 'coffer_wal']) {
        const leaked = await sql.query(`SELECT count(*)::int AS n FROM ${table} WHERE path LIKE 'core/replication/%'`);
        expect([c.db.url, table, leaked.rows[0].n]).toEqual([c.db.url, table, 0]);
      }
      const plain = await sql.query(
        `SELECT (SELECT count(*) FROM coffer_entries WHERE position('PRIVATE KEY'::bytea IN coalesce(value, ''::bytea)) > 0)
              + (SELECT count(*) FROM coffer_local_entries WHERE position('PRIVATE KEY'::bytea IN value) > 0) AS n`,
      );
      expect(Number(plain.rows[0].n)).toBe(0);
      const local = (await sql.query(`SELECT path FROM coffer_local_entries WHERE path LIKE 'core/replication/tls/%' ORDER BY path`)).rows.map((r) => r.path);
      if (c === pri) expect(local).toEqual(expect.arrayContaining(['core/replication/tls/ca', 'core/replication/tls/primary']));
      else expect(local).toEqual([]);
    } finally {
      await sql.end();
    }
  }
  // Nor do keys reach the logs (debug level): neither PEM keys nor the leaf keys' bodies.
  const keyBody = (pem: string) => pem.replace(/-----[^-]+-----/g, '').replace(/\s+/g, '').slice(0, 40);
  for (const c of [pri, sec]) {
    const out = c.p.output();
    expect(out).not.toMatch(/PRIVATE KEY/);
    expect(out).not.toContain(keyBody(a.tls.key));
    expect(out).not.toContain(keyBody(b.tls.key));
  }
}, 120_000);

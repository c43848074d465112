/**
 * The replication PKI (src/replication/pki.ts), the TLS side of the wire client, and the trust
 * rules of src/replication/cluster-tls.ts: real certificates, real TLS handshakes on loopback.
 */
import { createPrivateKey, X509Certificate } from 'node:crypto';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import * as https from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tls from 'node:tls';
import { admitsPrimary, loadCaRoots, routeToPrimary, type Credential } from '../../src/replication/cluster-tls';
import { commonNameOf, createCa, issueLeaf, primaryCommonName, type CertAndKey } from '../../src/replication/pki';
import { call, decodeActivation, encodeActivation } from '../../src/replication/wire';

let ca: CertAndKey;
let other: CertAndKey;
let server: CertAndKey;
let client: CertAndKey;
let stranger: CertAndKey;

beforeAll(async () => {
  ca = await createCa('Coffer replication CA test');
  other = await createCa('Another CA');
  server = await issueLeaf(ca, primaryCommonName('set-1'));
  client = await issueLeaf(ca, 'dc2');
  stranger = await issueLeaf(other, 'dc2');
});

test('the CA is a self-signed ECDSA P-256 CA; its key is PKCS #8', () => {
  const c = new X509Certificate(ca.cert);
  expect(c.ca).toBe(true);
  expect(c.subject).toBe(c.issuer);
  expect(c.verify(c.publicKey)).toBe(true);
  expect(c.publicKey.asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
  expect(ca.key).toMatch(/^-----BEGIN PRIVATE KEY-----/);
  expect(createPrivateKey(ca.key).asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
  expect(new Date(c.validTo).getTime()).toBeGreaterThan(Date.now() + 9 * 365 * 86_400_000);
});

test('a leaf is signed by its CA, names its holder, serves and authenticates clients, and is no CA', () => {
  const leaf = new X509Certificate(client.cert);
  const issuer = new X509Certificate(ca.cert);
  expect(commonNameOf(client.cert)).toBe('dc2');
  expect(leaf.checkIssued(issuer)).toBe(true);
  expect(leaf.verify(issuer.publicKey)).toBe(true);
  expect(leaf.verify(new X509Certificate(other.cert).publicKey)).toBe(false);
  expect(leaf.ca).toBe(false);
  expect(leaf.keyUsage).toEqual(expect.arrayContaining(['1.3.6.1.5.5.7.3.1', '1.3.6.1.5.5.7.3.2']));
  expect(new Date(leaf.validTo).getTime()).toBeLessThanOrEqual(new Date(issuer.validTo).getTime());
  // Each leaf has its own key.
  expect(client.key).not.toBe(server.key);
  expect(createPrivateKey(client.key).asymmetricKeyDetails?.namedCurve).toBe('prime256v1');
});

test("the primary's name can never be a secondary id", () => {
  const name = primaryCommonName('3f1c');
  expect(commonNameOf(server.cert)).toBe(primaryCommonName('set-1'));
  expect(/^[\w.-]{1,128}$/.test(name)).toBe(false);
});

/** A mutual-TLS HTTPS server like the cluster listener: answers with the client's CN. */
async function mtlsServer(opts: { delayMs?: number } = {}): Promise<{ url: string; close: () => Promise<void> }> {
  const s = https.createServer({ cert: server.cert, key: server.key, ca: ca.cert, requestCert: true, rejectUnauthorized: true }, (req, res) => {
    const cn = (req.socket as tls.TLSSocket).getPeerCertificate().subject?.CN;
    setTimeout(() => res.writeHead(200, { 'content-type': 'application/json', 'x-peer': String(cn) }).end(JSON.stringify({ cn })), opts.delayMs ?? 0);
  });
  s.on('tlsClientError', () => undefined);
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  return {
    url: `https://127.0.0.1:${(s.address() as AddressInfo).port}`,
    close: () =>
      new Promise<void>((r) => {
        s.closeAllConnections();
        s.close(() => r());
      }),
  };
}

describe('call() with a TLS context', () => {
  const peerName = primaryCommonName('set-1');

  test('mutual TLS: the server sees our leaf, we check its name instead of the host', async () => {
    const srv = await mtlsServer();
    try {
      const r = await call<{ cn: string }>(`${srv.url}/x`, { body: { a: 1 }, tls: { ca: ca.cert, cert: client.cert, key: client.key, peerName } });
      expect(r.status).toBe(200);
      expect(r.body).toEqual({ cn: 'dc2' });
      expect(r.headers.get('x-peer')).toBe('dc2');
    } finally {
      await srv.close();
    }
  });

  test('refused: a server with another name, no client certificate, a client certificate from another CA, a server we do not trust', async () => {
    const srv = await mtlsServer();
    try {
      await expect(call(`${srv.url}/x`, { tls: { ca: ca.cert, cert: client.cert, key: client.key, peerName: 'dc3' } })).rejects.toThrow(/cannot reach .*not "dc3"/);
      await expect(call(`${srv.url}/x`, { tls: { ca: ca.cert, peerName } })).rejects.toMatchObject({ kind: 'upstream_unavailable' });
      await expect(call(`${srv.url}/x`, { tls: { ca: ca.cert, cert: stranger.cert, key: stranger.key, peerName } })).rejects.toMatchObject({ kind: 'upstream_unavailable' });
      await expect(call(`${srv.url}/x`, { tls: { ca: other.cert, cert: client.cert, key: client.key, peerName } })).rejects.toMatchObject({ kind: 'upstream_unavailable' });
    } finally {
      await srv.close();
    }
  });

  test('a timeout is UpstreamUnavailable', async () => {
    const srv = await mtlsServer({ delayMs: 2000 });
    try {
      await expect(call(`${srv.url}/x`, { timeoutMs: 200, tls: { ca: ca.cert, cert: client.cert, key: client.key, peerName } })).rejects.toMatchObject({ kind: 'upstream_unavailable' });
    } finally {
      await srv.close();
    }
  });
});

test('activation tokens say whether the bundle carries certificates', () => {
  expect(decodeActivation(encodeActivation('https://p:8200', 'hvs.x', true))).toEqual({ addr: 'https://p:8200', token: 'hvs.x', tls: true });
  expect(decodeActivation(encodeActivation('https://p:8200', 'hvs.x'))).toEqual({ addr: 'https://p:8200', token: 'hvs.x' });
});

test('trust rules: a secondary with certificates takes batches only from the primary leaf on its cluster listener', () => {
  const bundle = { ca: ca.cert, cert: client.cert, key: client.key, primary_name: primaryCommonName('set-1'), primary_cluster_addr: 'https://p:8201' };
  const withTls: Credential = { secondary_id: 'dc2', secret: 's', tls: bundle };
  const plain: Credential = { secondary_id: 'dc2', secret: 's', api_ca: ca.cert };
  expect(admitsPrimary(withTls, { cn: primaryCommonName('set-1'), relayed: false })).toBe(true);
  expect(admitsPrimary(withTls, { cn: 'dc3', relayed: false })).toBe(false);
  expect(admitsPrimary(withTls, { cn: primaryCommonName('set-2'), relayed: false })).toBe(false);
  expect(admitsPrimary(withTls, undefined)).toBe(false);
  expect(admitsPrimary(plain, undefined)).toBe(true);
  expect(admitsPrimary(plain, { cn: primaryCommonName('set-1'), relayed: false })).toBe(false);
  expect(routeToPrimary(withTls, 'https://p:8200')).toEqual({ base: 'https://p:8201', tls: { ca: ca.cert, cert: client.cert, key: client.key, peerName: bundle.primary_name } });
  expect(routeToPrimary(plain, 'https://p:8200')).toEqual({ base: 'https://p:8200', tls: { ca: ca.cert } });
  expect(routeToPrimary({ secondary_id: 'dc2', secret: 's' }, 'http://p:8200')).toEqual({ base: 'http://p:8200', tls: undefined });
});

test('ca_file and ca_path: PEM certificates are read; missing or empty sources are refused', () => {
  const dir = mkdtempSync(join(tmpdir(), 'coffer-ca-'));
  try {
    writeFileSync(join(dir, 'one.pem'), ca.cert);
    writeFileSync(join(dir, 'junk.pem'), 'not a certificate');
    mkdirSync(join(dir, 'roots'));
    writeFileSync(join(dir, 'roots', 'a.crt'), ca.cert);
    writeFileSync(join(dir, 'roots', 'b.crt'), other.cert);
    expect(loadCaRoots(join(dir, 'one.pem'))).toContain(ca.cert.trim());
    const both = loadCaRoots(undefined, join(dir, 'roots'))!;
    expect(both).toContain(ca.cert.trim());
    expect(both).toContain(other.cert.trim());
    expect(loadCaRoots()).toBeUndefined();
    expect(() => loadCaRoots(join(dir, 'missing.pem'))).toThrow(/cannot read ca_file/);
    expect(() => loadCaRoots(join(dir, 'junk.pem'))).toThrow(/holds no PEM certificate/);
    expect(() => loadCaRoots(undefined, join(dir, 'nope'))).toThrow(/cannot read ca_path/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

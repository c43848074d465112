/**
 * The replication PKI (vault-api.md §3.7): a primary mints a self-signed CA that never leaves
 * it, and issues from it one leaf per secondary (and one for itself). Primary and secondaries
 * then talk mutual TLS on their cluster listeners, each presenting its leaf; a certificate's
 * common name says who it is (the secondary's id, or the primary's name).
 *
 * X.509 is built by @peculiar/x509 on Node's WebCrypto (ECDSA P-256, SHA-256), not by
 * hand-written ASN.1. It needs the reflect-metadata polyfill (its DI container, tsyringe,
 * refuses to load without it), imported here once.
 */
import 'reflect-metadata';
import { randomBytes, webcrypto } from 'node:crypto';
import * as x509 from '@peculiar/x509';

type Keys = { publicKey: webcrypto.CryptoKey; privateKey: webcrypto.CryptoKey };

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

/** A certificate and its private key, both PEM (the key as PKCS #8). */
export interface CertAndKey {
  cert: string;
  key: string;
}

const ALG = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' } as const;
const DAY_MS = 24 * 3600 * 1000;
/** Clock skew tolerated between clusters: certificates are valid from a little before "now". */
const BACKDATE_MS = 10 * 60 * 1000;
const CA_DAYS = 10 * 365;
const LEAF_DAYS = 10 * 365;

/**
 * The common name of a primary's own leaf. It contains ':', which a secondary id never does
 * (ids are letters, digits, '.', '_', '-'), so no secondary's leaf can pass for the primary's.
 */
export function primaryCommonName(setId: string): string {
  return `coffer-primary:${setId}`;
}

function serial(): string {
  const b = randomBytes(16);
  b[0] &= 0x7f; // a positive INTEGER
  if (b[0] === 0) b[0] = 1;
  return b.toString('hex');
}

function pemKey(der: ArrayBuffer): string {
  const b64 = Buffer.from(der).toString('base64').replace(/(.{64})/g, '$1\n').replace(/\n$/, '');
  return `-----BEGIN PRIVATE KEY-----\n${b64}\n-----END PRIVATE KEY-----\n`;
}

function derOfPem(pem: string): Buffer {
  return Buffer.from(pem.replace(/-----[^-]+-----/g, '').replace(/\s+/g, ''), 'base64');
}

/** A subject with just a common name (the JSON form: nothing in `cn` needs escaping). */
function dnName(cn: string): x509.Name {
  return new x509.Name([{ '2.5.4.3': [cn] }]);
}

async function newKeys(): Promise<Keys> {
  return (await webcrypto.subtle.generateKey(ALG, true, ['sign', 'verify'])) as Keys;
}

async function exportKey(key: webcrypto.CryptoKey): Promise<string> {
  return pemKey(await webcrypto.subtle.exportKey('pkcs8', key));
}

/** A new self-signed replication CA (ECDSA P-256), valid for ten years. */
export async function createCa(commonName: string, now = new Date()): Promise<CertAndKey> {
  const keys = await newKeys();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: dnName(commonName),
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter: new Date(now.getTime() + CA_DAYS * DAY_MS),
    keys,
    signingAlgorithm: ALG,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { cert: cert.toString('pem') + '\n', key: await exportKey(keys.privateKey) };
}

/**
 * A leaf signed by `ca` for `commonName`: usable both as a TLS server and as a TLS client
 * certificate (serverAuth and clientAuth), never as a CA. Its key is new and returned with it.
 */
export async function issueLeaf(ca: CertAndKey, commonName: string, now = new Date()): Promise<CertAndKey> {
  const caCert = new x509.X509Certificate(ca.cert);
  const caKey = await webcrypto.subtle.importKey('pkcs8', derOfPem(ca.key), ALG, false, ['sign']);
  const keys = await newKeys();
  const notAfter = new Date(Math.min(now.getTime() + LEAF_DAYS * DAY_MS, caCert.notAfter.getTime()));
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: dnName(commonName),
    issuer: caCert.subjectName,
    notBefore: new Date(now.getTime() - BACKDATE_MS),
    notAfter,
    publicKey: keys.publicKey,
    signingKey: caKey,
    signingAlgorithm: ALG,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(caCert),
    ],
  });
  return { cert: cert.toString('pem') + '\n', key: await exportKey(keys.privateKey) };
}

/** The subject common name of a PEM certificate. */
export function commonNameOf(certPem: string): string {
  return new x509.X509Certificate(certPem).subjectName.getField('CN')[0] ?? '';
}

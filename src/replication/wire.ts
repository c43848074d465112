/**
 * What crosses the wire between clusters: the activation token, the replication credential,
 * and a small JSON-over-HTTP client. Values travel as base64 of their ciphertext; nothing
 * here ever holds a plaintext secret.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { InvalidRequest, UpstreamUnavailable } from '../core/errors';

export const CREDENTIAL_HEADER = 'x-coffer-replication';
const ACTIVATION_PREFIX = 'cofferact.';

/** The activation token: the primary's address and a single-use wrapping token. */
export function encodeActivation(addr: string, wrappingToken: string): string {
  return ACTIVATION_PREFIX + Buffer.from(JSON.stringify({ addr, token: wrappingToken })).toString('base64url');
}

export function decodeActivation(token: string): { addr: string; token: string } {
  if (!token.startsWith(ACTIVATION_PREFIX)) throw new InvalidRequest('invalid activation token');
  try {
    const v = JSON.parse(Buffer.from(token.slice(ACTIVATION_PREFIX.length), 'base64url').toString('utf8'));
    if (typeof v.addr !== 'string' || typeof v.token !== 'string') throw new Error('shape');
    return v;
  } catch {
    throw new InvalidRequest('invalid activation token');
  }
}

export function newSecret(): string {
  return randomBytes(32).toString('base64url');
}

/** The secret is 256 random bits, so a plain SHA-256 is a safe verifier to store. */
export function secretDigest(secret: string): Buffer {
  return createHash('sha256').update(secret).digest();
}

export function secretMatches(secret: string, digest: Buffer | null): boolean {
  if (!digest) return false;
  const d = secretDigest(secret);
  return d.length === digest.length && timingSafeEqual(d, digest);
}

export function credentialHeader(secondaryId: string, secret: string): string {
  return `${Buffer.from(secondaryId).toString('base64url')}.${secret}`;
}

export function parseCredentialHeader(v: string | undefined): { secondaryId: string; secret: string } | null {
  if (!v) return null;
  const dot = v.indexOf('.');
  if (dot <= 0) return null;
  return { secondaryId: Buffer.from(v.slice(0, dot), 'base64url').toString('utf8'), secret: v.slice(dot + 1) };
}

export interface WireResponse<T> {
  status: number;
  body: T;
  headers: Headers;
}

/** POST/GET JSON to another cluster, with a timeout; network failures become UpstreamUnavailable. */
export async function call<T>(
  url: string,
  opts: { method?: string; body?: unknown; headers?: Record<string, string>; timeoutMs?: number } = {},
): Promise<WireResponse<T>> {
  let res: Response;
  try {
    res = await fetch(url, {
      method: opts.method ?? (opts.body === undefined ? 'GET' : 'POST'),
      headers: { 'content-type': 'application/json', ...(opts.headers ?? {}) },
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      signal: AbortSignal.timeout(opts.timeoutMs ?? 10_000),
    });
  } catch (err) {
    throw new UpstreamUnavailable(`cannot reach ${new URL(url).origin}: ${(err as Error).message}`);
  }
  const text = await res.text();
  let body: unknown = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { errors: [text.slice(0, 200)] };
  }
  return { status: res.status, body: body as T, headers: res.headers };
}

/** Addresses a secondary may not be pointed at unless configured (SSRF to cloud metadata). */
export function assertSafePrimaryAddr(addr: string, allowUnsafe = false): void {
  let u: URL;
  try {
    u = new URL(addr);
  } catch {
    throw new InvalidRequest(`primary_api_addr "${addr}" is not a URL`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new InvalidRequest('primary_api_addr must be http(s)');
  const host = u.hostname.replace(/^\[|\]$/g, '');
  const linkLocal = /^169\.254\./.test(host) || /^fe80:/i.test(host) || host === 'metadata.google.internal' || host === '100.100.100.200' || host === 'fd00:ec2::254';
  if (linkLocal && !allowUnsafe) throw new InvalidRequest(`primary_api_addr "${addr}" points at a link-local or metadata address`);
}

/** Semantic version comparison (a.b.c). */
export function compareVersions(a: string, b: string): number {
  const pa = a.split('.').map((x) => parseInt(x, 10) || 0);
  const pb = b.split('.').map((x) => parseInt(x, 10) || 0);
  for (let i = 0; i < 3; i++) if ((pa[i] ?? 0) !== (pb[i] ?? 0)) return (pa[i] ?? 0) - (pb[i] ?? 0);
  return 0;
}

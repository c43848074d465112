/**
 * The HTTP frame of a running server, as Vault clients meet it: bad input is the caller's
 * error (4xx with `{"errors": [...]}`, never a 5xx, never a crash), LIST works as a method
 * (through real curl) and as `?list=`, both token headers work, writes carry X-Vault-Index,
 * and sys/health honours Vault's query overrides on GET and HEAD.
 */
import { execFile } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { createTestDatabase, type TestDatabase } from '../helpers/pg';
import { mountKv2, startCoffer, stopAllCoffers, unseal, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { waitFor } from '../helpers/wait';

const run = promisify(execFile);

let db: TestDatabase;
afterAll(async () => {
  await stopAllCoffers();
  await db?.drop();
});

interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
  body: any;
}

/** One request with the target exactly as given: fetch would normalise `..` and `%2e%2e` away. */
function rawRequest(addr: string, method: string, target: string, headers: Record<string, string> = {}, body?: string): Promise<RawResponse> {
  const u = new URL(addr);
  return new Promise((resolve, reject) => {
    const req = http.request({ host: u.hostname, port: Number(u.port), method, path: target, headers, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => {
        let parsed: unknown = text;
        try {
          parsed = JSON.parse(text);
        } catch {
          /* not JSON */
        }
        resolve({ status: res.statusCode!, headers: res.headers, text, body: parsed });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** Real curl, as an operator would run it; returns status and parsed body. */
async function curl(args: string[]): Promise<{ status: number; body: any }> {
  const { stdout } = await run('curl', ['-sS', '-w', '\n%{http_code}', ...args], { maxBuffer: 1 << 20 });
  const nl = stdout.lastIndexOf('\n');
  const text = stdout.slice(0, nl);
  return { status: Number(stdout.slice(nl + 1)), body: text ? JSON.parse(text) : null };
}

function expectErrorEnvelope(r: { status: number; body: any }, status: number | [number, number]) {
  if (Array.isArray(status)) {
    expect(r.status).toBeGreaterThanOrEqual(status[0]);
    expect(r.status).toBeLessThanOrEqual(status[1]);
  } else {
    expect(r.status).toBe(status);
  }
  expect(r.body).toEqual({ errors: expect.any(Array) });
  for (const e of r.body.errors) expect(typeof e).toBe('string');
}

const healthCode = async (p: CofferProcess, query = '', method = 'GET') => (await fetch(`${p.addr}/v1/sys/health${query}`, { method })).status;

describe('HTTP frame of a running server', () => {
  let a: CofferProcess;
  let b: CofferProcess;
  let active: CofferProcess;
  let standby: CofferProcess;
  let token = '';

  beforeAll(async () => {
    db = await createTestDatabase('frame');
    [a, b] = await Promise.all([startCoffer({ dbUrl: db.url }), startCoffer({ dbUrl: db.url })]);
  });

  test('sys/health overrides before init (uninitcode) and while sealed (sealedcode), GET and HEAD', async () => {
    expect(await healthCode(a)).toBe(501);
    expect(await healthCode(a, '?uninitcode=299')).toBe(299);
    expect(await healthCode(a, '?uninitcode=299', 'HEAD')).toBe(299);
    expect(await healthCode(a, '?sealedcode=299')).toBe(501); // not initialised is checked first
    const head = await fetch(`${a.addr}/v1/sys/health`, { method: 'HEAD' });
    expect(head.status).toBe(501);
    expect(await head.text()).toBe('');

    const init = await vault(a.addr, 'PUT', 'sys/init', { body: { secret_shares: 1, secret_threshold: 1 } });
    expect(init.status).toBe(200);
    token = init.body.root_token;
    expect(await healthCode(a)).toBe(503);
    expect(await healthCode(a, '?sealedcode=299')).toBe(299);
    expect(await healthCode(a, '?sealedcode=299', 'HEAD')).toBe(299);
    expect(await healthCode(a, '?uninitcode=299')).toBe(503);
    expect(await healthCode(a, '?activecode=299')).toBe(503);
    // Out-of-range or non-numeric overrides fall back to the default.
    expect(await healthCode(a, '?sealedcode=abc')).toBe(503);
    expect(await healthCode(a, '?sealedcode=1000')).toBe(503);

    await unseal(a, init.body.keys);
    await unseal(b, init.body.keys);
    [active, standby] = await waitFor('one active and one standby', async () => {
      const [ca, cb] = await Promise.all([healthCode(a), healthCode(b)]);
      if (ca === 200 && cb === 429) return [a, b];
      if (ca === 429 && cb === 200) return [b, a];
      return null;
    });
    await mountKv2(active.addr, token);
    const v1 = await vault(active.addr, 'POST', 'sys/mounts/kv', { token, body: { type: 'kv' } });
    expect(v1.status).toBe(204);
  });

  test('sys/health on active and standby: activecode, standbyok, standbycode, HEAD', async () => {
    const g = await vault(active.addr, 'GET', 'sys/health');
    expect(g.status).toBe(200);
    expect(g.body).toMatchObject({ initialized: true, sealed: false, standby: false, performance_standby: false, replication_performance_mode: 'disabled', replication_dr_mode: 'disabled' });
    expect(typeof g.body.server_time_utc).toBe('number');
    expect(g.body.cluster_id).toMatch(/^[0-9a-f-]{36}$/);

    expect(await healthCode(active, '?activecode=299')).toBe(299);
    expect(await healthCode(active, '?activecode=299', 'HEAD')).toBe(299);
    expect(await healthCode(active, '?standbyok=true')).toBe(200);

    const s = await vault(standby.addr, 'GET', 'sys/health');
    expect(s.status).toBe(429);
    expect(s.body).toMatchObject({ standby: true, sealed: false });
    expect(await healthCode(standby, '', 'HEAD')).toBe(429);
    expect(await healthCode(standby, '?standbyok=true')).toBe(200);
    expect(await healthCode(standby, '?standbyok=1', 'HEAD')).toBe(200);
    expect(await healthCode(standby, '?standbyok=true&activecode=299')).toBe(299);
    expect(await healthCode(standby, '?standbycode=299')).toBe(299);
    expect(await healthCode(standby, '?standbyok=false')).toBe(429);

    const head = await fetch(`${active.addr}/v1/sys/health?activecode=299`, { method: 'HEAD' });
    expect(head.status).toBe(299);
    expect(await head.text()).toBe('');
    // Other methods on sys/health are refused.
    expectErrorEnvelope(await vault(active.addr, 'POST', 'sys/health', { body: {} }), 405);
  });

  test('writes carry X-Vault-Index; reads and LIST (curl -X LIST, ?list=true, ?list=1) return the keys', async () => {
    let last = 0;
    for (const k of ['alpha', 'beta', 'team/gamma']) {
      const w = await vault(active.addr, 'PUT', `secret/data/${k}`, { token, body: { data: { k } } });
      expect(w.status).toBe(200);
      const idx = Number(w.headers.get('x-vault-index'));
      expect(Number.isInteger(idx) && idx > last).toBe(true);
      last = idx;
    }
    // On the standby too (every process serves writes), and for 204 writes.
    const ws = await vault(standby.addr, 'PUT', 'secret/data/delta', { token, body: { data: { k: 'delta' } } });
    expect(ws.status).toBe(200);
    expect(Number(ws.headers.get('x-vault-index'))).toBeGreaterThan(0);
    const w1 = await vault(active.addr, 'PUT', 'kv/one', { token, body: { v: 1 } });
    expect(w1.status).toBe(204);
    expect(Number(w1.headers.get('x-vault-index'))).toBeGreaterThan(0);
    const r = await vault(active.addr, 'GET', 'secret/data/alpha', { token });
    expect(r.status).toBe(200);
    expect(r.headers.get('cache-control')).toBe('no-store');

    const expected = ['alpha', 'beta', 'delta', 'team/'];
    const viaCurl = await curl(['-X', 'LIST', '-H', `X-Vault-Token: ${token}`, `${active.addr}/v1/secret/metadata/`]);
    expect(viaCurl.status).toBe(200);
    expect(viaCurl.body.data.keys).toEqual(expected);
    const curlNoSlash = await curl(['-X', 'LIST', '-H', `X-Vault-Token: ${token}`, `${standby.addr}/v1/secret/metadata`]);
    expect(curlNoSlash.status).toBe(200);
    expect(curlNoSlash.body.data.keys).toEqual(expected);
    const curlSub = await curl(['-X', 'LIST', '-H', `X-Vault-Token: ${token}`, `${active.addr}/v1/secret/metadata/team/`]);
    expect(curlSub.body.data.keys).toEqual(['gamma']);
    for (const q of ['?list=true', '?list=1', '?list=t']) {
      const l = await vault(active.addr, 'GET', `secret/metadata/${q}`, { token });
      expect(l.status).toBe(200);
      expect(l.body.data.keys).toEqual(expected);
    }
    // KV v1 lists the same way.
    const v1 = await curl(['-X', 'LIST', '-H', `X-Vault-Token: ${token}`, `${active.addr}/v1/kv/`]);
    expect(v1.body.data.keys).toEqual(['one']);

    // LIST of an empty prefix is 404 with empty errors, by curl and by ?list=.
    const empty = await curl(['-X', 'LIST', '-H', `X-Vault-Token: ${token}`, `${active.addr}/v1/secret/metadata/nothing-here/`]);
    expect(empty).toEqual({ status: 404, body: { errors: [] } });
    const empty2 = await vault(active.addr, 'GET', 'secret/metadata/nothing-here/?list=true', { token });
    expect(empty2.status).toBe(404);
    expect(empty2.body).toEqual({ errors: [] });
  });

  test('tokens: X-Vault-Token or Authorization: Bearer; none or a bad one is 403', async () => {
    const bearer = await vault(active.addr, 'GET', 'secret/data/alpha', { headers: { Authorization: `Bearer ${token}` } });
    expect(bearer.status).toBe(200);
    expect(bearer.body.data.data).toEqual({ k: 'alpha' });
    const bearerCurl = await curl(['-X', 'LIST', '-H', `Authorization: Bearer ${token}`, `${active.addr}/v1/secret/metadata/`]);
    expect(bearerCurl.status).toBe(200);

    expectErrorEnvelope(await vault(active.addr, 'GET', 'secret/data/alpha'), 403);
    expectErrorEnvelope(await vault(active.addr, 'GET', 'secret/data/alpha', { token: 'hvs.AAAAAAAAAAAAAAAAAAAAAAAA' }), 403);
    expectErrorEnvelope(await vault(active.addr, 'GET', 'secret/data/alpha', { token: 'x'.repeat(4096) }), 403);
    expectErrorEnvelope(await vault(active.addr, 'GET', 'secret/data/alpha', { headers: { Authorization: `Bearer hvs.bad` } }), 403);
    // A non-Bearer Authorization header is not a token.
    expectErrorEnvelope(await vault(active.addr, 'GET', 'secret/data/alpha', { headers: { Authorization: `Basic ${token}` } }), 403);
    // X-Vault-Token wins over Authorization.
    expect((await vault(active.addr, 'GET', 'secret/data/alpha', { token, headers: { Authorization: 'Bearer hvs.bad' } })).status).toBe(200);
    expect((await vault(active.addr, 'GET', 'secret/data/alpha', { token: 'hvs.bad', headers: { Authorization: `Bearer ${token}` } })).status).toBe(403);
  });

  test('bad bodies are 400/413/415 with errors', async () => {
    const put = (rawBody: string, headers: Record<string, string> = { 'Content-Type': 'application/json' }) => vault(active.addr, 'PUT', 'secret/data/bad', { token, rawBody, headers });
    expectErrorEnvelope(await put('{"data": {"x": 1}'), 400);
    expectErrorEnvelope(await put('{data: 1}'), 400);
    expectErrorEnvelope(await put('[{"data": {"x": 1}}]'), 400);
    expectErrorEnvelope(await put('"a string"'), 400);
    expectErrorEnvelope(await put('42'), 400);
    // The raw sys endpoints parse the same way.
    expectErrorEnvelope(await vault(active.addr, 'PUT', 'sys/unseal', { rawBody: '{"key":', headers: { 'Content-Type': 'application/json' } }), 400);
    expectErrorEnvelope(await vault(active.addr, 'PUT', 'sys/init', { rawBody: '[1]', headers: { 'Content-Type': 'application/json' } }), 400);

    // 33 MiB: over Vault's default max_request_size of 32 MiB.
    const huge = JSON.stringify({ data: { x: 'a'.repeat(33 * 1024 * 1024) } });
    const big = await vault(active.addr, 'PUT', 'secret/data/huge', { token, rawBody: huge, headers: { 'Content-Type': 'application/json' } });
    expectErrorEnvelope(big, 413);
    // ... also when streamed by curl without a Content-Length (chunked).
    const dir = mkdtempSync(join(tmpdir(), 'coffer-frame-'));
    try {
      const file = join(dir, 'huge.json');
      writeFileSync(file, huge);
      const chunked = await curl(['-X', 'PUT', '-H', 'Transfer-Encoding: chunked', '-H', 'Content-Type: application/json', '-H', `X-Vault-Token: ${token}`, '--data-binary', `@${file}`, `${active.addr}/v1/secret/data/huge`]);
      expectErrorEnvelope(chunked, 413);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    expect((await vault(active.addr, 'GET', 'secret/data/huge', { token })).status).toBe(404);

    const patch = await vault(active.addr, 'PATCH', 'secret/data/alpha', { token, body: { data: { y: 1 } } });
    expectErrorEnvelope(patch, 415);
    const patchOk = await vault(active.addr, 'PATCH', 'secret/data/alpha', { token, body: { data: { y: 1 } }, headers: { 'Content-Type': 'application/merge-patch+json' } });
    expect(patchOk.status).toBe(200);
  });

  test('bad paths and methods are 4xx with errors, never 5xx', async () => {
    const h = { 'X-Vault-Token': token };
    for (const target of [
      '/v1/secret/data/../../sys/mounts',
      '/v1/secret/data/x/../alpha',
      '/v1/secret/data/./alpha',
      '/v1/secret/data/%2e%2e/alpha',
      '/v1/secret/data/%2E%2E/%2e%2e/sys/mounts',
      '/v1/secret%2Fdata%2Falpha',
      '/v1/secret/data/a%2fb',
      '/v1/secret/data/a%5Cb',
      '/v1/secret/data/a%00',
      '/v1/secret/data/a%0d%0aX-Injected:%201',
      '/v1/secret/data/%zz',
      '/v1/secret/data/%E0%A4%A',
      '/v1/secret/data/alpha.',
      '/v1/sys/%2e%2e/secret/data/alpha',
      '/v1/sys/health/../init',
    ]) {
      const r = await rawRequest(active.addr, 'GET', target, h);
      if (r.status < 400 || r.status >= 500 || typeof r.body !== 'object' || !Array.isArray(r.body?.errors)) {
        throw new Error(`${target}: expected 4xx with {"errors":[...]}, got ${r.status} ${r.text}`);
      }
    }
    const r = await rawRequest(active.addr, 'GET', '/v1/secret/data/../../sys/mounts', h);
    expect(r.body.errors.join(' ')).toMatch(/\.\./);

    const nope = await vault(active.addr, 'GET', 'nope/x', { token });
    expectErrorEnvelope(nope, 404);
    expect(nope.body.errors[0]).toMatch(/no handler for route/);
    expectErrorEnvelope(await vault(active.addr, 'PUT', 'nope/x', { token, body: { a: 1 } }), 404);

    for (const target of ['/secret/data/alpha', '/sys/health', '/', '/v2/sys/health', '/v1']) {
      const m = await rawRequest(active.addr, 'GET', target, h);
      expect(m.status).toBe(404);
      expect(m.body.errors[0]).toMatch(/Missing \/v1\/ prefix/);
    }

    for (const method of ['PROPFIND', 'OPTIONS', 'TRACE', 'MKCOL']) {
      const m = await rawRequest(active.addr, method, '/v1/secret/data/alpha', h);
      expect(m.status).toBe(405);
      expect(m.body.errors.length).toBeGreaterThan(0);
    }
    // A method Node's parser does not know is refused below JavaScript, still as a 4xx.
    const { stdout } = await run('curl', ['-sS', '-o', '/dev/null', '-w', '%{http_code}', '-X', 'FROB', '-H', `X-Vault-Token: ${token}`, `${active.addr}/v1/secret/data/alpha`]);
    expect(Number(stdout)).toBeGreaterThanOrEqual(400);
    expect(Number(stdout)).toBeLessThan(500);
  });

  test('a deeply nested JSON value is a 4xx, not a 500', async () => {
    // Go's encoding/json (Vault) refuses nesting beyond 10000 with a 400. Coffer parses the
    // body (V8's JSON.parse is iterative) and then fails inside Barrier.encrypt.
    const depth = 100_000;
    const deep = `{"data":{"x":${'['.repeat(depth)}${']'.repeat(depth)}}}`;
    const v2 = await vault(active.addr, 'PUT', 'secret/data/deep', { token, rawBody: deep, headers: { 'Content-Type': 'application/json' } });
    const v1 = await vault(active.addr, 'PUT', 'kv/deep', { token, rawBody: deep.slice('{"data":'.length, -1), headers: { 'Content-Type': 'application/json' } });
    expect({ kvV2: v2.status < 500 ? '4xx' : v2.status, kvV1: v1.status < 500 ? '4xx' : v1.status }).toEqual({ kvV2: '4xx', kvV1: '4xx' });
  });

  test('after all of it both processes are alive and healthy', async () => {
    for (const p of [active, standby]) {
      expect(p.proc.exitCode).toBeNull();
      expect(p.proc.signalCode).toBeNull();
    }
    expect(await healthCode(active)).toBe(200);
    expect(await healthCode(standby, '?standbyok=true')).toBe(200);
    const r = await vault(active.addr, 'GET', 'secret/data/alpha', { token });
    expect(r.status).toBe(200);
    expect(r.body.data.data).toEqual({ k: 'alpha', y: 1 });
    // Nothing crashed or escaped as an unhandled error.
    expect(active.output()).not.toMatch(/Unhandled|uncaught|FATAL/i);
  });
});

/**
 * The HTTP layer's hot paths (a GET of a logical path without a body, or a POST/PUT of one with
 * a JSON body of known length, answered without walking Express's middleware, and their JSON
 * written without res.json) must answer byte for byte as the general path does. Every request
 * here is sent twice: as is (hot) and in a form that takes it through Express (a GET with
 * `Content-Length: 0`, a write with its body chunked; both with an `If-Modified-Since` that
 * changes nothing, so Express's own res.json writes the answer), and the two answers are
 * compared on the wire, minus what differs by nature (Date, request_id).
 */
import * as net from 'node:net';
import pino from 'pino';
import { createApp } from '../../src/http/app';
import { listen, type RunningListener } from '../../src/http/list-method';
import { NotFound, PermissionDenied, Sealed, UnsupportedPath } from '../../src/core/errors';
import type { Core } from '../../src/core/core';
import type { LogicalRequest, LogicalResponse } from '../../src/core/request';
import { Metrics } from '../../src/http/metrics';

let listener: RunningListener;
const seen: LogicalRequest[] = [];

/** A stand-in for core: answers by path, records what it was asked. */
const core = {
  async handle(req: LogicalRequest): Promise<LogicalResponse> {
    seen.push(req);
    switch (req.path) {
      case 'secret/data/a':
        return { data: { data: { password: 'p', 'ünï': 'çødé ✓' }, metadata: { version: 1 } } };
      case 'secret/data/big':
        return { data: { data: { blob: 'x'.repeat(5000) } } };
      case 'secret/data/deleted':
        return { status: 404, data: { data: null, metadata: { version: 2 } } };
      case 'secret/data/warn':
        return { status: 404, data: null, warnings: ['a warning'] };
      case 'secret/data/empty':
        return {};
      case 'secret/data/echo':
        return { data: { got: req.data, operation: req.operation, query: req.query } };
      case 'secret/data/odd-status':
        // Statuses Express answers without a body: the hot path must hand these to Express.
        return { status: Number(req.query.status), data: { x: 1 } };
      case 'secret/data/forbidden':
        throw new PermissionDenied();
      case 'secret/data/missing':
        throw new NotFound();
      case 'secret/data/sealed':
        throw new Sealed();
      case 'secret/data/boom':
        throw new Error('internal detail that must not leak');
      default:
        throw new UnsupportedPath(`no handler for route "${req.path}". route entry not found.`);
    }
  },
} as unknown as Core;

beforeAll(async () => {
  const app = createApp({
    core,
    metrics: new Metrics(async () => ({ walHeadLsn: 0, walUnorderedRows: 0, walOldestUnorderedAgeSeconds: 0, lastRemoteWal: 0, maxSecondaryLagWal: 0, knownSecondaries: 0, walRetainedRows: 0, walRetainedBytes: 0 })),
    unauthenticatedMetrics: false,
    node: { isActive: () => true, poke: () => undefined, leader: async () => ({ haEnabled: true, isSelf: true, activeTime: '', leaderAddress: '', leaderClusterAddress: '' }), stepDown: async () => undefined },
    log: pino({ level: 'silent' }),
    maxRequestSizeBytes: 1024 * 1024,
    version: 'test',
  });
  listener = await listen(app, { host: '127.0.0.1', port: 0 });
});

afterAll(() => listener.close());

/** One request on a fresh connection; the raw response bytes (the server closes after `Connection: close`). */
function raw(head: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(listener.address.port, '127.0.0.1', () => socket.write(head));
    const chunks: Buffer[] = [];
    socket.on('data', (c) => chunks.push(c));
    socket.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    socket.on('error', reject);
  });
}

function normalise(response: string): string {
  return response
    .replace(/^Date: .*\r\n/im, 'Date: -\r\n')
    .replace(/"request_id":"[0-9a-f-]{36}"/, '"request_id":"-"');
}

async function both(target: string, headers = ''): Promise<{ hot: string; general: string }> {
  const head = (extra: string) => `GET ${target} HTTP/1.1\r\nHost: x\r\nX-Vault-Token: t\r\n${headers}${extra}Connection: close\r\n\r\n`;
  const hot = normalise(await raw(head('')));
  const general = normalise(await raw(head('Content-Length: 0\r\nIf-Modified-Since: Thu, 01 Jan 2099 00:00:00 GMT\r\n')));
  return { hot, general };
}

/** A write sent hot (Content-Length) and general (chunked, If-Modified-Since); both answers. */
async function bothWrites(method: string, target: string, body: string, headers = ''): Promise<{ hot: string; general: string }> {
  const bytes = Buffer.from(body, 'utf8');
  const start = `${method} ${target} HTTP/1.1\r\nHost: x\r\nX-Vault-Token: t\r\n${headers}Connection: close\r\n`;
  const hot = normalise(await raw(`${start}Content-Length: ${bytes.length}\r\n\r\n${body}`));
  const chunked = bytes.length ? `${bytes.length.toString(16)}\r\n${body}\r\n0\r\n\r\n` : '0\r\n\r\n';
  const general = normalise(await raw(`${start}Transfer-Encoding: chunked\r\nIf-Modified-Since: Thu, 01 Jan 2099 00:00:00 GMT\r\n\r\n${chunked}`));
  return { hot, general };
}

describe('the hot write path answers as the general path does', () => {
  // Every row has its four values: with fewer, test.each would pass jest's `done` as the fourth.
  const cases: [string, string, string, string][] = [
    ['POST', '/v1/secret/data/echo', '{"data":{"password":"p","ünï":"çødé ✓"},"options":{"cas":1}}', ''],
    ['PUT', '/v1/secret/data/echo?x=1', '{"a":[1,2,{"b":null}]}', ''],
    ['POST', '/v1/secret/data/echo', '', ''],
    ['POST', '/v1/secret/data/echo', '\ufeff{"bom":true}', ''],
    ['POST', '/v1/secret/data/echo', '  {"spaced": true}  ', ''],
    ['POST', '/v1/secret/data/echo', 'not json', ''],
    ['POST', '/v1/secret/data/echo', '{"truncated":', ''],
    ['POST', '/v1/secret/data/echo', '[1,2]', ''],
    ['POST', '/v1/secret/data/echo', '"a string"', ''],
    ['POST', '/v1/secret/data/echo', 'null', ''],
    ['POST', '/v1/secret/data/echo', '['.repeat(600) + ']'.repeat(600), ''],
    ['POST', '/v1/secret/data/echo', '{"x":1}', 'Content-Type: application/json; charset=UTF-8\r\n'],
    ['POST', '/v1/secret/data/echo', '{"x":1}', 'Content-Type: text/plain\r\n'],
    ['POST', '/v1/secret/data/empty', '{"x":1}', ''],
    ['POST', '/v1/secret/data/forbidden', '{"x":1}', ''],
    ['POST', '/v1/secret/data/boom', '{"x":1}', ''],
    ['POST', '/v1/secret/data/x/../echo', '{"x":1}', ''],
    ['POST', '/v1/secret/data/x/../echo', 'not json', ''],
    ['POST', '/v1/secret/data/%zz', '{"x":1}', ''],
    ['POST', '/v1/nowhere', '{"x":1}', ''],
  ];
  test.each(cases)('%s %s %j', async (method, target, body, headers) => {
    const { hot, general } = await bothWrites(method, target, body, headers);
    expect(hot).toBe(general);
    expect(hot).toMatch(/^HTTP\/1\.1 \d{3} /);
    expect(hot).not.toContain('internal detail');
  });

  test('the logical request is the same either way', async () => {
    seen.length = 0;
    await bothWrites('POST', '/v1/secret/data/echo?version=2', '{"data":{"k":"v"}}', 'X-Vault-Wrap-TTL: 60s\r\n');
    expect(seen).toHaveLength(2);
    expect(seen[0]).toEqual(seen[1]);
    expect(seen[0]).toMatchObject({ operation: 'update', path: 'secret/data/echo', token: 't', query: { version: '2' }, data: { data: { k: 'v' } } });
  });

  test('a body over the size limit, an encoded or non-UTF-8 body take the general path (413, 415)', async () => {
    const big = await bothWrites('POST', '/v1/secret/data/echo', JSON.stringify({ blob: 'x'.repeat(1024 * 1024) }));
    expect(big.hot).toBe(big.general);
    expect(big.hot).toMatch(/^HTTP\/1\.1 413 /);
    const gz = await bothWrites('POST', '/v1/secret/data/echo', '{"x":1}', 'Content-Encoding: gzip\r\n');
    expect(gz.hot).toBe(gz.general);
    expect(gz.hot).toMatch(/^HTTP\/1\.1 4\d\d /);
    const latin1 = await bothWrites('POST', '/v1/secret/data/echo', '{"x":1}', 'Content-Type: application/json; charset=latin1\r\n');
    expect(latin1.hot).toBe(latin1.general);
    expect(latin1.hot).toMatch(/^HTTP\/1\.1 415 /);
  });
});

describe('the hot read path answers as the general path does', () => {
  const targets = [
    '/v1/secret/data/a',
    '/v1/secret/data/a?version=1',
    '/v1/secret/data/big',
    '/v1/secret/data/deleted',
    '/v1/secret/data/warn',
    '/v1/secret/data/empty',
    '/v1/secret/data/forbidden',
    '/v1/secret/data/missing',
    '/v1/secret/data/sealed',
    '/v1/secret/data/boom',
    '/v1/nowhere',
    '/v1/secret/metadata/?list=true',
    '/v1/secret/data/%2Fescaped',
    '/v1/secret/data/%zz',
    '/v1/secret/data/caf%C3%A9',
    '/v1/secret/data/a%',
    '/v1/secret/data/x/../a',
    '/v1/%73ys/health',
    '/v1/secret/data/odd-status?status=205',
    '/v1/secret/data/odd-status?status=304',
    '/v1/secret/data/odd-status?status=418',
    '/v1/secret/data/a#fragment',
    '/v1/secret/data/a?x=1?y=2&x=3',
    '/v1/secret/data/a?list',
    '/v1/secret/metadata/app?list=true',
  ];
  test.each(targets)('%s', async (target) => {
    const { hot, general } = await both(target);
    expect(hot).toBe(general);
    expect(hot).toMatch(/^HTTP\/1\.1 \d{3} /);
    expect(hot).not.toContain('internal detail');
  });

  test('conditional requests (Express answers If-None-Match: * with 304) and sys/ paths take the general path', async () => {
    const conditional = await both('/v1/secret/data/a', 'If-None-Match: *\r\n');
    expect(conditional.hot).toBe(conditional.general);
    expect(conditional.hot).toMatch(/^HTTP\/1\.1 304 /);
    const sys = await both('/v1/SYS/health');
    expect(sys.hot).toBe(sys.general);
  });

  test('the logical request is the same either way', async () => {
    seen.length = 0;
    await both('/v1/secret/data/a?version=2&list=false', 'X-Vault-Wrap-TTL: 60s\r\n');
    expect(seen).toHaveLength(2);
    expect(seen[0]).toEqual(seen[1]);
    expect(seen[0]).toMatchObject({ operation: 'read', path: 'secret/data/a', token: 't', query: { version: '2', list: 'false' }, data: {} });
  });
});

/**
 * The fault proxy of test/harness, against a local echo server: it forwards byte for byte, delays
 * by its latency, throttles to its bandwidth, cuts (resets open connections, refuses new ones),
 * heals on the same port, black-holes (half-open), resets mid-stream after N bytes, and fails
 * over between targets, and captures whole HTTP requests to replay them later (duplicated,
 * reordered) on new connections. Waits on conditions, never on sleeps.
 */
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { FaultProxy } from '../harness/fault-proxy';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';

const rng = seededRng('fault-proxy');
const servers: net.Server[] = [];
const proxies: FaultProxy[] = [];
const sockets: net.Socket[] = [];

async function echoServer(tag = ''): Promise<number> {
  const s = net.createServer((c) => {
    c.on('error', () => undefined);
    if (tag) c.write(tag);
    c.pipe(c);
  });
  servers.push(s);
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  return (s.address() as AddressInfo).port;
}

async function proxyTo(...ports: number[]): Promise<FaultProxy> {
  const p = new FaultProxy(ports.map((port) => ({ host: '127.0.0.1', port })), rng);
  proxies.push(p);
  await p.listen();
  return p;
}

/** A client connection that collects what it receives and how it ended. */
function client(port: number) {
  const s = net.connect({ host: '127.0.0.1', port });
  sockets.push(s);
  const st = { data: Buffer.alloc(0), error: null as NodeJS.ErrnoException | null, closed: false, connected: false };
  s.on('connect', () => (st.connected = true));
  s.on('data', (d) => (st.data = Buffer.concat([st.data, d])));
  s.on('error', (e) => (st.error = e));
  s.on('close', () => (st.closed = true));
  return { s, st };
}

afterAll(async () => {
  for (const s of sockets) s.destroy();
  for (const p of proxies) await p.shutdown();
  for (const s of servers) {
    s.close();
  }
});

test('forwards both ways byte for byte, and counts bytes', async () => {
  const p = await proxyTo(await echoServer());
  const { s, st } = client(p.port);
  const payload = Buffer.from(Array.from({ length: 200_000 }, (_, i) => i % 251));
  s.write(payload);
  await waitFor('echo of 200 kB', () => st.data.length >= payload.length);
  expect(st.data.equals(payload)).toBe(true);
  expect(p.counters.bytesUpstream).toBe(payload.length);
  await waitFor('downstream count', () => p.counters.bytesDownstream === payload.length);
  expect(p.counters.accepted).toBe(1);
});

test('latency delays delivery (both directions add up) and keeps order under jitter', async () => {
  const p = await proxyTo(await echoServer());
  p.setToxics('both', { latencyMs: 150, jitterMs: 40 });
  const { s, st } = client(p.port);
  await waitFor('connected', () => st.connected);
  const t0 = Date.now();
  for (let i = 0; i < 50; i++) s.write(`${String(i).padStart(3, '0')},`);
  const want = Array.from({ length: 50 }, (_, i) => `${String(i).padStart(3, '0')},`).join('');
  await waitFor('echo', () => st.data.length >= want.length, { timeoutMs: 5000, intervalMs: 5 });
  expect(st.data.toString()).toBe(want);
  // Each way ≥ 110 ms (150 - 40).
  expect(Date.now() - t0).toBeGreaterThanOrEqual(220);
});

test('bandwidth throttles throughput', async () => {
  const p = await proxyTo(await echoServer());
  p.setToxics('upstream', { bandwidthBps: 100_000 });
  const { s, st } = client(p.port);
  await waitFor('connected', () => st.connected);
  const t0 = Date.now();
  // 50 kB at 100 kB/s: ≥ 500 ms, however the kernel coalesces the writes.
  for (let i = 0; i < 10; i++) s.write(Buffer.alloc(5000, i));
  await waitFor('50 kB echoed', () => st.data.length >= 50_000, { timeoutMs: 5000, intervalMs: 5 });
  expect(Date.now() - t0).toBeGreaterThanOrEqual(450);
});

test('cut resets open connections and refuses new ones; heal listens again on the same port', async () => {
  const p = await proxyTo(await echoServer());
  const port = p.port;
  const a = client(port);
  a.s.write('hello');
  await waitFor('echo', () => a.st.data.toString() === 'hello');
  await p.cut();
  await waitFor('the open connection to be closed', () => a.st.closed);
  expect(['ECONNRESET', undefined]).toContain(a.st.error?.code);
  const b = client(port);
  await waitFor('the new connection to fail', () => b.st.closed);
  expect(b.st.error?.code).toBe('ECONNREFUSED');
  await p.heal();
  expect(p.port).toBe(port);
  const c = client(port);
  c.s.write('again');
  await waitFor('echo after heal', () => c.st.data.toString() === 'again');
  expect(p.counters.cutConnections).toBe(1);
});

test('half-open accepts but forwards nothing; heal closes the held connections', async () => {
  const p = await proxyTo(await echoServer());
  await p.halfOpen();
  const a = client(p.port);
  await waitFor('connected', () => a.st.connected);
  a.s.write('lost');
  // Nothing can come back: the proxy never even connected upstream. Prove it by the counters.
  await waitFor('blackholed', () => p.counters.blackholed === 1);
  expect(p.counters.bytesUpstream).toBe(0);
  expect(a.st.data.length).toBe(0);
  await p.heal();
  await waitFor('held connection closed on heal', () => a.st.closed);
  const b = client(p.port);
  b.s.write('ok');
  await waitFor('echo after heal', () => b.st.data.toString() === 'ok');
});

test('limitBytes forwards exactly N bytes then resets the connection (a mid-stream cut)', async () => {
  const p = await proxyTo(await echoServer());
  p.setToxics('downstream', { limitBytes: 1000 });
  const a = client(p.port);
  a.s.write(Buffer.alloc(5000, 7));
  await waitFor('the connection to be reset', () => a.st.closed, { timeoutMs: 5000 });
  expect(a.st.data.length).toBeLessThanOrEqual(1000);
  expect(p.counters.bytesDownstream).toBe(1000);
  expect(p.counters.resets).toBe(1);
  expect(['ECONNRESET', undefined]).toContain(a.st.error?.code);
});

test('resetProbability 1 resets on the first chunk; resetAll resets open connections', async () => {
  const p = await proxyTo(await echoServer());
  p.setToxics('upstream', { resetProbability: 1 });
  const a = client(p.port);
  a.s.write('x');
  await waitFor('reset', () => a.st.closed);
  expect(p.counters.resets).toBe(1);
  p.clearToxics();
  const b = client(p.port);
  b.s.write('y');
  await waitFor('echo', () => b.st.data.toString() === 'y');
  expect(p.resetAll()).toBe(1);
  await waitFor('reset by resetAll', () => b.st.closed);
  expect(b.st.error?.code).toBe('ECONNRESET');
});

test('several targets: round robin, and a refusing target is skipped', async () => {
  const one = await echoServer('1');
  const two = await echoServer('2');
  const dead = await echoServer();
  servers[servers.length - 1].close(); // nothing listens on `dead` any more
  const p = await proxyTo(one, dead, two);
  const seen = new Set<string>();
  for (let i = 0; i < 4; i++) {
    const c = client(p.port);
    await waitFor('greeting', () => c.st.data.length > 0);
    seen.add(c.st.data.toString()[0]);
    c.s.destroy();
  }
  expect([...seen].sort()).toEqual(['1', '2']);
  expect(p.counters.upstreamFailures).toBe(0);
});

/** An HTTP server recording each request it receives (method, path, body), answering JSON with its number. */
async function recordingHttpServer() {
  const got: { method: string; path: string; body: string }[] = [];
  const s = http.createServer((req, res) => {
    const parts: Buffer[] = [];
    req.on('data', (d: Buffer) => parts.push(d));
    req.on('end', () => {
      got.push({ method: req.method!, path: req.url!, body: Buffer.concat(parts).toString() });
      const out = JSON.stringify({ n: got.length, echo: Buffer.concat(parts).toString() });
      if (req.url === '/chunked-answer') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.write(out.slice(0, 5));
        res.end(out.slice(5));
      } else res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(out) }).end(out);
    });
  });
  servers.push(s as unknown as net.Server);
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  return { port: (s.address() as AddressInfo).port, got };
}

function post(port: number, path: string, body: string, agent: http.Agent, chunked = false): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string | number> = { 'content-type': 'application/json' };
    if (!chunked) headers['content-length'] = Buffer.byteLength(body);
    const req = http.request({ host: '127.0.0.1', port, path, method: 'POST', agent, headers }, (res) => {
      const parts: Buffer[] = [];
      res.on('data', (d: Buffer) => parts.push(d));
      res.on('end', () => resolve({ status: res.statusCode!, body: Buffer.concat(parts).toString() }));
    });
    req.on('error', reject);
    if (chunked) {
      req.write(body.slice(0, 3));
      req.end(body.slice(3));
    } else req.end(body);
  });
}

test('capture records whole HTTP requests (Content-Length) on keep-alive connections, filtered by path', async () => {
  const srv = await recordingHttpServer();
  const p = await proxyTo(srv.port);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  p.capture('/apply');
  const big = 'x'.repeat(300_000); // several TCP chunks
  for (const [path, body] of [['/apply', '{"b":1}'], ['/other', '{"o":1}'], ['/apply', `{"b":2,"pad":"${big}"}`], ['/apply', '{"b":3}']]) {
    expect((await post(p.port, path, body, agent)).status).toBe(200);
  }
  // Chunked requests are not captured (and break nothing).
  expect((await post(p.port, '/apply', '{"chunked":1}', agent, true)).status).toBe(200);
  agent.destroy();
  const caps = p.stopCapture();
  expect(caps.map((c) => [c.seq, c.method, c.path, JSON.parse(c.body.toString()).b])).toEqual([
    [0, 'POST', '/apply', 1],
    [1, 'POST', '/apply', 2],
    [2, 'POST', '/apply', 3],
  ]);
  expect(new Set(caps.map((c) => c.conn)).size).toBe(1); // one keep-alive connection
  expect(caps[1].raw.subarray(caps[1].raw.length - caps[1].body.length).equals(caps[1].body)).toBe(true);
  expect(caps[1].headers['content-length']).toBe(String(caps[1].body.length));
  expect(srv.got.length).toBe(5);
});

test('replay re-sends captured bytes on new connections: duplicates, reversed, shuffled, chunked answers', async () => {
  const srv = await recordingHttpServer();
  const p = await proxyTo(srv.port);
  const agent = new http.Agent({ keepAlive: true });
  p.capture((r) => r.path !== '/skip');
  for (let i = 1; i <= 3; i++) await post(p.port, '/apply', JSON.stringify({ b: i }), agent);
  await post(p.port, '/skip', '{}', agent);
  await post(p.port, '/chunked-answer', '{"c":1}', agent);
  agent.destroy();
  const caps = p.stopCapture();
  expect(caps.map((c) => c.path)).toEqual(['/apply', '/apply', '/apply', '/chunked-answer']);
  const accepted = p.counters.accepted;
  srv.got.length = 0;

  // One request, three times.
  const dup = await p.replay(caps[0], { times: 3 });
  expect(dup.map((r) => [r.status, r.json.echo])).toEqual([
    [200, '{"b":1}'],
    [200, '{"b":1}'],
    [200, '{"b":1}'],
  ]);
  // Older after newer: reversed, each twice.
  const rev = await p.replayAll(caps.slice(0, 3), { order: 'reverse', times: 2 });
  expect(rev.map((r) => JSON.parse(r.res.json.echo).b)).toEqual([3, 3, 2, 2, 1, 1]);
  // Shuffled: the same multiset.
  const shuf = await p.replayAll(caps.slice(0, 3), { order: 'shuffle', times: 2 });
  expect(shuf.map((r) => JSON.parse(r.res.json.echo).b).sort()).toEqual([1, 1, 2, 2, 3, 3]);
  // A chunked answer is decoded.
  const ch = await p.replay(caps[3]);
  expect(ch[0].json).toEqual({ n: expect.any(Number), echo: '{"c":1}' });
  expect(srv.got.map((g) => g.body)).toEqual([...Array(3).fill('{"b":1}'), ...rev.map((r) => r.req.body.toString()), ...shuf.map((r) => r.req.body.toString()), '{"c":1}']);
  expect(p.replayed).toBe(3 + 6 + 6 + 1);
  // Replays go straight to the target, not through the proxy's listener.
  expect(p.counters.accepted).toBe(accepted);
});

test('a request cut mid-stream (limitBytes) is never captured; replay to a dead target rejects', async () => {
  const srv = await recordingHttpServer();
  const p = await proxyTo(srv.port);
  p.capture();
  p.setToxics('upstream', { limitBytes: 60 });
  await expect(post(p.port, '/apply', JSON.stringify({ pad: 'y'.repeat(500) }), new http.Agent())).rejects.toThrow();
  p.clearToxics();
  await post(p.port, '/apply', '{"ok":1}', new http.Agent());
  const caps = p.stopCapture();
  expect(caps.map((c) => c.body.toString())).toEqual(['{"ok":1}']);
  const dead = await echoServer();
  const deadPort = dead;
  servers[servers.length - 1].close();
  await waitFor('closed', () => !servers[servers.length - 1].listening);
  await expect(p.replay(caps[0], { target: { host: '127.0.0.1', port: deadPort }, timeoutMs: 5_000 })).rejects.toThrow();
});

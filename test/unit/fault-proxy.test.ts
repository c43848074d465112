/**
 * The fault proxy of test/harness, against a local echo server: it forwards byte for byte, delays
 * by its latency, throttles to its bandwidth, cuts (resets open connections, refuses new ones),
 * heals on the same port, black-holes (half-open), resets mid-stream after N bytes, and fails
 * over between targets. Waits on conditions, never on sleeps.
 */
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

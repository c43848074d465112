/**
 * Read-your-writes on a performance secondary, through the unmodified node-vault client.
 *
 * A client of the secondary writes `secret/data/ryw/<i>` (forwarded to the primary) and reads
 * it back at once, 1,000 times in all (four clients at a time, each in its own sequence).
 * Vault's contract: the secondary answers a forwarded write only once it has applied the
 * primary's WAL up to that write, or — after the best-effort wait — with the warning "Timeout hit while waiting for local replicated cluster to apply primary's
 * write ...". So every read must return exactly the written value unless that warning came
 * with the write; a stale read without a warning fails the test.
 *
 * Also: the X-Vault-Index a forwarded write returns is already applied on the secondary when
 * the response arrives, and a request requiring an index the secondary has not reached gets
 * 412 {"errors":["required index state not present"]}.
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import nodeVault from 'node-vault';
import type { TestDatabase } from '../helpers/pg';
import { vault } from '../helpers/http';
import { connectRedis, perfStatus, releaseClusters, replicatePair, startCluster, type Cluster } from '../helpers/replication';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';

jest.setTimeout(240_000); // a bound for a loaded CI machine, not a speed check

const RUN = randomBytes(4).toString('hex');
const PREFIXES = [`coffer-test-ryw-pri-${RUN}`, `coffer-test-ryw-sec-${RUN}`];
const ITERATIONS = 1000;
const CLIENTS = 4;
const WAL_WAIT_WARNING = "Timeout hit while waiting for local replicated cluster to apply primary's write";

const dbs: TestDatabase[] = [];
let redis: Redis | undefined;

const cluster = (label: string, prefix: string) => startCluster(label, dbs, { prefix, logLevel: 'warn' });

const hasWalWarning = (warnings: unknown) => Array.isArray(warnings) && warnings.some((w) => typeof w === 'string' && w.includes(WAL_WAIT_WARNING));

let pri: Cluster;
let sec: Cluster;

beforeAll(async () => {
  redis = await connectRedis();
  pri = await cluster('ryw_pri', PREFIXES[0]);
  sec = await cluster('ryw_sec', PREFIXES[1]);
  await replicatePair(pri, sec, 'ryw-dc2');
  // The kv mount reached the secondary (the bootstrap copied the mount table).
  await waitFor('the kv mount on the secondary', async () => (await vault(sec.p.addr, 'GET', 'sys/mounts', { token: sec.token })).body?.data?.['secret/'] !== undefined);
});

afterAll(() => releaseClusters(redis, PREFIXES, dbs));

test('node-vault on the secondary: 1,000 write-then-read cycles never read stale data without the WAL-wait warning', async () => {
  const rng = seededRng('replication-read-your-writes');
  // Values drawn up front, so a replay with the same seed writes the same data.
  const values = Array.from({ length: ITERATIONS }, (_, i) => ({ i, nonce: Math.floor(rng.next() * 2 ** 32).toString(36), pad: 'p'.repeat(rng.int(0, 64)) }));
  let warned = 0;
  const stale: string[] = [];
  const t0 = Date.now();
  let next = 0;
  // CLIENTS independent node-vault clients, each writing then reading its own keys in turn
  // (read-your-writes is a per-client promise; several clients keep the run short).
  await Promise.all(
    Array.from({ length: CLIENTS }, async () => {
      const client = nodeVault({ endpoint: sec.p.addr, token: sec.token });
      for (let i = next++; i < ITERATIONS; i = next++) {
        const value = values[i];
        const w = await client.write(`secret/data/ryw/${i}`, { data: value });
        const warning = hasWalWarning(w?.warnings);
        if (warning) warned++;
        let got: unknown;
        try {
          got = (await client.read(`secret/data/ryw/${i}`)).data.data;
        } catch (err) {
          got = `error ${(err as { response?: { statusCode?: number } }).response?.statusCode ?? ''} ${(err as Error).message}`;
        }
        if (JSON.stringify(got) !== JSON.stringify(value) && !warning) stale.push(`#${i}: wrote ${JSON.stringify(value)}, read ${JSON.stringify(got)}`);
      }
    }),
  );
  // eslint-disable-next-line no-console
  console.log(`[replication-read-your-writes] ${ITERATIONS} write+read cycles (${CLIENTS} clients) in ${Date.now() - t0} ms; ${warned} writes carried the WAL-wait warning`);
  expect(stale.slice(0, 5)).toEqual([]);
  expect(stale.length).toBe(0);

  // And the primary holds them all (the writes really were forwarded, not applied locally).
  const last = await vault(pri.p.addr, 'GET', `secret/data/ryw/${ITERATIONS - 1}`, { token: pri.token });
  expect(last.body.data.data).toEqual(values[ITERATIONS - 1]);
});

test("a forwarded write's X-Vault-Index is already applied on the secondary when the response arrives", async () => {
  let previous = 0;
  for (let i = 0; i < 20; i++) {
    const w = await vault(sec.p.addr, 'POST', `secret/data/ryw-index/${i % 5}`, { token: sec.token, body: { data: { i } } });
    expect(w.status).toBe(200);
    const index = Number(w.headers.get('x-vault-index'));
    expect(index).toBeGreaterThan(0);
    // Positions of successive writes increase.
    expect(index).toBeGreaterThan(previous);
    previous = index;
    const s = await perfStatus(sec.p.addr);
    if (hasWalWarning(w.body.warnings)) continue; // the best-effort wait ran out: no promise made
    expect(s.last_remote_wal).toBeGreaterThanOrEqual(index);
    // And the secondary serves a read that requires that index.
    const r = await vault(sec.p.addr, 'GET', `secret/data/ryw-index/${i % 5}`, { token: sec.token, headers: { 'X-Vault-Index': String(index) } });
    expect([r.status, r.body.data?.data]).toEqual([200, { i }]);
  }
});

test('a request requiring an index far beyond last_remote_wal gets 412 "required index state not present"', async () => {
  const s = await perfStatus(sec.p.addr);
  expect(s.last_remote_wal).toBeGreaterThan(0);
  const far = s.last_remote_wal + 1_000_000_000;
  const r = await vault(sec.p.addr, 'GET', 'secret/data/ryw/0', { token: sec.token, headers: { 'X-Vault-Index': String(far) } });
  expect([r.status, r.body]).toEqual([412, { errors: ['required index state not present'] }]);
  // A write with such a header is refused the same way, and not forwarded.
  const w = await vault(sec.p.addr, 'POST', 'secret/data/ryw-412', { token: sec.token, body: { data: { x: 1 } }, headers: { 'X-Vault-Index': String(far) } });
  expect([w.status, w.body]).toEqual([412, { errors: ['required index state not present'] }]);
  expect((await vault(pri.p.addr, 'GET', 'secret/data/ryw-412', { token: pri.token })).status).toBe(404);
  // The secondary did not move: the index is still far away.
  expect((await perfStatus(sec.p.addr)).last_remote_wal).toBeLessThan(far);
});

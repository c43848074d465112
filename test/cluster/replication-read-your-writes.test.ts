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
import Redis from 'ioredis';
import nodeVault from 'node-vault';
import { createTestDatabase, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';

jest.setTimeout(100_000);

const REDIS_URL = process.env.COFFER_TEST_REDIS ?? 'redis://127.0.0.1:6379';
const RUN = randomBytes(4).toString('hex');
const PREFIXES = [`coffer-test-ryw-pri-${RUN}`, `coffer-test-ryw-sec-${RUN}`];
const ITERATIONS = 1000;
const CLIENTS = 4;
const WAL_WAIT_WARNING = "Timeout hit while waiting for local replicated cluster to apply primary's write";

const dbs: TestDatabase[] = [];
let redis: Redis | undefined;

async function scanKeys(pattern: string): Promise<string[]> {
  const out: string[] = [];
  let cursor = '0';
  do {
    const [next, keys] = await redis!.scan(cursor, 'MATCH', pattern, 'COUNT', 500);
    out.push(...keys);
    cursor = next;
  } while (cursor !== '0');
  return out;
}

async function deletePrefixKeys(prefix: string): Promise<number> {
  const keys = await scanKeys(`${prefix}:*`);
  for (let i = 0; i < keys.length; i += 500) await redis!.del(...keys.slice(i, i + 500));
  return keys.length;
}

interface Cluster {
  p: CofferProcess;
  token: string;
  db: TestDatabase;
}

async function cluster(label: string, prefix: string): Promise<Cluster> {
  const db = await createTestDatabase(label);
  dbs.push(db);
  const p = await startCoffer({ dbUrl: db.url, logLevel: 'warn', extraHcl: `queue "redis" {\n url = "${REDIS_URL}"\n prefix = "${prefix}"\n}\n` });
  const { rootToken } = await initAndUnseal([p]);
  return { p, token: rootToken, db };
}

const perfStatus = async (addr: string) => (await vault(addr, 'GET', 'sys/replication/performance/status')).body.data;
const hasWalWarning = (warnings: unknown) => Array.isArray(warnings) && warnings.some((w) => typeof w === 'string' && w.includes(WAL_WAIT_WARNING));

let pri: Cluster;
let sec: Cluster;

beforeAll(async () => {
  redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 2 });
  await redis.connect();
  pri = await cluster('ryw_pri', PREFIXES[0]);
  sec = await cluster('ryw_sec', PREFIXES[1]);
  await mountKv2(pri.p.addr, pri.token);
  expect((await vault(pri.p.addr, 'POST', 'sys/replication/performance/primary/enable', { token: pri.token, body: {} })).status).toBe(200);
  const tok = await vault(pri.p.addr, 'POST', 'sys/replication/performance/primary/secondary-token', { token: pri.token, body: { id: 'ryw-dc2' } });
  expect(tok.status).toBe(200);
  const en = await vault(sec.p.addr, 'POST', 'sys/replication/performance/secondary/enable', { token: sec.token, body: { token: tok.body.wrap_info.token } });
  expect([en.status, en.body.errors]).toEqual([200, undefined]);
  await waitFor('secondary to stream WAL', async () => (await perfStatus(sec.p.addr)).state === 'stream-wals', { timeoutMs: 30_000 });
  // The kv mount reached the secondary (the bootstrap copied the mount table).
  await waitFor('the kv mount on the secondary', async () => (await vault(sec.p.addr, 'GET', 'sys/mounts', { token: sec.token })).body?.data?.['secret/'] !== undefined);
});

afterAll(async () => {
  await stopAllCoffers();
  if (redis) {
    for (const p of PREFIXES) {
      await deletePrefixKeys(p).catch(() => undefined);
      expect(await scanKeys(`${p}:*`)).toEqual([]);
    }
    redis.disconnect();
  }
  for (const d of dbs) await d.drop();
});

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

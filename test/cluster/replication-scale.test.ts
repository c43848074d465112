/**
 * Performance replication at scale: a primary and a secondary set up through the API alone
 * (primary/enable, secondary-token, secondary/enable), each with its own Redis (BullMQ) queue
 * prefix, then 10,000 KV v2 writes on the primary from 16 concurrent HTTP writers. The
 * secondary must converge: its `last_remote_wal` reaches the primary's `last_wal`, every live
 * replicated row (path, version, value_hash) is identical in both databases, and a seeded
 * sample of 500 keys reads back through the secondary's API with the value written.
 *
 * The time from the last acknowledged write to convergence is printed.
 */
import { randomBytes } from 'node:crypto';
import Redis from 'ioredis';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';

jest.setTimeout(110_000);

const REDIS_URL = process.env.COFFER_TEST_REDIS ?? 'redis://127.0.0.1:6379';
const RUN = randomBytes(4).toString('hex');
const PREFIXES = [`coffer-test-rscale-pri-${RUN}`, `coffer-test-rscale-sec-${RUN}`];
const WRITES = 10_000;
const WRITERS = 16;
const SAMPLE = 500;
const WRITE_DEADLINE_MS = 80_000;

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

/** Live replicated rows of a cluster: path → "version:value_hash". */
async function liveRows(url: string): Promise<Map<string, string>> {
  const c = await sqlClient(url);
  try {
    const { rows } = await c.query<{ path: string; version: string; h: string }>(
      `SELECT path, version::text AS version, encode(value_hash, 'hex') AS h FROM coffer_entries WHERE value IS NOT NULL ORDER BY path`,
    );
    return new Map(rows.map((r) => [r.path, `${r.version}:${r.h}`]));
  } finally {
    await c.end();
  }
}

/** Differences between two row sets, summarised (a 20k-row toEqual diff is unreadable). */
function diffRows(a: Map<string, string>, b: Map<string, string>) {
  const onlyA: string[] = [];
  const onlyB: string[] = [];
  const differ: string[] = [];
  for (const [k, v] of a) {
    if (!b.has(k)) onlyA.push(k);
    else if (b.get(k) !== v) differ.push(`${k}: ${v} vs ${b.get(k)}`);
  }
  for (const k of b.keys()) if (!a.has(k)) onlyB.push(k);
  return { onlyOnPrimary: onlyA.length, onlySecondary: onlyB.length, differing: differ.length, examples: [...onlyA, ...onlyB, ...differ].slice(0, 5) };
}

async function unorderedWal(url: string): Promise<number> {
  const c = await sqlClient(url);
  try {
    return (await c.query<{ n: number }>(`SELECT count(*)::int AS n FROM coffer_wal WHERE lsn IS NULL`)).rows[0].n;
  } finally {
    await c.end();
  }
}

const perfStatus = async (addr: string) => (await vault(addr, 'GET', 'sys/replication/performance/status')).body.data;

test('10,000 writes from 16 writers on the primary converge on the secondary: WAL positions, SQL rows, API reads', async () => {
  redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 2 });
  await redis.connect();
  const rng = seededRng('replication-scale');

  const pri = await cluster('rscale_pri', PREFIXES[0]);
  const sec = await cluster('rscale_sec', PREFIXES[1]);
  await mountKv2(pri.p.addr, pri.token);
  expect((await vault(pri.p.addr, 'POST', 'sys/replication/performance/primary/enable', { token: pri.token, body: {} })).status).toBe(200);
  const tok = await vault(pri.p.addr, 'POST', 'sys/replication/performance/primary/secondary-token', { token: pri.token, body: { id: 'scale-dc2' } });
  expect(tok.status).toBe(200);
  const en = await vault(sec.p.addr, 'POST', 'sys/replication/performance/secondary/enable', { token: sec.token, body: { token: tok.body.wrap_info.token } });
  expect([en.status, en.body.errors]).toEqual([200, undefined]);
  await waitFor('secondary to stream WAL', async () => (await perfStatus(sec.p.addr)).state === 'stream-wals', { timeoutMs: 30_000 });

  // The values, drawn up front from the seeded generator so a replay writes the same data.
  const values = Array.from({ length: WRITES }, (_, i) => ({ i, v: Math.floor(rng.next() * 2 ** 32).toString(36), pad: 'x'.repeat(rng.int(0, 200)) }));
  const failures: string[] = [];
  let next = 0;
  let attempted = 0;
  const t0 = Date.now();
  // Bounded: writers give up at the deadline, and the test fails saying how far they got.
  const deadline = t0 + WRITE_DEADLINE_MS;
  await Promise.all(
    Array.from({ length: WRITERS }, async () => {
      for (let i = next++; i < WRITES && Date.now() < deadline; i = next++) {
        const r = await vault(pri.p.addr, 'POST', `secret/data/scale/${i}`, { token: pri.token, body: { data: values[i] } }).catch((err: Error) => ({ status: -1, body: err.message }));
        attempted++;
        if (r.status !== 200) failures.push(`${i}: ${r.status} ${JSON.stringify(r.body)}`);
      }
    }),
  );
  const writeMs = Date.now() - t0;
  // eslint-disable-next-line no-console
  console.log(`[replication-scale] ${attempted} writes with ${WRITERS} writers in ${writeMs} ms (${Math.round((attempted * 1000) / writeMs)}/s)`);
  expect(failures.slice(0, 5)).toEqual([]);
  expect(failures.length).toBe(0);
  // All of them, within the deadline (about 45 s on an idle 2-core machine).
  expect(attempted).toBe(WRITES);
  expect(writeMs).toBeLessThan(WRITE_DEADLINE_MS);

  const t1 = Date.now();
  const converged = await waitFor(
    "secondary's last_remote_wal to equal the primary's last_wal",
    async () => {
      if ((await unorderedWal(pri.db.url)) !== 0) return null;
      const p = await perfStatus(pri.p.addr);
      const s = await perfStatus(sec.p.addr);
      return p.last_wal > 0 && s.last_remote_wal === p.last_wal ? { p, s } : null;
    },
    { timeoutMs: 60_000, intervalMs: 100 },
  );
  const convergeMs = Date.now() - t1;
  // eslint-disable-next-line no-console
  console.log(
    `[replication-scale] converged ${convergeMs} ms after the last acknowledged write (${Date.now() - t0} ms after the first); last_wal=${converged.p.last_wal}`,
  );
  expect(converged.p.last_wal).toBeGreaterThanOrEqual(WRITES);
  const me = converged.p.secondaries.find((s: { node_id: string }) => s.node_id === 'scale-dc2');
  expect(me).toMatchObject({ acked_wal: converged.p.last_wal, lag_wal: 0 });

  // Every live replicated row is identical in both databases.
  const [pRows, sRows] = await Promise.all([liveRows(pri.db.url), liveRows(sec.db.url)]);
  expect(pRows.size).toBeGreaterThanOrEqual(WRITES);
  expect(diffRows(pRows, sRows)).toEqual({ onlyOnPrimary: 0, onlySecondary: 0, differing: 0, examples: [] });

  // A seeded sample of 500 keys reads back through the secondary's API with the written value.
  const sample = new Set<number>();
  while (sample.size < SAMPLE) sample.add(rng.int(0, WRITES - 1));
  const queue = [...sample];
  const wrong: string[] = [];
  await Promise.all(
    Array.from({ length: WRITERS }, async () => {
      for (let i = queue.pop(); i !== undefined; i = queue.pop()) {
        const r = await vault(sec.p.addr, 'GET', `secret/data/scale/${i}`, { token: sec.token });
        if (r.status !== 200 || JSON.stringify(r.body?.data?.data) !== JSON.stringify(values[i])) wrong.push(`${i}: ${r.status} ${JSON.stringify(r.body).slice(0, 200)}`);
      }
    }),
  );
  expect(wrong.slice(0, 5)).toEqual([]);
  expect(wrong.length).toBe(0);
});

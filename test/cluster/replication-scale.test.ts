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
import type Redis from 'ioredis';
import type { TestDatabase } from '../helpers/pg';
import { vault } from '../helpers/http';
import { connectRedis, diffRows, liveRows, perfStatus, releaseClusters, replicatePair, startCluster, waitForCatchUp } from '../helpers/replication';
import { waitFor } from '../helpers/wait';
import { seededRng } from '../helpers/rng';

// Bounded, but not a speed test: on a busy 2-core CI machine sharing the run with other
// cluster tests the 10k writes can take a few minutes (~45 s when idle).
jest.setTimeout(720_000);

const RUN = randomBytes(4).toString('hex');
const PREFIXES = [`coffer-test-rscale-pri-${RUN}`, `coffer-test-rscale-sec-${RUN}`];
const WRITES = 10_000;
const WRITERS = 16;
const SAMPLE = 500;
const WRITE_DEADLINE_MS = 540_000;

const dbs: TestDatabase[] = [];
let redis: Redis | undefined;

afterAll(() => releaseClusters(redis, PREFIXES, dbs));

const cluster = (label: string, prefix: string) => startCluster(label, dbs, { prefix, logLevel: 'warn' });

test('10,000 writes from 16 writers on the primary converge on the secondary: WAL positions, SQL rows, API reads', async () => {
  redis = await connectRedis();
  const rng = seededRng('replication-scale');

  const pri = await cluster('rscale_pri', PREFIXES[0]);
  const sec = await cluster('rscale_sec', PREFIXES[1]);
  await replicatePair(pri, sec, 'scale-dc2');

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
  // All of them (the deadline is a safety bound only).
  expect(attempted).toBe(WRITES);

  const t1 = Date.now();
  const converged = await waitForCatchUp("secondary's last_remote_wal to equal the primary's last_wal", { addr: pri.p.addr, dbUrl: pri.db.url }, sec.p.addr, {
    timeoutMs: 60_000,
    nonEmpty: true,
  });
  const convergeMs = Date.now() - t1;
  // eslint-disable-next-line no-console
  console.log(
    `[replication-scale] converged ${convergeMs} ms after the last acknowledged write (${Date.now() - t0} ms after the first); last_wal=${converged.p.last_wal}`,
  );
  expect(converged.p.last_wal).toBeGreaterThanOrEqual(WRITES);
  // The secondary applies before the primary records the acknowledgement: wait for the
  // primary's view to catch up too.
  const me = await waitFor('the primary to record the acknowledgement', async () => {
    const s = (await perfStatus(pri.p.addr)).secondaries.find((x: { node_id: string }) => x.node_id === 'scale-dc2');
    return s?.acked_wal === converged.p.last_wal ? s : null;
  });
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

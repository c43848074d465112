/**
 * Bounded WAL (`replication { logshipper_buffer_length, logshipper_buffer_size }`): the active
 * node collects ordered WAL rows after each checkpoint, keeping at most the configured number
 * of rows and bytes (and never what the merkle index's recovery would read).
 *
 *   (a) row bound 100, 1,000 writes: the ordered rows settle at exactly the last 100; during
 *       the load they stay near the bound; `vault_logshipper_buffer_length` reports them and
 *       `coffer_wal_gc_deleted_total` counts every collected row; a connected, streaming
 *       secondary receives every write all the same (rows identical at the end);
 *   (b) byte bound 64 KiB, values of about 4 KiB: the retained bytes (value sizes plus the fixed
 *       per-row overhead the bound counts) settle at most 64 KiB, and no lower than one row
 *       under it; `vault_logshipper_buffer_size` reports them.
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import { vault } from '../helpers/http';
import type { TestDatabase } from '../helpers/pg';
import { activationToken, connectRedis, diffRows, enablePrimary, liveRows, releaseClusters, waitAllConverged, waitForStream, withSql, type Cluster } from '../helpers/replication';
import { waitFor } from '../helpers/wait';
import { mountKv1, prometheus, secondaryRow, series, startClusterWith, StateRecorder, walRetained, writeAll } from './merkle-support';

const RUN = randomBytes(4).toString('hex');
const PREFIXES = ['pri', 'sec', 'bytes'].map((p) => `coffer-test-walret-${p}-${RUN}`);
const ID = 'walret-dc2';
const ROW_BOUND = 100;
const WRITES = 1_000;
const BYTE_BOUND = 64 * 1024;
/** What collectWal counts per row beyond its value (src/storage/merkle.ts WAL_ROW_OVERHEAD_BYTES). */
const ROW_OVERHEAD = 128;
/** Flushes and checkpoints fast enough that the index's redo point follows the head closely. */
const MERKLE_HCL = `merkle {\n  checkpoint_interval = "200ms"\n  flush_interval = "50ms"\n  flush_fraction = 0.5\n}\n`;

const dbs: TestDatabase[] = [];
let redis: Redis | undefined;
let pri: Cluster;
let sec: Cluster;
let bytesPri: Cluster;

beforeAll(async () => {
  redis = await connectRedis();
  [pri, sec, bytesPri] = await Promise.all([
    startClusterWith('walret_pri', dbs, { prefix: PREFIXES[0], extraHcl: `replication {\n  logshipper_buffer_length = ${ROW_BOUND}\n}\n` + MERKLE_HCL }),
    startClusterWith('walret_sec', dbs, { prefix: PREFIXES[1] }),
    startClusterWith('walret_bytes', dbs, { prefix: PREFIXES[2], extraHcl: `replication {\n  logshipper_buffer_size = "64KiB"\n}\n` + MERKLE_HCL }),
  ]);
}, 90_000);

afterAll(() => releaseClusters(redis, PREFIXES, dbs));

/** Samples the retained WAL of `url` until stopped; the largest figures seen. */
function sampleRetention(url: string) {
  let stopped = false;
  const max = { rows: 0, bytes: 0, samples: 0 };
  const loop = (async () => {
    while (!stopped) {
      const w = await walRetained(url);
      max.rows = Math.max(max.rows, w.rows);
      max.bytes = Math.max(max.bytes, w.bytes);
      max.samples++;
      await new Promise((r) => setTimeout(r, 25));
    }
  })();
  return {
    async stop() {
      stopped = true;
      await loop;
      return max;
    },
  };
}

test(`(a) row bound ${ROW_BOUND}: after ${WRITES} writes the primary keeps the last ${ROW_BOUND} ordered rows, the gauges say so, and a streaming secondary gets every write`, async () => {
  await mountKv1(pri.addr, pri.token);
  await enablePrimary(pri);
  const en = await vault(sec.addr, 'POST', 'sys/replication/performance/secondary/enable', { token: sec.token, body: { token: await activationToken(pri, ID) } });
  expect([en.status, en.body.errors]).toEqual([200, undefined]);
  await waitForStream(sec.addr, 'the secondary to stream WAL', { timeoutMs: 30_000 });

  const states = new StateRecorder(async () => (await secondaryRow(pri.db.url, ID)).status, 20);
  const sampler = sampleRetention(pri.db.url);
  const t0 = Date.now();
  // 1,000 writes: 400 keys, written and then partly overwritten, so the WAL has both.
  const paths = Array.from({ length: WRITES }, (_, i) => `kv/ret/${i % 400}`);
  await writeAll(pri.addr, pri.token, paths, (p) => ({ p, at: Date.now() }));
  const loadMs = Date.now() - t0;
  const during = await sampler.stop();

  const settled = await waitFor(
    `the primary's ordered WAL to settle at ${ROW_BOUND} rows`,
    async () => {
      const w = await walRetained(pri.db.url);
      return w.unordered === 0 && w.rows <= ROW_BOUND ? w : null;
    },
    { timeoutMs: 20_000, intervalMs: 100 },
  );
  // eslint-disable-next-line no-console
  console.log(
    `[wal-retention] (a) ${WRITES} writes in ${loadMs} ms; retained during the load: at most ${during.rows} rows (${during.samples} samples); ` +
      `settled ${Date.now() - t0 - loadMs} ms after: ${settled.rows} rows ${settled.lo}..${settled.hi} of head ${settled.head}`,
  );
  expect(settled.head).toBeGreaterThanOrEqual(WRITES);
  // Exactly the newest ROW_BOUND positions: nothing newer collected, nothing older kept.
  expect([settled.rows, settled.lo, settled.hi]).toEqual([ROW_BOUND, settled.head - ROW_BOUND + 1, settled.head]);
  // Collection ran during the load, not only after it: the WAL never held the whole burst.
  expect(during.rows).toBeLessThan(WRITES / 2);

  // The gauges report it: retained rows, and every collected row counted once (this process
  // is the only one that ever collected here, and LSNs are dense from 1).
  const text = await waitFor('the gauges to report the settled WAL', async () => {
    const t = await prometheus(pri.addr, pri.token);
    return series(t, 'vault_logshipper_buffer_length') === ROW_BOUND && series(t, 'coffer_wal_gc_deleted_total') === settled.head - ROW_BOUND ? t : null;
  }).catch(async (err: Error) => {
    const t = await prometheus(pri.addr, pri.token);
    throw new Error(`${err.message}: ${['vault_logshipper_buffer_length', 'coffer_wal_gc_deleted_total'].map((n) => `${n}=${series(t, n)}`).join(', ')}`);
  });
  expect(series(text, 'vault_logshipper_buffer_length')).toBe(ROW_BOUND);
  expect(series(text, 'coffer_wal_gc_deleted_total')).toBe(settled.head - ROW_BOUND);
  expect(series(text, 'vault_logshipper_buffer_size')).toBe((await walRetained(pri.db.url)).bytes);

  // The streaming secondary received every write.
  await withSql(pri.db.url, async (priSql) => {
    const h = await waitAllConverged('the secondary to catch up', pri.addr, priSql, [sec.addr], 30_000);
    expect(h).toBe(settled.head);
  });
  const [p, s] = await Promise.all([liveRows(pri.db.url), liveRows(sec.db.url)]);
  expect(diffRows(p, s)).toEqual({ onlyOnPrimary: 0, onlySecondary: 0, differing: 0, examples: [] });
  const seen = await states.stop();
  // eslint-disable-next-line no-console
  console.log(`[wal-retention] (a) the primary's record of the secondary during the load: ${seen.join(' → ')}`);
  expect(seen[seen.length - 1]).toBe('streaming');
  // The last value of every key, through the secondary's API.
  const last = new Map(paths.map((path, i) => [path, i]));
  const wrong: string[] = [];
  for (const path of last.keys()) {
    const r = await vault(sec.addr, 'GET', path, { token: sec.token });
    const w = await vault(pri.addr, 'GET', path, { token: pri.token });
    if (r.status !== 200 || JSON.stringify(r.body.data) !== JSON.stringify(w.body.data)) wrong.push(`${path}: ${r.status} ${JSON.stringify(r.body).slice(0, 120)}`);
  }
  expect(wrong).toEqual([]);
}, 90_000);

test('(b) byte bound 64 KiB with values of about 4 KiB: the retained WAL bytes settle within the bound, and the gauge reports them', async () => {
  await mountKv1(bytesPri.addr, bytesPri.token);
  const sampler = sampleRetention(bytesPri.db.url);
  const paths = Array.from({ length: 120 }, (_, i) => `kv/big/${i % 60}`);
  await writeAll(bytesPri.addr, bytesPri.token, paths, (p) => ({ p, pad: randomBytes(3072).toString('base64') }), 4);
  const during = await sampler.stop();
  const settled = await waitFor(
    'the retained WAL bytes to settle within 64 KiB',
    async () => {
      const w = await walRetained(bytesPri.db.url);
      return w.unordered === 0 && w.bytes <= BYTE_BOUND ? w : null;
    },
    { timeoutMs: 20_000, intervalMs: 100 },
  );
  const rows = await withSql(bytesPri.db.url, async (c) => (await c.query(`SELECT lsn::bigint AS lsn, value_size FROM coffer_wal WHERE lsn IS NOT NULL ORDER BY lsn`)).rows);
  const biggest = Math.max(...rows.map((r) => Number(r.value_size)));
  // eslint-disable-next-line no-console
  console.log(
    `[wal-retention] (b) retained during the load: at most ${during.bytes} B; settled: ${settled.rows} rows, ${settled.bytes} B (values up to ${biggest} B), head ${settled.head}`,
  );
  expect(biggest).toBeGreaterThan(4000);
  expect(settled.bytes).toBeLessThanOrEqual(BYTE_BOUND);
  // It keeps as much as fits: one more row of this size would pass the bound.
  expect(settled.bytes + biggest + ROW_OVERHEAD).toBeGreaterThan(BYTE_BOUND);
  expect(settled.hi).toBe(settled.head);
  const text = await waitFor('the size gauge to report the settled WAL', async () => {
    const t = await prometheus(bytesPri.addr, bytesPri.token);
    return series(t, 'vault_logshipper_buffer_size') === settled.bytes && series(t, 'coffer_wal_gc_deleted_total') === settled.head - settled.rows ? t : null;
  }).catch(async (err: Error) => {
    const t = await prometheus(bytesPri.addr, bytesPri.token);
    throw new Error(`${err.message}: ${['vault_logshipper_buffer_size', 'vault_logshipper_buffer_length', 'coffer_wal_gc_deleted_total'].map((n) => `${n}=${series(t, n)}`).join(', ')}`);
  });
  expect(series(text, 'vault_logshipper_buffer_length')).toBe(settled.rows);
  expect(series(text, 'coffer_wal_gc_deleted_total')).toBe(settled.head - settled.rows);
}, 90_000);

/**
 * Reconciliation by merkle diff after the primary's bounded WAL moved past a secondary
 * (DESIGN.md "Merkle index and recovery"; invariants 4 and 6):
 *
 *   A secondary is killed while the primary, whose WAL keeps only 200 ordered rows, changes a
 *   seeded subset of the keys (updates, deletes, new keys) and then overwrites one key until
 *   the WAL rows the secondary would need next are collected. The primary marks it
 *   `needs-reconcile`. Restarted on the same database, the secondary is told to reconcile,
 *   runs merkle-diff then merkle-sync, and returns to `stream-wals`, with:
 *   - replicated rows identical in SQL, merkle roots equal;
 *   - proof it used the diff and not a full copy: one merkle-diff and one merkle-sync round
 *     trip, the keys moved (coffer_merkle_sync_keys_total) about the number of differences
 *     and far below the key count, the bytes far below the initial full sync's;
 *   - no write lost that the primary acknowledged while the secondary reconciled: a writer
 *     runs throughout, and the merkle-sync call is held (by the proxy in front of the
 *     primary) until the writer has made progress after the diff's snapshot and again after
 *     the primary computed the sync answer.
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import { vault } from '../helpers/http';
import type { TestDatabase } from '../helpers/pg';
import {
  activationToken,
  connectRedis,
  diffRows,
  enablePrimary,
  liveRows,
  perfStatus,
  releaseClusters,
  waitAllConverged,
  waitForStream,
  withSql,
  type Cluster,
  type SqlClient,
} from '../helpers/replication';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';
import { CountingProxy, metric, mountKv1, restart, secondaryRow, startClusterWith, StateRecorder, walRetained, writeAll, Writer } from './merkle-support';

const RUN = randomBytes(4).toString('hex');
const PRI_PREFIX = `coffer-test-mrec-pri-${RUN}`;
const SEC_PREFIX = `coffer-test-mrec-sec-${RUN}`;
const ID = 'mrec-dc2';
const BASE = 1000;
const CHANGED = 30;
const DELETED = 5;
const ADDED = 5;
/** The primary's WAL bound: small, yet well above what the writer adds while a reconciliation runs
 * (else the WAL after the diff's snapshot is collected too, and a second reconciliation is due). */
const WAL_ROWS = 200;
/** Writes the proxy waits for while it holds the merkle-sync request, and again its answer. */
const HOLD_WRITES = 10;

const rng = seededRng('merkle-reconcile');
const dbs: TestDatabase[] = [];
let redis: Redis | undefined;
let pri: Cluster;
let sec: Cluster;
const proxy = new CountingProxy('');

const value = (path: string, gen = 0) => ({ path, gen, v: Math.floor(rng.next() * 2 ** 32).toString(36) });
const root = async (addr: string): Promise<string> => (await perfStatus(addr)).merkle_root;
const syncKeys = async () => (await metric(sec.addr, sec.token, 'coffer_merkle_sync_keys_total')) ?? 0;

/** Waits until both clusters report the same non-empty merkle root; returns it. */
const equalRoots = (what: string) =>
  waitFor(
    what,
    async () => {
      const [a, b] = [await root(pri.addr), await root(sec.addr)];
      return a && a === b ? a : null;
    },
    { timeoutMs: 20_000, intervalMs: 100 },
  );

async function expectIdentical(priSql: SqlClient): Promise<number> {
  const h = await waitAllConverged('the secondary to converge with the primary', pri.addr, priSql, [sec.addr], 30_000);
  const [p, s] = await Promise.all([liveRows(pri.db.url), liveRows(sec.db.url)]);
  expect(diffRows(p, s)).toEqual({ onlyOnPrimary: 0, onlySecondary: 0, differing: 0, examples: [] });
  return h;
}

beforeAll(async () => {
  redis = await connectRedis();
  await proxy.listen();
  [pri, sec] = await Promise.all([
    startClusterWith('mrec_pri', dbs, {
      prefix: PRI_PREFIX,
      // A small WAL bound, and flushes/checkpoints fast enough that the index's redo point (the
      // other bound on collection) follows the head closely.
      extraHcl: `replication {\n  logshipper_buffer_length = ${WAL_ROWS}\n}\nmerkle {\n  checkpoint_interval = "200ms"\n  flush_interval = "50ms"\n  flush_fraction = 0.5\n}\n`,
    }),
    startClusterWith('mrec_sec', dbs, { prefix: SEC_PREFIX, extraHcl: `merkle {\n  checkpoint_interval = "200ms"\n}\n` }),
  ]);
  proxy.target = pri.addr;
}, 60_000);

afterAll(async () => {
  await releaseClusters(redis, [PRI_PREFIX, SEC_PREFIX], dbs);
  await proxy.close();
});

test(
  'a secondary kept down while the primary takes more writes than the WAL retains reconverges by merkle diff, not a full copy, losing no write made meanwhile',
  async () => {
    await withSql(pri.db.url, async (priSql) => {
      // ------------------------------------------------------------ base set, replicated
      await mountKv1(pri.addr, pri.token);
      const base = Array.from({ length: BASE }, (_, i) => `kv/base/${i}`);
      await writeAll(pri.addr, pri.token, base, (p) => value(p));
      await enablePrimary(pri);
      // The secondary talks to the primary through the counting proxy.
      const en = await vault(sec.addr, 'POST', 'sys/replication/performance/secondary/enable', {
        token: sec.token,
        body: { token: await activationToken(pri, ID), primary_api_addr: proxy.url },
      });
      expect([en.status, en.body.errors]).toEqual([200, undefined]);
      await waitForStream(sec.addr, 'the secondary to stream WAL', { timeoutMs: 30_000 });
      const totalKeys = (await liveRows(pri.db.url)).size;
      await expectIdentical(priSql);
      const root0 = await equalRoots('equal merkle roots after the initial sync');
      expect(root0.length).toBeGreaterThan(0);
      // The first sync of an empty secondary moved everything: the reference for "a full copy".
      const initialSync = proxy.internal('merkle-sync');
      const initialSyncBytes = initialSync.reduce((s, c) => s + c.reqBytes + c.resBytes, 0);
      const initialKeys = await syncKeys();
      expect(initialKeys).toBeGreaterThanOrEqual(BASE);
      const acked = Number((await secondaryRow(pri.db.url, ID)).acked_lsn);
      expect(acked).toBe((await walRetained(pri.db.url)).head);

      // ------------------------------------------------------------ outage
      await sec.p.kill('SIGKILL');
      const shuffled = [...base];
      for (let i = shuffled.length - 1; i > 0; i--) {
        const j = rng.int(0, i);
        [shuffled[i], shuffled[j]] = [shuffled[j], shuffled[i]];
      }
      const changed = shuffled.slice(0, CHANGED);
      const deleted = shuffled.slice(CHANGED, CHANGED + DELETED);
      const added = Array.from({ length: ADDED }, (_, i) => `kv/new/${i}`);
      await writeAll(pri.addr, pri.token, changed, (p) => value(p, 1));
      for (const p of deleted) expect((await vault(pri.addr, 'DELETE', p, { token: pri.token })).status).toBe(204);
      await writeAll(pri.addr, pri.token, added, (p) => value(p));
      // Overwrite one key until the WAL row the secondary needs next (acked + 1) is collected.
      let hotWrites = 0;
      const wal = await waitFor(
        `the primary to collect WAL past the secondary's acknowledged position ${acked}`,
        async () => {
          const w = await walRetained(pri.db.url);
          if (w.lo !== null && w.lo > acked + 1) return w;
          if (hotWrites < 2_000) {
            await writeAll(pri.addr, pri.token, Array.from({ length: 20 }, () => 'kv/hot'), (p) => value(p, hotWrites++), 4);
          }
          return null;
        },
        { timeoutMs: 30_000, intervalMs: 20 },
      );
      // eslint-disable-next-line no-console
      console.log(`[merkle-reconcile] acked=${acked}; after ${hotWrites} writes to kv/hot the primary retains WAL ${wal.lo}..${wal.hi} (${wal.rows} rows, head ${wal.head})`);
      expect(wal.lo).toBeGreaterThan(acked + 1);
      // The primary notices that what this secondary needs is gone.
      const marked = await waitFor('the primary to mark the secondary needs-reconcile', async () => {
        const r = await secondaryRow(pri.db.url, ID);
        return r.status === 'needs-reconcile' ? r : null;
      });
      expect(marked.last_error).toMatch(/no longer retained/);
      const differences = CHANGED + DELETED + ADDED + 1; // + kv/hot

      // ------------------------------------------------------------ restart, reconcile under writes
      const primaryStates = new StateRecorder(async () => (await secondaryRow(pri.db.url, ID)).status);
      // The writer starts as the secondary comes back; paced (about 40 writes/s) so that what it
      // adds stays small beside the differences.
      let writer: Writer | undefined;
      const written = () => writer?.count ?? 0;
      let beforeDiff = -1;
      let atDiff = -1;
      let writesBeforeSyncAnswer = -1;
      let released = false;
      proxy.gate = async (phase, path) => {
        if (path.endsWith('/merkle-diff') && phase === 'request') beforeDiff = written();
        if (path.endsWith('/merkle-diff') && phase === 'response') atDiff = written();
        if (!path.endsWith('/merkle-sync')) return;
        // Hold the sync: writes land after the diff's snapshot (they come back in the sync, or
        // in the WAL after it) and after the primary computed its answer (WAL after the snapshot).
        const target = written() + HOLD_WRITES;
        await waitFor(`${HOLD_WRITES} more writes while merkle-sync is held (${phase})`, () => released || written() >= target, { timeoutMs: 15_000, intervalMs: 5 });
        if (phase === 'response') writesBeforeSyncAnswer = written();
      };
      const restartedAt = Date.now();
      let secondaryStates: StateRecorder | null = null;
      try {
        await restart(sec);
        writer = new Writer(pri.addr, pri.token, 'kv/during', 1, 20);
        secondaryStates = new StateRecorder(async () => (await perfStatus(sec.addr)).state);
        await waitFor('one merkle-sync after the restart', () => proxy.internal('merkle-sync', restartedAt).length >= 1, { timeoutMs: 30_000 });
        await waitFor('the primary to stream to the secondary again', async () => (await secondaryRow(pri.db.url, ID)).status === 'streaming', { timeoutMs: 20_000 });
        await waitForStream(sec.addr, 'the secondary back in stream-wals');
        const more = written() + 30;
        await waitFor('writes after reconciliation', () => written() >= more);
      } finally {
        released = true;
        proxy.gate = null;
        await writer?.stop();
      }
      const pStates = await primaryStates.stop();
      const sStates = (await secondaryStates?.stop()) ?? [];
      if (!writer) throw new Error('the writer never started');
      expect(writer.failures).toEqual([]);
      // eslint-disable-next-line no-console
      console.log(`[merkle-reconcile] primary's record of the secondary: ${pStates.join(' → ')}; secondary states: ${sStates.join(' → ')}`);
      // The primary stopped shipping for the reconciliation and resumed after it.
      // Exactly once: a second reconciliation right after the first is a bug (the cursor must
      // move with the status, see Replication.heartbeatFrom).
      expect(pStates).toEqual(['needs-reconcile', 'reconciling', 'streaming']);
      expect(sStates).toContain('merkle-sync');
      expect(sStates[sStates.length - 1]).toBe('stream-wals');
      expect(sec.p.output()).toMatch(/no longer retains our WAL position; starting merkle diff/);

      // ------------------------------------------------------------ converged, identically
      await expectIdentical(priSql);
      const root1 = await equalRoots('equal merkle roots after reconciliation');
      expect(root1).not.toBe(root0);
      // Every write acknowledged during the reconciliation reads back on the secondary.
      const wrong: string[] = [];
      for (const [path, v] of writer.acked) {
        const r = await vault(sec.addr, 'GET', path, { token: sec.token });
        if (r.status !== 200 || JSON.stringify(r.body.data) !== JSON.stringify(v)) wrong.push(`${path}: ${r.status} ${JSON.stringify(r.body).slice(0, 200)}`);
      }
      expect(wrong).toEqual([]);
      expect(atDiff).toBeGreaterThanOrEqual(0);
      expect(writesBeforeSyncAnswer).toBeGreaterThan(atDiff);

      // ------------------------------------------------------------ it used the diff
      const diffs = proxy.internal('merkle-diff', restartedAt);
      const syncs = proxy.internal('merkle-sync', restartedAt);
      const syncBytes = syncs.reduce((s, c) => s + c.reqBytes + c.resBytes, 0);
      const moved = await syncKeys();
      const duringSync = writesBeforeSyncAnswer - atDiff;
      // eslint-disable-next-line no-console
      console.log(
        `[merkle-reconcile] ${totalKeys} keys, ${differences} changed during the outage, ${writer.count} written during the reconnect (${beforeDiff} before merkle-diff, ${duringSync} while merkle-sync was held); ` +
          `reconciliation: ${diffs.length} merkle-diff (${diffs.map((c) => `${c.reqBytes}+${c.resBytes}`).join(', ')} B), ${syncs.length} merkle-sync (${syncBytes} B), ${moved} keys moved; ` +
          `the initial full sync: ${initialSync.length} merkle-sync calls, ${initialSyncBytes} B, ${initialKeys} keys`,
      );
      expect(diffs.map((c) => c.status)).toEqual([200]);
      expect(syncs.map((c) => c.status)).toEqual([200]);
      // Every difference of the outage moved; besides them, at most the writer's (those before
      // the diff are differences too, unless still unordered at its snapshot; later ones move
      // only if they fall in a differing subpage).
      expect(beforeDiff).toBeGreaterThanOrEqual(0);
      expect(moved).toBeGreaterThanOrEqual(differences);
      expect(moved).toBeLessThanOrEqual(differences + writesBeforeSyncAnswer);
      expect(moved).toBeLessThan(0.25 * totalKeys);
      expect(syncBytes).toBeLessThan(0.25 * initialSyncBytes);
    });
  },
  90_000,
);

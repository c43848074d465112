/**
 * Performance replication through outages, with real processes killed by SIGKILL:
 *
 *  (a) the secondary is down for COFFER_OUTAGE_SECONDS (default 30) while writes stream into
 *      the primary: no write fails, the primary reports the secondary disconnected, and after
 *      a restart (same database, same address, unsealed with the same key) it catches up;
 *  (b) the primary is down: the secondary still serves (possibly stale) reads, a forwarded
 *      write fails fast with a 5xx and Vault's error envelope, and after the primary restarts
 *      the secondary catches up by itself;
 *  (c) every Redis key of the primary's queue prefix is deleted mid-stream (SCAN + DEL, never
 *      FLUSHALL: the Redis is shared): nothing is lost, shipping resumes.
 *
 * They run in the order (a), (c), (b): (b) ends with the primary restarted after a kill.
 *
 * "Converged" means: the primary has no unordered WAL, the secondary's last_remote_wal equals
 * the primary's last_wal, and the live replicated rows (path, version, value_hash) of the two
 * databases are identical; plus a seeded sample of acknowledged writes reads back on the
 * secondary's API with the value written.
 *
 * Restarts keep each cluster's address: every process listens on a fixed port announced as
 * its api_addr (a secondary registers its address with the primary, and the primary's address
 * is in the secondary's replication state).
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import type { TestDatabase } from '../helpers/pg';
import { startCoffer, unseal } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { connectRedis, deletePrefixKeys, diffRows, liveRows, perfStatus, releaseClusters, replicatePair, scanKeys, startCluster, unorderedWal, waitForCatchUp, withSql, type Cluster } from '../helpers/replication';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';

const RUN = randomBytes(4).toString('hex');
const PRI_PREFIX = `coffer-test-routage-pri-${RUN}`;
const SEC_PREFIX = `coffer-test-routage-sec-${RUN}`;
const OUTAGE_MS = Number(process.env.COFFER_OUTAGE_SECONDS ?? 30) * 1000;
const SECONDARY_ID = 'outage-dc2';
const WRITERS = 4;

const rng = seededRng('replication-outage');
const dbs: TestDatabase[] = [];
let redis: Redis | undefined;

// ------------------------------------------------------------------------------- helpers

/** A cluster on a fixed port announced as its api_addr, with its own Redis queue prefix. */
const cluster = (label: string, prefix: string) => startCluster(label, dbs, { prefix, logLevel: 'warn', fixedPort: true });

/** Restarts a cluster's (killed) process on the same database and address, and unseals it. */
async function restart(c: Cluster): Promise<void> {
  c.p = await startCoffer(c.opts);
  expect(c.p.addr).toBe(c.addr);
  await unseal(c.p, c.keys);
}

/** What to look at when convergence does not come: both statuses, WAL, queue keys, old transactions. */
async function diagnostics(): Promise<string> {
  const safe = async (f: () => Promise<unknown>) => f().catch((e: Error) => `unavailable: ${e.message}`);
  return JSON.stringify(
    {
      primary: await safe(() => perfStatus(pri.addr)),
      secondary: await safe(() => perfStatus(sec.addr)),
      primaryUnorderedWal: await safe(() => unorderedWal(pri.db.url)),
      primaryQueueKeys: await safe(() => scanKeys(redis!, `${PRI_PREFIX}:*`)),
      // Long transactions on the server (they hold locks and the vacuum horizon).
      oldestTransactions: await safe(() =>
        withSql(pri.db.url, async (c) => (await c.query(`SELECT datname, state, now() - xact_start AS age, left(query, 80) AS query FROM pg_stat_activity WHERE backend_xid IS NOT NULL OR backend_xmin IS NOT NULL ORDER BY xact_start LIMIT 5`)).rows),
      ),
    },
    null,
    1,
  );
}

/** Writers on one cluster until stopped; records what was acknowledged and what failed. */
class WriteStream {
  readonly acked = new Map<string, Record<string, unknown>>();
  readonly failures: string[] = [];
  private stopped = false;
  private n = 0;
  private readonly loops: Promise<void>[];

  constructor(
    private readonly addr: string,
    private readonly token: string,
    private readonly phase: string,
    writers = WRITERS,
    /** Keys are reused (overwrites) after this many. */
    private readonly keySpace = 1_000_000,
  ) {
    this.loops = Array.from({ length: writers }, () => this.loop());
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      const n = this.n++;
      const path = `secret/data/outage/${this.phase}/${n % this.keySpace}`;
      const value = { n, v: Math.floor(rng.next() * 2 ** 32).toString(36) };
      const r = await vault(this.addr, 'POST', path, { token: this.token, body: { data: value } }).catch((err: Error) => ({ status: -1, body: err.message }));
      if (r.status === 200) this.acked.set(path, value);
      else this.failures.push(`${path}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`);
    }
  }

  get count(): number {
    return this.acked.size + this.failures.length;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
  }
}

/**
 * Waits for convergence and checks it in SQL and through the secondary's API; returns how
 * long the wait took.
 */
async function converge(what: string, acked: Map<string, Record<string, unknown>>, timeoutMs = 45_000): Promise<number> {
  const t0 = Date.now();
  const st = await waitForCatchUp(`${what}: secondary's last_remote_wal to equal the primary's last_wal`, { addr: pri.addr, dbUrl: pri.db.url }, sec.addr, { timeoutMs }).catch(
    async (err: Error) => {
      throw new Error(`${err.message}\n${await diagnostics()}`);
    },
  );
  const ms = Date.now() - t0;
  // eslint-disable-next-line no-console
  console.log(`[replication-outage] ${what}: converged in ${ms} ms (last_wal=${st.p.last_wal})`);
  const [pRows, sRows] = await Promise.all([liveRows(pri.db.url), liveRows(sec.db.url)]);
  expect(diffRows(pRows, sRows)).toEqual({ onlyOnPrimary: 0, onlySecondary: 0, differing: 0, examples: [] });
  // A seeded sample of the acknowledged writes, through the secondary's API.
  const paths = [...acked.keys()];
  const sample = new Set<string>();
  while (sample.size < Math.min(100, paths.length)) sample.add(paths[rng.int(0, paths.length - 1)]);
  const wrong: string[] = [];
  for (const path of sample) {
    const r = await vault(sec.addr, 'GET', path, { token: sec.token });
    if (r.status !== 200 || JSON.stringify(r.body?.data?.data) !== JSON.stringify(acked.get(path))) wrong.push(`${path}: ${r.status} ${JSON.stringify(r.body).slice(0, 200)}`);
  }
  expect(wrong).toEqual([]);
  return ms;
}

// ------------------------------------------------------------------------------- setup

let pri: Cluster;
let sec: Cluster;

beforeAll(async () => {
  redis = await connectRedis();
  pri = await cluster('routage_pri', PRI_PREFIX);
  sec = await cluster('routage_sec', SEC_PREFIX);
  await replicatePair(pri, sec, SECONDARY_ID);
}, 60_000);

afterAll(() => releaseClusters(redis, [PRI_PREFIX, SEC_PREFIX], dbs));

const secondaryOnPrimary = async () => ((await perfStatus(pri.addr)).secondaries as { node_id: string; connection_status: string }[]).find((s) => s.node_id === SECONDARY_ID);

// ------------------------------------------------------------------------------- (a)

test(
  `(a) secondary killed for ${OUTAGE_MS / 1000} s during a write stream: no write fails, the primary sees it disconnected, it catches up after a restart`,
  async () => {
    const stream = new WriteStream(pri.addr, pri.token, 'a');
    try {
      await waitFor('writes to flow and replicate', async () => stream.acked.size >= 100 && (await perfStatus(sec.addr)).last_remote_wal > 0, { timeoutMs: 30_000 });
      expect((await secondaryOnPrimary())?.connection_status).toBe('connected');

      await sec.p.kill('SIGKILL');
      const killedAt = Date.now();
      const ackedAtKill = stream.acked.size;

      const disc = await waitFor('the primary to report the secondary disconnected', async () => ((await secondaryOnPrimary())?.connection_status === 'disconnected' ? Date.now() : null), {
        timeoutMs: Math.max(OUTAGE_MS, 25_000),
        intervalMs: 250,
      });
      // eslint-disable-next-line no-console
      console.log(`[replication-outage] (a) primary reported the secondary disconnected ${disc - killedAt} ms after the kill`);
      // The outage lasts its full length while writes keep being acknowledged.
      await waitFor(`the ${OUTAGE_MS / 1000} s outage to pass with writes flowing`, () => Date.now() - killedAt >= OUTAGE_MS, { timeoutMs: OUTAGE_MS + 5_000, intervalMs: 100 });
      expect(stream.acked.size).toBeGreaterThan(ackedAtKill);
      expect(stream.failures).toEqual([]);

      await restart(sec);
      const restartedAt = Date.now();
      const ackedAtRestart = stream.acked.size;
      await waitFor('more writes after the restart', () => stream.acked.size >= ackedAtRestart + 50, { timeoutMs: 20_000 });
      await stream.stop();
      expect(stream.failures).toEqual([]);
      // eslint-disable-next-line no-console
      console.log(`[replication-outage] (a) ${stream.acked.size} writes acknowledged, ${ackedAtRestart - ackedAtKill} of them during the outage`);

      const ms = await converge('(a) after the secondary restart', stream.acked);
      // eslint-disable-next-line no-console
      console.log(`[replication-outage] (a) caught up ${Date.now() - restartedAt} ms after the secondary was restarted and unsealed (${ms} ms after the stream stopped)`);
      await waitFor('the primary to report the secondary connected again', async () => (await secondaryOnPrimary())?.connection_status === 'connected');
    } finally {
      await stream.stop();
    }
  },
  OUTAGE_MS + 90_000,
);

// ------------------------------------------------------------------------------- (c)

test("(c) the primary's Redis keys deleted mid-stream: nothing is lost, shipping resumes", async () => {
  const stream = new WriteStream(pri.addr, pri.token, 'c');
  let deleted = 0;
  let midShipment = 0;
  try {
    for (let round = 1; round <= 3; round++) {
      const target = round * 150;
      await waitFor(`${target} writes`, () => stream.acked.size >= target, { timeoutMs: 30_000 });
      // Best effort: delete while a shipping job is running (its worker loses the job and lock).
      if (await waitFor('a shipping job to be active', async () => (await redis!.llen(`${PRI_PREFIX}:replication.ship:active`)) > 0, { timeoutMs: 5_000, intervalMs: 1 }).catch(() => false)) midShipment++;
      deleted += await deletePrefixKeys(redis!, PRI_PREFIX);
    }
    // Writes and shipping go on after the last deletion.
    const after = stream.acked.size;
    const applied = (await perfStatus(sec.addr)).last_remote_wal;
    await waitFor('writes after the Redis keys were deleted', () => stream.acked.size >= after + 100, { timeoutMs: 30_000 });
    await waitFor('the secondary to apply more after the deletion', async () => (await perfStatus(sec.addr)).last_remote_wal > applied, { timeoutMs: 30_000 });
    await stream.stop();
    expect(stream.failures).toEqual([]);
    // eslint-disable-next-line no-console
    console.log(`[replication-outage] (c) ${stream.acked.size} writes; ${deleted} Redis keys deleted in 3 rounds (${midShipment} of the rounds while a shipping job was active)`);
    expect(deleted).toBeGreaterThan(0);
    await converge('(c) after the Redis keys were deleted', stream.acked);
  } finally {
    await stream.stop();
  }
}, 90_000);

// ------------------------------------------------------------------------------- (b)

/** What (b1) acknowledged; (b2) checks it reached the secondary. */
let ackedB = new Map<string, Record<string, unknown>>();
let primaryRestartedAt = 0;

test('(b1) primary killed: the secondary serves stale reads and fails forwarded writes fast with a 5xx; the primary restarts', async () => {
  // A key the secondary surely has, then a burst whose tail may not have shipped at the kill.
  const stable = 'secret/data/outage/b/stable';
  expect((await vault(pri.addr, 'POST', stable, { token: pri.token, body: { data: { v: 1 } } })).status).toBe(200);
  await waitFor('the stable key on the secondary', async () => (await vault(sec.addr, 'GET', stable, { token: sec.token })).status === 200);
  const stream = new WriteStream(pri.addr, pri.token, 'b');
  await waitFor('a burst of writes', () => stream.acked.size >= 200, { timeoutMs: 30_000 });
  expect((await vault(pri.addr, 'POST', stable, { token: pri.token, body: { data: { v: 2 } } })).status).toBe(200);
  // Kill the primary while it is shipping a batch, if we can catch it doing so (the hard case:
  // a shipping job dies with the process). Best effort: after 10 s, kill anyway.
  const shipping = await waitFor('a shipping job to be active', async () => (await redis!.llen(`${PRI_PREFIX}:replication.ship:active`)) > 0, { timeoutMs: 10_000, intervalMs: 1 }).catch(
    () => false,
  );
  await pri.p.kill('SIGKILL');
  await stream.stop();
  // eslint-disable-next-line no-console
  console.log(`[replication-outage] (b) primary killed ${shipping ? 'while a shipping job was active' : '(no shipping job seen active)'} after ${stream.acked.size} writes`);
  // Writes in flight at the kill failed (never acknowledged); what was acknowledged must survive.
  ackedB = new Map(stream.acked);
  ackedB.set(stable, { v: 2 });

  // Reads are served locally: 200 with the last value applied (v1 or v2).
  for (let i = 0; i < 5; i++) {
    const r = await vault(sec.addr, 'GET', stable, { token: sec.token });
    expect(r.status).toBe(200);
    expect([{ v: 1 }, { v: 2 }]).toContainEqual(r.body.data.data);
  }
  // A forwarded write fails, fast and clearly.
  const t0 = Date.now();
  const w = await vault(sec.addr, 'POST', 'secret/data/outage/b/forwarded', { token: sec.token, body: { data: { x: 1 } } });
  const took = Date.now() - t0;
  // eslint-disable-next-line no-console
  console.log(`[replication-outage] (b) forwarded write with the primary down: ${w.status} ${JSON.stringify(w.body)} after ${took} ms`);
  expect([502, 503]).toContain(w.status);
  expect(Array.isArray(w.body.errors) && w.body.errors.length > 0 && w.body.errors.every((e: unknown) => typeof e === 'string' && e.length > 0)).toBe(true);
  expect(took).toBeLessThan(31_000);
  // The secondary notices: its status shows the primary disconnected.
  await waitFor('the secondary to report the primary disconnected', async () => (await perfStatus(sec.addr)).primaries[0].connection_status === 'disconnected', { timeoutMs: 15_000 });
  // Still serving reads.
  expect((await vault(sec.addr, 'GET', stable, { token: sec.token })).status).toBe(200);

  await restart(pri);
  primaryRestartedAt = Date.now();
  // Forwarded writes work again, and more writes land on the primary.
  const again = await waitFor('a forwarded write to succeed', async () => {
    const r = await vault(sec.addr, 'POST', 'secret/data/outage/b/forwarded', { token: sec.token, body: { data: { x: 2 } } });
    return r.status === 200 ? r : null;
  });
  expect(again.status).toBe(200);
  // eslint-disable-next-line no-console
  console.log(`[replication-outage] (b) first forwarded write after the restart: warnings ${JSON.stringify(again.body.warnings)}`);
  ackedB.set('secret/data/outage/b/forwarded', { x: 2 });
  for (let i = 0; i < 20; i++) {
    const path = `secret/data/outage/b/after/${i}`;
    expect((await vault(pri.addr, 'POST', path, { token: pri.token, body: { data: { i } } })).status).toBe(200);
    ackedB.set(path, { i });
  }
  await waitFor('the secondary to report the primary connected again', async () => (await perfStatus(sec.addr)).primaries[0].connection_status === 'connected');
}, 60_000);

test('(b2) after the primary restarts, the secondary catches up by itself within 20 s', async () => {
  expect(primaryRestartedAt).toBeGreaterThan(0);
  // The primary's ticks run every 100 ms and the secondary heartbeats as often: 20 s is ample.
  const ms = await converge('(b) after the primary restart', ackedB, 20_000);
  // eslint-disable-next-line no-console
  console.log(`[replication-outage] (b) caught up ${Date.now() - primaryRestartedAt} ms after the primary was restarted and unsealed (${ms} ms of waiting)`);
}, 40_000);

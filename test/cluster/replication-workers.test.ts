/**
 * Performance replication shipped by several `coffer worker` processes at once (DESIGN.md
 * invariants 3 and 6): one primary (static seal, Redis queue) with one server process plus
 * 2 workers (phase A), then 4 workers (phase B); three secondaries, each its own database,
 * process and Redis prefix, all set up through the API.
 *
 * Every process of the primary consumes 'replication.ship' jobs, so batches for one secondary
 * are shipped by whichever process got the job; the per-secondary advisory lock keeps one batch
 * in flight. The test checks, after each phase of a few thousand concurrent KV v2 writes (hot
 * and cold keys, some soft deletes):
 *  - convergence: each secondary's last_remote_wal = the primary's last_wal, its applied_lsn =
 *    the primary's head, the primary's cursor for it = head, and coffer_entries identical in SQL
 *    (path, version, value_hash);
 *  - no double apply: on each secondary, every (path, key_version) has at most one WAL row, and
 *    each of its WAL rows is one the primary has (same op and value hash);
 *  - exactly once, in order, no gaps, observed directly: each secondary's api_addr points at a
 *    small recording proxy in this process, so every /apply the primary sent and what the
 *    secondary answered is seen. The accepted batches must tile (bootstrap LSN, head] with no
 *    overlap and no hole, be accepted in ascending order, and never be two in flight at once
 *    to one secondary. The proxy also tells which process sent each batch (by the peer socket's
 *    owner in /proc), so the test can show that worker processes really shipped.
 *
 * Redis keys live under prefixes unique to this file and are deleted at the end.
 */
import { randomBytes } from 'node:crypto';
import { startCofferWorker, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import {
  ApplyRecorder,
  entriesOf,
  expectCursorsAt,
  expectNoDoubleApply,
  expectWalDense,
  perfStatus,
  releaseProxied,
  startProxiedSecondary,
  startPrimaryAndSecondaries,
  tracked,
  waitAllConverged,
  walRows,
  type EnabledSecondary,
  type ProxiedSecondary,
  type StaticSealPrimary,
} from '../helpers/replication';
import { seededRng } from '../helpers/rng';

const TAG = randomBytes(4).toString('hex');
const PREFIX_ROOT = `coffer-test-rworkers-${TAG}`;
const SECONDARIES = ['dc2', 'dc3', 'dc4'];
const WRITES_PER_PHASE = 3000;
const WRITERS = 16;
const HOT_KEYS = Array.from({ length: 12 }, (_, i) => `hot/${i}`);

// ------------------------------------------------------------------ state and cleanup

type Secondary = EnabledSecondary<ProxiedSecondary>;

const t = tracked();

let primary: StaticSealPrimary;
const workers: CofferProcess[] = [];
const secs: Secondary[] = [];
const primaryPids = () => [primary?.server, ...workers].filter((p): p is CofferProcess => p !== undefined).map((p) => p.pid);

afterAll(async () => {
  await releaseProxied(t, PREFIX_ROOT);
}, 60_000);

// ------------------------------------------------------------------ helpers

async function startWorkers(n: number): Promise<void> {
  const started = await Promise.all(Array.from({ length: n }, () => startCofferWorker(primary.opts)));
  workers.push(...started);
}

/** Writes `n` KV v2 operations with WRITERS concurrent clients; returns the failures. */
async function writeLoad(phase: string, n: number): Promise<string[]> {
  const rng = seededRng(`replication-workers ${phase}`);
  // The plan is drawn from the seed; the interleaving is not.
  const plan = Array.from({ length: n }, (_, i) => {
    const r = rng.next();
    const pad = 'x'.repeat(rng.int(0, 300));
    if (r < 0.4) return { op: 'put' as const, path: HOT_KEYS[rng.int(0, HOT_KEYS.length - 1)], data: { phase, i, pad } };
    if (r < 0.45) return { op: 'delete' as const, path: HOT_KEYS[rng.int(0, HOT_KEYS.length - 1)], data: null };
    return { op: 'put' as const, path: `cold/${phase}/${rng.int(0, Math.floor(n * 0.7))}`, data: { phase, i, pad } };
  });
  const failures: string[] = [];
  let next = 0;
  const writer = async () => {
    for (let i = next++; i < n; i = next++) {
      const w = plan[i];
      try {
        const r =
          w.op === 'put'
            ? await vault(primary.server.addr, 'POST', `secret/data/${w.path}`, { token: primary.root, body: { data: w.data } })
            : await vault(primary.server.addr, 'DELETE', `secret/data/${w.path}`, { token: primary.root });
        if (r.status !== 200 && r.status !== 204) failures.push(`${w.op} ${w.path}: ${r.status} ${JSON.stringify(r.body)}`);
      } catch (err) {
        failures.push(`${w.op} ${w.path}: ${(err as Error).message}`);
      }
    }
  };
  await Promise.all(Array.from({ length: WRITERS }, writer));
  return failures;
}

/** Every secondary caught up with the primary's head, by the API and in SQL, both sides. */
const waitConverged = (what: string) => waitAllConverged(what, primary.server.addr, primary.sql, secs.map((s) => s.direct), 90_000);

/** Accepted batches of one secondary must tile (bootstrap, head] exactly once, in order. */
function tilingViolations(s: Secondary, h: number): string[] {
  const out: string[] = [];
  const accepted = s.proxy.records.filter((r) => r.applied === true);
  if (accepted.length === 0) return [`${s.id}: no batch was ever accepted`];
  const bootstrap = accepted[0].from - 1;
  if (bootstrap < s.headBefore || bootstrap > s.headAfter) out.push(`${s.id}: first accepted batch starts at ${accepted[0].from}, bootstrap LSN outside [${s.headBefore}, ${s.headAfter}]`);
  let expectFrom = bootstrap + 1;
  for (const r of accepted) {
    if (r.from !== expectFrom) out.push(`${s.id}: accepted batch ${r.from}..${r.to} but the next position was ${expectFrom} (${r.from < expectFrom ? 'applied twice' : 'gap'})`);
    if (r.appliedLsn !== r.to) out.push(`${s.id}: batch ${r.from}..${r.to} accepted with applied_lsn ${r.appliedLsn}`);
    expectFrom = r.to + 1;
  }
  if (expectFrom - 1 !== h) out.push(`${s.id}: accepted batches end at ${expectFrom - 1}, head is ${h}`);
  // Every rejection is a refusal that changed nothing: it names where the secondary already is.
  for (const r of s.proxy.records.filter((x) => x.applied === false)) {
    if (r.appliedLsn === null || (r.reason?.startsWith('batch starts') && r.appliedLsn === r.from - 1)) {
      out.push(`${s.id}: batch ${r.from}..${r.to} refused (${r.reason}) with applied_lsn ${r.appliedLsn}`);
    }
  }
  return out.slice(0, 30);
}

async function checkExactlyOnce(phase: string, h: number, phaseStart: number[]): Promise<void> {
  // The primary's WAL is dense up to the head (what the secondaries must cover).
  await expectWalDense(primary.sql, h);
  const priEntries = await entriesOf(primary.sql);
  const priWal = new Set(await walRows(primary.sql));
  const pidRole = new Map<number, string>([[primary.server.pid, 'server'], ...workers.map((w, i) => [w.pid, `worker${i + 1}`] as [number, string])]);
  const shippedBy: Record<string, number> = {};
  for (const [i, s] of secs.entries()) {
    // Live rows identical to the primary's.
    const mine = await entriesOf(s.sql);
    expect(mine.length).toBe(priEntries.length);
    expect(mine).toEqual(priEntries);
    // (1) At most one WAL row per (path, key_version) on the secondary, each one the primary has.
    await expectNoDoubleApply(s.sql, priWal);
    // (2) applied_lsn = head; the primary's cursor = head.
    await expectCursorsAt(primary.sql, s.sql, s.id, h);
    // Exactly once, in order, contiguous, one in flight — as seen on the wire.
    expect(tilingViolations(s, h)).toEqual([]);
    expect(s.proxy.maxInFlight).toBe(1);
    for (const r of s.proxy.records.slice(phaseStart[i])) {
      if (r.applied !== true) continue;
      const role = r.pid === null ? 'unknown' : pidRole.get(r.pid) ?? `pid ${r.pid}`;
      shippedBy[role] = (shippedBy[role] ?? 0) + 1;
    }
    const recs = s.proxy.records.slice(phaseStart[i]);
    // eslint-disable-next-line no-console
    console.log(
      `[${phase}] ${s.id}: ${recs.filter((r) => r.applied === true).length} batches accepted, ${recs.filter((r) => r.applied === false).length} refused ` +
        `(${[...new Set(recs.filter((r) => r.applied === false).map((r) => r.reason))].join('; ')}), ${recs.filter((r) => r.applied === null).length} other, max in flight ${s.proxy.maxInFlight}`,
    );
  }
  // eslint-disable-next-line no-console
  console.log(`[${phase}] head ${h}; accepted batches by shipping process: ${JSON.stringify(shippedBy)}`);
  // The worker processes took part (they auto-unsealed with the static seal and consumed jobs).
  const byWorkers = Object.entries(shippedBy).filter(([k]) => k.startsWith('worker')).reduce((a, [, n]) => a + n, 0);
  expect(byWorkers).toBeGreaterThan(0);
}

// ------------------------------------------------------------------ setup

/** A secondary-to-be: database, recording proxy, process (api_addr = the proxy), initialised. */
const prepareSecondary = (id: string) =>
  startProxiedSecondary(
    id,
    { dbLabel: `rw_${id}`, prefix: `${PREFIX_ROOT}-${id}`, proxy: new ApplyRecorder({ pids: primaryPids, keepAliveTimeoutMs: 60_000 }), listeningWhat: `${id} listening directly` },
    t,
  );

beforeAll(async () => {
  // Primary: static seal (workers auto-unseal), Redis queue, one server process. Three
  // secondaries, each its own database, process, Redis prefix and recording proxy, started while
  // the primary is set up; each enabled with its own activation token.
  const onPrimary = (pri: StaticSealPrimary) => {
    primary = pri;
    expect(pri.recoveryKeys).toHaveLength(1);
  };
  await startPrimaryAndSecondaries(t, { ids: SECONDARIES, prepare: prepareSecondary, primaryLabel: 'rw_primary', primaryPrefix: `${PREFIX_ROOT}-pri`, onPrimary }, secs);
  const st = await perfStatus(primary.server.addr);
  expect([...st.known_secondaries].sort()).toEqual(SECONDARIES);
}, 90_000);

// ------------------------------------------------------------------ phases

test.each([
  ['phase A', 2],
  ['phase B', 4],
])('%s: %i worker processes ship a few thousand concurrent writes to 3 secondaries exactly once, in order', async (phase, nWorkers) => {
  await startWorkers(nWorkers - workers.length);
  expect(workers.length).toBe(nWorkers);
  const phaseStart = secs.map((s) => s.proxy.records.length);
  const t0 = Date.now();
  expect(await writeLoad(phase.replace(' ', '-'), WRITES_PER_PHASE)).toEqual([]);
  const tWrites = Date.now();
  const h = await waitConverged(`${phase}: all three secondaries to converge`);
  // eslint-disable-next-line no-console
  console.log(`[${phase}] ${WRITES_PER_PHASE} writes in ${tWrites - t0} ms; converged ${Date.now() - tWrites} ms later at head ${h}`);
  await checkExactlyOnce(phase, h, phaseStart);
  // Every worker is still alive (nothing crashed while shipping).
  for (const w of workers) expect([w.proc.exitCode, w.proc.signalCode]).toEqual([null, null]);
}, 300_000); // a bound for a loaded CI machine, not a speed check

/**
 * Fault scenarios (issue #6; ../shared/reference/operations-and-reliability.md B6), short
 * versions: each scenario runs seconds of load under one fault, then the history checker
 * (test/harness/history.ts) verifies on the primary and on the secondary that no acknowledged
 * write was lost and no value appeared that was never written, after convergence.
 *
 * One topology for the file (setting it up is the expensive part):
 *   primary  P: 2 servers + 1 worker, Postgres reached through a fault proxy (outages),
 *               WAL bound of 100 rows (replication { logshipper_buffer_length = 100 }) with fast
 *               merkle checkpoints so the bound is reached quickly;
 *   secondary S: 1 server; its api_addr is a fault proxy (the primary's pushes) and its
 *               primary_api_addr another one in front of both primary servers (heartbeats,
 *               forwarded writes, merkle-diff/-sync).
 * Clients talk to the processes directly. Static seals: every process restarts unattended.
 *
 * COFFER_SOAK=1 (npm run test:soak) runs the same scenarios ten times longer
 * (COFFER_SOAK_FACTOR=n: n times longer instead).
 * COFFER_SEED replays the fault schedule (timing still varies between runs).
 */
import { vault } from '../helpers/http';
import { one, perfStatus, waitAllConverged } from '../helpers/replication';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';
import { FaultHarness, type FaultCluster, type Node } from '../harness/cluster';
import type { CapturedRequest, ReplayResponse } from '../harness/fault-proxy';
import { History, PositionMonitor, printTable, report } from '../harness/history';
import { StateRecorder } from './merkle-support';

const SOAK = process.env.COFFER_SOAK === '1';
/** Scenario durations: short by default, ten times longer for the soak run (COFFER_SOAK_FACTOR overrides the 10). */
const SOAK_FACTOR = Number(process.env.COFFER_SOAK_FACTOR ?? 10);
const D = (ms: number) => (SOAK ? ms * SOAK_FACTOR : ms);
const T = (ms: number) => (SOAK ? ms * SOAK_FACTOR + 60_000 : ms);
const MOUNT = 'kv';
const WAL_ROWS = 100;

const rng = seededRng('faults');
const h = new FaultHarness('faults', rng);
let P: FaultCluster;
let S: FaultCluster;

const until = (ms: number) => {
  const end = Date.now() + ms;
  return () => Date.now() < end;
};
const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  const merkleFast = `merkle {\n  checkpoint_interval = "200ms"\n  flush_interval = "50ms"\n  flush_fraction = 0.5\n}\n`;
  [P, S] = await Promise.all([
    h.cluster('p', { servers: 2, workers: 1, pgProxy: true, extraHcl: `replication {\n  logshipper_buffer_length = ${WAL_ROWS}\n}\n` + merkleFast }),
    h.cluster('s', { servers: 1, proxiedApi: true, extraHcl: merkleFast }),
  ]);
  const m = await vault(P.addr, 'POST', `sys/mounts/${MOUNT}`, { token: P.root, body: { type: 'kv', options: { version: '1' } } });
  expect(m.status).toBe(204);
  await h.replicate(P, S);
}, 90_000);

/** Every process of both clusters running before a scenario (one that died is restarted, and said). */
beforeEach(async () => {
  if (!P || !S) return;
  for (const n of [...P.nodes, ...S.nodes]) {
    if (n.proc && !alive(n)) {
      // eslint-disable-next-line no-console
      console.log(`[faults] ${n.name} had died (${n.proc.proc.exitCode}, ${n.proc.proc.signalCode}):\n${n.proc.output().slice(-1500)}`);
      await n.cluster.kill(n);
    }
    if (!n.proc) await n.cluster.start(n);
  }
}, 60_000);

/**
 * Load generators and monitors a test started: stopped after it whatever happened, so a test
 * that failed midway never leaves writers running into the next scenario's checks.
 */
const started = new Set<{ stop(): Promise<unknown> }>();
function tracked<T extends { stop(): Promise<unknown> }>(x: T): T {
  started.add(x);
  return x;
}

afterEach(async () => {
  const all = [...started];
  started.clear();
  await Promise.all(all.map((x) => x.stop().catch(() => undefined)));
}, 60_000);

afterAll(async () => {
  printTable();
  await h.cleanup();
}, 60_000);

// ------------------------------------------------------------------ shared checks

const alive = (n: Node) => n.proc !== null && n.proc.proc.exitCode === null && n.proc.proc.signalCode === null;

const tokenFor = (addr: string) => (S.liveAddrs().includes(addr) ? S.root : P.root);

function load(scenario: string, o: { writers?: number; onSecondary?: number; pauseMs?: number; keys?: number } = {}): History {
  const hist = tracked(new History(scenario));
  hist.start({ mount: MOUNT, targets: () => P.liveAddrs(), token: tokenFor, writers: o.writers ?? 4, keysPerWriter: o.keys ?? 50, pauseMs: o.pauseMs });
  if (o.onSecondary) hist.start({ mount: MOUNT, targets: () => S.liveAddrs(), token: tokenFor, writers: o.onSecondary, keysPerWriter: o.keys ?? 50, pauseMs: o.pauseMs });
  return hist;
}

/** What to look at when something does not converge. */
async function diagnostics(): Promise<string> {
  const safe = async (f: () => Promise<unknown>) => f().catch((e: Error) => `unavailable: ${e.message}`);
  return JSON.stringify(
    {
      primary: await safe(() => perfStatus(P.addr)),
      secondary: await safe(() => perfStatus(S.addr)),
      secondaryRow: await safe(async () => (await P.sql.query('SELECT status, acked_lsn, api_addr, last_error FROM coffer_secondaries')).rows),
      proxies: h.proxies.map((p) => ({ name: p.name, state: p.state, ...p.counters })),
    },
    null,
    1,
  );
}

/** Waits for S to reach P's head (both sides, API and SQL); returns ms. */
async function converge(what: string, timeoutMs = 45_000): Promise<number> {
  const t0 = Date.now();
  await waitAllConverged(what, P.addr, P.sql, [S.addr], timeoutMs).catch(async (err: Error) => {
    throw new Error(`${err.message}\n${await diagnostics()}`);
  });
  return Date.now() - t0;
}

/** The primary's retained WAL is dense and ends at the head; nothing unordered is left. */
async function expectWalDense(): Promise<void> {
  const r = await one(P.sql, `SELECT count(*)::int AS n, min(lsn)::bigint AS lo, max(lsn)::bigint AS hi, (SELECT last_lsn FROM coffer_wal_head WHERE id = 1)::bigint AS head FROM coffer_wal WHERE lsn IS NOT NULL`);
  expect({ gaps: Number(r.hi) - Number(r.lo) + 1 - Number(r.n), endsAtHead: Number(r.hi) === Number(r.head) }).toEqual({ gaps: 0, endsAtHead: true });
}

/** No (path, key_version) applied twice on the secondary. */
async function expectNoDoubleApply(): Promise<void> {
  expect((await S.sql.query('SELECT path, key_version::bigint AS v, count(*)::int AS n FROM coffer_wal GROUP BY 1, 2 HAVING count(*) > 1 LIMIT 10')).rows).toEqual([]);
}

/** Converges, verifies the history on both clusters, checks WAL and apply invariants, reports a row. */
async function finish(hist: History, notes: string[], o: { convergeFrom?: number } = {}): Promise<void> {
  await hist.stop();
  const ms = await converge(`${hist.scenario}: secondary converged`);
  const convergenceMs = o.convergeFrom ? Date.now() - o.convergeFrom : ms;
  const onP = await hist.verify('primary', P.addr, P.root, MOUNT);
  const onS = await hist.verify('secondary', S.addr, S.root, MOUNT);
  await expectWalDense();
  await expectNoDoubleApply();
  const statuses = [...hist.answers.entries()].map(([k, v]) => `${k}×${v}`).join(' ');
  const odd = new Map<string, number>();
  for (const a of hist.attempts) if (a.status >= 300 && a.status !== 503) odd.set(`${a.status} ${a.detail}`, (odd.get(`${a.status} ${a.detail}`) ?? 0) + 1);
  // eslint-disable-next-line no-console
  if (odd.size) console.log(`[faults] ${hist.scenario}: non-2xx answers: ${[...odd.entries()].map(([k, v]) => `${v}× ${k}`).join('\n  ')}`);
  report({
    scenario: hist.scenario,
    attempts: hist.attempts.length,
    acked: hist.acked,
    lost: onP.lost.length + onS.lost.length,
    phantom: onP.phantom.length + onS.phantom.length,
    convergenceMs,
    notes: [statuses, ...notes].join('; '),
  });
  expect({ lost: [...onP.lost, ...onS.lost].slice(0, 10), phantom: [...onP.phantom, ...onS.phantom].slice(0, 10), indexOrder: onP.indexOrder.slice(0, 10) }).toEqual({
    lost: [],
    phantom: [],
    indexOrder: [],
  });
  expect(hist.acked).toBeGreaterThan(0);
}


// ------------------------------------------------------------------ scenarios

test(
  'kill -9 of API and worker processes under load: 0 acknowledged writes lost',
  async () => {
    const hist = load('kill9', { writers: 6, onSecondary: 1 });
    const mon = tracked(new PositionMonitor('secondary', () => S.liveAddrs()));
    const kills: string[] = [];
    await waitFor('writes flowing', () => hist.acked >= 50, { timeoutMs: 20_000 });
    // At least 3 kills, however slow the machine; more while the window lasts.
    for (const going = until(D(12_000)); going() || kills.length < 3; ) {
      const victims = [...P.servers, ...P.workers];
      const v = victims[rng.int(0, victims.length - 1)];
      const before = hist.acked;
      await P.restart(v, 'SIGKILL');
      kills.push(v.name);
      // Writes keep being acknowledged between kills.
      await waitFor('writes after a restart', () => hist.acked >= before + 20, { timeoutMs: 20_000 });
    }
    const decreases = await mon.stop();
    await finish(hist, [`killed ${kills.length}: ${kills.join(',')}`]);
    expect(decreases).toEqual([]);
    expect(kills.length).toBeGreaterThanOrEqual(3);
  },
  T(100_000),
);

test(
  "Postgres outage on the primary: 503 (never 500) while down, 2xx again after, no WAL gaps",
  async () => {
    const hist = load('pg-outage', { writers: 4 });
    await waitFor('writes flowing', () => hist.acked >= 50, { timeoutMs: 20_000 });
    const down = Date.now();
    let during: typeof hist.attempts = [];
    try {
      await P.pgDown();
      await waitFor('a 503 while Postgres is down', () => hist.count((a) => a.at > down && a.status === 503) > 0, { timeoutMs: 15_000 });
      await pause(D(3_000)); // the outage lasts; writers keep trying
      during = hist.attempts.filter((a) => a.at > down + 500);
    } finally {
      await P.pgUp();
    }
    const up = Date.now();
    const firstOk = await waitFor('a 2xx after Postgres is back', () => hist.attempts.find((a) => a.at > up && a.acked)?.at, { timeoutMs: 20_000 });
    await waitFor('more writes', () => hist.ackedSince(up) >= 50, { timeoutMs: 20_000 });
    const processes = [...P.servers, ...P.workers].map((n) => `${n.name}:${alive(n) ? 'up' : 'exited'}`);
    await finish(hist, [`back to 2xx ${firstOk - up} ms after Postgres`, processes.join(',')]);
    const bad = hist.attempts.filter((a) => a.status >= 500 && a.status !== 503);
    // eslint-disable-next-line no-console
    if (bad.length) console.log(`[faults] pg-outage: server logs:\n${P.servers.map((n) => n.proc?.output().split('\n').filter((l) => /error|level":50/i.test(l)).slice(-10).join('\n')).join('\n---\n')}`);
    expect(bad.map((a) => `${a.status} at +${a.at - down} ms`).slice(0, 10)).toEqual([]);
    expect(during.filter((a) => a.acked).length).toBe(0);
    expect(firstOk - up).toBeLessThan(10_000);
    // No process died of the outage.
    expect(processes.filter((p) => p.endsWith('exited'))).toEqual([]);
  },
  T(90_000),
);

async function partitionScenario(name: string, long: boolean): Promise<void> {
  // "Short" means within WAL retention (WAL_ROWS rows on P), however long the soak makes the
  // partition: its writers are paced to about a quarter of the bound over the partition.
  const shortPause = Math.max(100, Math.ceil((D(3_000) * 2) / (WAL_ROWS / 4)));
  const hist = load(name, long ? { writers: 6 } : { writers: 2, pauseMs: shortPause });
  const states = tracked(new StateRecorder(async () => (await perfStatus(S.addr)).state, 20));
  await waitFor('writes flowing', () => hist.acked >= (long ? 20 : 4), { timeoutMs: 20_000 });
  const appliedBefore = Number((await one(S.sql, 'SELECT applied_lsn::bigint AS a FROM coffer_replication WHERE id = 1')).a);
  await h.partition(S);
  const cut = Date.now();
  try {
  // During the partition: reads on S are served (200), a forwarded write fails with a 5xx and errors[].
  const read = await vault(S.addr, 'GET', `${MOUNT}/${name}/w0/k0`, { token: S.root });
  expect([200, 404]).toContain(read.status);
  const fwd = await vault(S.addr, 'POST', `${MOUNT}/${name}/forwarded`, { token: S.root, body: { v: 'x' } });
  expect(fwd.status).toBeGreaterThanOrEqual(500);
  expect(Array.isArray(fwd.body?.errors) && fwd.body.errors.length > 0).toBe(true);
  if (long) {
    // Beyond retention: the primary's oldest retained WAL row is past what S would need next.
    await waitFor(
      'the primary to collect WAL the secondary still needs',
      async () => Number((await one(P.sql, 'SELECT min(lsn)::bigint AS lo FROM coffer_wal WHERE lsn IS NOT NULL')).lo) > appliedBefore + 1 && hist.ackedSince(cut) > WAL_ROWS * 2,
      { timeoutMs: 30_000, intervalMs: 100 },
    );
  } else {
    await pause(D(3_000));
  }
  } finally {
    await h.heal(S);
  }
  const ackedDuring = hist.ackedSince(cut);
  const healed = Date.now();
  const seen = await (async () => {
    await hist.stop();
    await converge(`${name}: converged after heal`);
    return states.stop();
  })();
  await finish(hist, [`${ackedDuring} acked during the partition`, `states ${seen.join('>')}`], { convergeFrom: healed });
  if (long) expect(seen).toContain('merkle-diff');
  else expect(seen).not.toContain('merkle-diff');
  expect(seen[seen.length - 1]).toBe('stream-wals');
}

test('partition then heal, short: the secondary streams the missed WAL', () => partitionScenario('partition-short', false), T(60_000));

test(`partition beyond WAL retention (${WAL_ROWS} rows), then heal: reconciles by merkle diff`, () => partitionScenario('partition-long', true), T(90_000));

test(
  'flaky link (latency ± jitter, throttle, random resets): no loss, converges after',
  async () => {
    for (const p of h.links(S)) p.setToxics('both', { latencyMs: 40, jitterMs: 30, bandwidthBps: 128 * 1024, resetProbability: 0.02 });
    const hist = load('flaky', { writers: 4, onSecondary: 1 });
    const mon = tracked(new PositionMonitor('secondary', () => S.liveAddrs()));
    await pause(D(8_000));
    const resets = h.links(S).reduce((n, p) => n + p.counters.resets, 0);
    for (const p of h.links(S)) p.clearToxics();
    const healed = Date.now();
    const decreases = await mon.stop();
    await finish(hist, [`${resets} resets by the proxies`], { convergeFrom: healed });
    expect(decreases).toEqual([]);
  },
  T(60_000),
);

test(
  'mid-stream cuts of the primary pushes: no partial batch, last_remote_wal never decreases',
  async () => {
    // Every connection to S carrying /apply is reset after a random number of request bytes:
    // half of them within the first batch or two, the others after up to 30 KB (a connection
    // never cut would carry every push from then on over keep-alive; 8 s of this load push
    // about 130 KB).
    for (const n of S.servers) n.proxy!.setToxics('upstream', { limitBytes: () => (rng.next() < 0.5 ? rng.int(50, 6000) : rng.int(6000, 30_000)) });
    // A limit is drawn when a connection opens: the primary's keep-alive connections from
    // before must go, or a run where this scenario comes first sees no cut at all. Counted
    // from here on (the counters are cumulative across scenarios).
    for (const n of S.servers) n.proxy!.resetAll();
    const resetCount = () => S.servers.reduce((n, s) => n + s.proxy!.counters.resets, 0);
    const resetsBefore = resetCount();
    const hist = load('mid-stream-cut', { writers: 4 });
    const mon = tracked(new PositionMonitor('secondary', () => S.liveAddrs(), 50));
    await pause(D(8_000));
    const resets = resetCount() - resetsBefore;
    for (const n of S.servers) n.proxy!.clearToxics();
    const healed = Date.now();
    const decreases = await mon.stop();
    await finish(hist, [`${resets} cuts mid-request`, `${mon.samples} position samples`], { convergeFrom: healed });
    expect(decreases).toEqual([]);
    expect(resets).toBeGreaterThan(0);
  },
  T(60_000),
);

test(
  'scaling worker processes 1 → 4 → 1 mid-load',
  async () => {
    const hist = load('scale-workers', { writers: 4 });
    await waitFor('writes flowing', () => hist.acked >= 50, { timeoutMs: 20_000 });
    for (let i = 0; i < 3; i++) await P.addWorker();
    expect(P.workers.filter(alive).length).toBe(4);
    await pause(D(3_000));
    for (let i = 0; i < 3; i++) await P.removeWorker('SIGTERM');
    expect(P.workers.filter(alive).length).toBe(1);
    await pause(D(2_000));
    await finish(hist, ['workers 1→4→1']);
  },
  T(60_000),
);

test(
  'Redis loss (every key of both clusters deleted, 3 times) mid-load',
  async () => {
    const hist = load('redis-loss', { writers: 4, onSecondary: 1 });
    let deleted = 0;
    for (let i = 0; i < 3; i++) {
      const before = hist.acked;
      await waitFor('writes', () => hist.acked >= before + 50, { timeoutMs: 20_000 });
      deleted += (await P.redisLoss()) + (await S.redisLoss());
    }
    const lost = Date.now();
    const applied = (await perfStatus(S.addr)).last_remote_wal;
    await waitFor('shipping to resume', async () => (await perfStatus(S.addr)).last_remote_wal > applied, { timeoutMs: 15_000 });
    await finish(hist, [`${deleted} keys deleted`], { convergeFrom: lost });
  },
  T(60_000),
);

test(
  'graceful shutdown: SIGTERM to a primary server under load; no reset connections, no 5xx',
  async () => {
    const victim = P.servers[1];
    // Writers pinned to the victim (keep-alive connections), and others on the other server.
    const hist = tracked(new History('sigterm'));
    hist.start({ mount: MOUNT, targets: () => (alive(victim) ? [victim.direct] : P.liveAddrs()), token: () => P.root, writers: 6, keysPerWriter: 50 });
    hist.start({ mount: MOUNT, targets: () => [P.servers[0].direct], token: () => P.root, writers: 2, keysPerWriter: 50 });
    await waitFor('writes flowing to the victim', () => hist.count((a) => a.addr === victim.direct && a.acked) >= 100, { timeoutMs: 20_000 });
    const t0 = Date.now();
    const code = await P.kill(victim, 'SIGTERM');
    const exitMs = Date.now() - t0;
    await waitFor('writes after the shutdown', () => hist.ackedSince(Date.now() - 1) >= 0 && hist.ackedSince(t0 + exitMs) >= 50, { timeoutMs: 20_000 });
    // Refused connections after the listener closed are expected (the process is going away);
    // resets of requests in flight, or 5xx, are not.
    const onVictim = hist.attempts.filter((a) => a.addr === victim.direct && a.at >= t0);
    const refused = onVictim.filter((a) => a.error === 'ECONNREFUSED').length;
    const broken = onVictim.filter((a) => (a.error !== null && a.error !== 'ECONNREFUSED') || a.status >= 500).map((a) => `${a.error ?? a.status} at +${a.at - t0} ms`);
    await P.start(victim);
    await finish(hist, [`exit code ${code} after ${exitMs} ms`, `${refused} refused after close`, `${broken.length} broken`]);
    expect(broken.slice(0, 10)).toEqual([]);
    expect(code).toBe(0);
    expect(exitMs).toBeLessThan(10_000);
  },
  T(60_000),
);

// ------------------------------------------------------------------ replay and half-open (issue #6)

const APPLY_PATH = '/v1/sys/replication/performance/internal/apply';

/**
 * What the secondary holds: applied position, replicated rows (hash), its own WAL's head. Not
 * the number of its WAL rows: its housekeeping collects them beyond its retention bound, which
 * a long (soak) run reaches.
 */
async function secondarySnapshot() {
  return one(
    S.sql,
    `SELECT (SELECT applied_lsn::bigint FROM coffer_replication WHERE id = 1)::text AS applied,
            (SELECT count(*)::int FROM coffer_entries) AS entries,
            (SELECT md5(coalesce(string_agg(e::text, '|' ORDER BY e::text), '')) FROM coffer_entries e) AS entries_md5,
            (SELECT max(lsn)::text FROM coffer_wal) AS wal_max`,
  );
}

const appliedLsnOfS = async () => Number((await one(S.sql, 'SELECT applied_lsn::bigint AS a FROM coffer_replication WHERE id = 1')).a);

test(
  'replayed and reordered /apply batches (duplicates, older after newer): every replay refused, nothing changes',
  async () => {
    const down = S.servers[0].proxy!;
    down.capture(APPLY_PATH);
    const hist = load('replay', { writers: 4 });
    const mon = tracked(new PositionMonitor('secondary', () => S.liveAddrs(), 50));
    const bounds = (c: CapturedRequest) => JSON.parse(c.body.toString()) as { from_lsn: number; to_lsn: number };
    const bad: string[] = [];
    const check = (rs: { req: CapturedRequest; res: ReplayResponse }[]) => {
      for (const { req, res } of rs) {
        const b = bounds(req);
        if (res.status !== 200 || res.json?.applied !== false || !/^batch starts at/.test(res.json?.reason ?? '')) bad.push(`${b.from_lsn}..${b.to_lsn} → ${res.status} ${res.body.slice(0, 160)}`);
      }
    };
    let replayedUnderLoad = 0;
    try {
      await waitFor('pushes captured', () => down.captured.length >= 8, { timeoutMs: 20_000 });
      // Under load: batches already applied come back (the newest twice, older ones shuffled in)
      // while the primary keeps pushing new ones on its own connections.
      for (const going = until(D(4_000)); going(); ) {
        const applied = await appliedLsnOfS();
        const done = down.captured.filter((c) => bounds(c).to_lsn <= applied);
        if (done.length < 2) {
          await waitFor('a push applied', async () => (await appliedLsnOfS()) > applied, { timeoutMs: 15_000, intervalMs: 20 });
          continue;
        }
        const newest = done.slice(-2);
        const older = Array.from({ length: 3 }, () => done[rng.int(0, done.length - 1)]);
        const rs = [...(await down.replayAll(newest, { times: 2 })), ...(await down.replayAll([...older, ...newest], { order: 'shuffle' }))];
        replayedUnderLoad += rs.length;
        check(rs);
        await waitFor('new pushes', async () => (await appliedLsnOfS()) > applied, { timeoutMs: 15_000, intervalMs: 20 });
      }
    } finally {
      await hist.stop();
    }
    await converge('replay: converged before the quiet replays');
    const caps = down.stopCapture(true);
    const ranges = caps.map(bounds);
    // Quiet: the whole capture again, reversed then shuffled, each twice; the secondary must not move.
    const before = await secondarySnapshot();
    const quiet = [...(await down.replayAll(caps, { order: 'reverse', times: 2 })), ...(await down.replayAll(caps, { order: 'shuffle', times: 2 }))];
    check(quiet);
    const after = await secondarySnapshot();
    const decreases = await mon.stop();
    await finish(hist, [`${caps.length} pushes captured (lsn ${ranges[0]?.from_lsn}..${ranges[ranges.length - 1]?.to_lsn})`, `${replayedUnderLoad} replays under load + ${quiet.length} quiet, ${bad.length} not refused`]);
    expect(bad.slice(0, 10)).toEqual([]);
    expect(after).toEqual(before);
    expect(decreases).toEqual([]);
    expect(replayedUnderLoad).toBeGreaterThan(0);
  },
  T(60_000),
);

test(
  'half-open links (accepted, never forwarded) both ways under load, then heal: both sides recover, nothing stuck',
  async () => {
    const links = h.links(S);
    const hist = load('half-open', { writers: 4, onSecondary: 1 });
    const states = tracked(new StateRecorder(async () => (await perfStatus(S.addr)).state, 20));
    const mon = tracked(new PositionMonitor('secondary', () => S.liveAddrs()));
    await waitFor('writes flowing', () => hist.acked >= 50, { timeoutMs: 20_000 });
    const bytes = () => links.map((p) => p.counters.bytesUpstream + p.counters.bytesDownstream);
    let held: number[] = [];
    let forwardedDuring: number[] = [];
    let ackedDuring = 0;
    let remoteDuring: number[] = [];
    const holes0 = links.reduce((n, p) => n + p.counters.blackholed, 0);
    await Promise.all(links.map((p) => p.halfOpen()));
    const t0 = Date.now();
    try {
      const b0 = bytes();
      const r0 = Number((await perfStatus(S.addr)).last_remote_wal);
      // The primary keeps acknowledging writes (its pushes hang, its clients do not).
      await waitFor('primary writes while the links are black holes', () => hist.ackedSince(t0) >= 50, { timeoutMs: 20_000 });
      await pause(D(3_000));
      ackedDuring = hist.ackedSince(t0);
      forwardedDuring = bytes().map((b, i) => b - b0[i]);
      remoteDuring = [r0, Number((await perfStatus(S.addr)).last_remote_wal)];
      held = links.map((p) => p.counters.active);
    } finally {
      await h.heal(S);
    }
    const healed = Date.now();
    const holes = links.reduce((n, p) => n + p.counters.blackholed, 0) - holes0;
    // Both directions recover: forwarded writes from S succeed again, and the primary ships again.
    await waitFor('a forwarded write through the secondary after heal', () => hist.count((a) => a.at > healed && a.acked && S.liveAddrs().includes(a.addr)) > 0, { timeoutMs: 30_000 });
    const remote = Number((await perfStatus(S.addr)).last_remote_wal);
    await waitFor('shipping after heal', async () => Number((await perfStatus(S.addr)).last_remote_wal) > remote, { timeoutMs: 30_000 });
    const resumedMs = Date.now() - healed;
    await hist.stop();
    const seen = await states.stop();
    const decreases = await mon.stop();
    const processes = [...P.nodes, ...S.nodes].filter((n) => !alive(n)).map((n) => n.name);
    await finish(
      hist,
      [
        `${ackedDuring} acked on P while half-open`,
        `${held.reduce((a, b) => a + b, 0)} connections held, ${holes} new ones black-holed`,
        `S remote_wal ${remoteDuring.join('→')} while held`,
        `resumed ${resumedMs} ms after heal`,
        `states ${seen.join('>')}`,
      ],
      { convergeFrom: healed },
    );
    expect(forwardedDuring).toEqual(links.map(() => 0));
    expect(ackedDuring).toBeGreaterThan(0);
    expect(processes).toEqual([]);
    expect(decreases).toEqual([]);
    expect(seen[seen.length - 1]).toBe('stream-wals');
  },
  T(90_000),
);

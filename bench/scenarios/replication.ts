/**
 * Performance replication (performance.md §8 metric 4), Coffer primary → secondary against
 * Postgres native logical replication measured in the same run.
 *
 * Every measurement runs in a throwaway Postgres instance of its own with the same settings
 * (wal_level=logical, fsync and synchronous_commit on; initdb defaults otherwise), so Coffer
 * and the native references pay the same WAL volume and the same server.
 *
 * 1. Sustainable replicated writes/s, the pglogical method (§2.4): a closed-loop burst of KV v2
 *    writes on the primary for BENCH_SECONDS, then the time until the secondary's
 *    last_remote_wal reaches the primary's last_wal; rate = writes ÷ (load + drain). Two
 *    native references, measured the same way:
 *    a. "equivalent tables, same load" (the issue's reference; target ratio ≥ 1): a standalone
 *       Coffer (replication off) takes the same closed-loop KV v2 burst while Postgres logical
 *       replication copies its replicated tables (coffer_entries, coffer_wal) to another
 *       database; "caught up" is the subscriber holding the publisher's last WAL position.
 *       Same writes, same tables, same machine: the ratio is Coffer's replication against
 *       Postgres' own, with the cost of the write path itself on both sides;
 *    b. "raw 100 B upserts" (the database's ceiling, no target): the same number of clients
 *       upsert a 100 B row into a published table; "caught up" is a marker row committed after
 *       the load becoming visible on the subscriber. This compares a whole Vault write (HTTP,
 *       token, ACL, encryption, KV v2 metadata, two entries and two WAL rows) with one SQL
 *       upsert, so it mostly measures the write path, not replication.
 *    Subscriptions keep their default synchronous_commit = off for the apply worker: that is how
 *    native replication runs, and it stays crash-safe (the slot only advances past what the
 *    subscriber reports flushed).
 * 2. Lag p50/p99 at half the sustainable rate (open loop): per write, from the primary's
 *    acknowledgement to the first poll of the secondary's applied position (last_remote_wal,
 *    read with SQL from coffer_replication, as the native reference reads its origin) ≥ the
 *    write's X-Vault-Index. Target p99 ≤ 100 ms. The native equivalent maps the publisher's
 *    pg_current_wal_lsn() right after each commit to the subscription origin's remote_lsn
 *    (pg_replication_origin_status), polled the same way.
 * 3. Backlog apply rate, the method of the pgsql-hackers "Parallel Apply" benchmark
 *    (performance.md §2.4): the replica is held back while the primary takes a closed-loop
 *    burst for BENCH_SECONDS, then released; rate = writes in the backlog ÷ the time from the
 *    replica's first progress to caught up. This isolates shipping + apply from the primary's
 *    own write path. Native: ALTER SUBSCRIPTION … DISABLE / ENABLE. Coffer: the secondary's
 *    server is stopped (SIGSTOP) and continued (SIGCONT); the primary's batch in flight then
 *    completes, or fails and is retried, and the secondary reports its position.
 *
 * Everything it starts (the Postgres instance, Coffer processes, databases) is stopped and
 * removed at the end, on error, and on SIGINT/SIGTERM.
 */
import { execFile, execFileSync } from 'node:child_process';
import { chownSync, mkdtempSync, appendFileSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import pg from 'pg';
import { openPostgres } from '../../src/storage/db';
import { migrateToLatest } from '../../src/storage/migrate';
import { createTestDatabase, type TestDatabase } from '../../test/helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, type CofferProcess } from '../../test/helpers/coffer-process';
import { vault } from '../../test/helpers/http';
import { waitFor } from '../../test/helpers/wait';
import { cpuBetween, cpuReport, cpuSnapshot, postgresLabel, type CpuSnapshot } from '../cpu';
import { closedLoop, paced } from '../load';
import type { Figure } from '../run';

const PAYLOAD = 'x'.repeat(100);
const KEYS = 10_000;
const CONCURRENCY = 8;
const PG_BIN = process.env.PG_BIN ?? '/usr/lib/postgresql/15/bin';
const LAG_TARGET_P99_MS = 100;
/**
 * The lag pollers (both sides) wait this long between polls: a poll every ~1-2 ms resolves lag
 * well below the target, where a back-to-back loop (~3,000 statements/s) took a core's worth of
 * Postgres from the system it was measuring.
 */
const POLL_GAP_MS = 1;
/** BENCH_PG_STATS=1: pg_stat_statements in the instances, and the top statements of each sustainable-rate burst on stderr. */
const PG_STATS = process.env.BENCH_PG_STATS === '1';

/** BENCH_CPU=1: CPU time per write of each process (Coffer, Postgres by database, Redis, the bench) in each sustainable-rate burst, on stderr. */
const CPU = process.env.BENCH_CPU === '1';

/** Snapshot for BENCH_CPU: the Coffer processes named, the instance's Postgres by database and kind. */
function cpuNow(inst: Instance, coffers: Record<string, number>): CpuSnapshot | null {
  if (!CPU) return null;
  const postmaster = inst.postmasterPid();
  const names = new Map(Object.entries(coffers).map(([name, pid]) => [pid, name]));
  return cpuSnapshot((pid, comm, cmdline, ppid) => {
    if (names.has(pid)) return names.get(pid)!;
    if (pid === postmaster) return 'pg postmaster';
    if (ppid === postmaster) return postgresLabel(cmdline);
    if (comm === 'redis-server') return 'redis (all of it)';
    if (pid === process.pid) return 'bench (load generator, pollers)';
    return null;
  });
}

function cpuPrint(before: CpuSnapshot | null, inst: Instance, coffers: Record<string, number>, title: string, writes: number, wallSeconds: number): void {
  if (!before) return;
  const after = cpuNow(inst, coffers)!;
  process.stderr.write(cpuReport(title, cpuBetween(before, after), writes, wallSeconds) + '\n');
}

/** The instance's busiest statements since the last reset (BENCH_PG_STATS), per database, on stderr. */
async function pgStats(inst: Instance, label: string, reset = false): Promise<void> {
  if (!PG_STATS) return;
  const c = await client(inst.url('postgres'));
  try {
    await c.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements');
    if (!reset) {
      const { rows } = await c.query(`
        SELECT d.datname, s.calls, round((s.total_exec_time + s.total_plan_time)::numeric, 0) AS ms,
               round(((s.total_exec_time + s.total_plan_time) / greatest(s.calls, 1))::numeric, 3) AS mean_ms, round(s.total_plan_time::numeric, 0) AS plan_ms, s.rows, left(regexp_replace(s.query, '[[:space:]]+', ' ', 'g'), 90) AS query
          FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
         ORDER BY s.total_exec_time + s.total_plan_time DESC LIMIT 20`);
      process.stderr.write(`-- pg_stat_statements, ${label}\n` + rows.map((r) => `${String(r.ms).padStart(7)} ms (plan ${String(r.plan_ms).padStart(5)}) ${String(r.calls).padStart(7)} calls ${String(r.mean_ms).padStart(8)} ms/call  ${r.datname.slice(0, 22).padEnd(22)} ${r.query}`).join('\n') + '\n');
    }
    await c.query('SELECT pg_stat_statements_reset()');
  } finally {
    await c.end();
  }
}

// ------------------------------------------------------------------ cleanup on every exit path

/** Synchronous last-resort cleanups (signal or exit); the normal path runs the async ones. */
const emergency = new Map<string, () => void>();
function runEmergency(): void {
  for (const [k, fn] of emergency) {
    emergency.delete(k);
    try {
      fn();
    } catch {
      /* best effort */
    }
  }
}
function onSignal(sig: NodeJS.Signals): void {
  runEmergency();
  process.exit(sig === 'SIGINT' ? 130 : 143);
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ------------------------------------------------------------------ throwaway Postgres instance

interface Instance {
  port: number;
  url(db: string): string;
  /** A new database in this instance (gone with it). */
  database(label: string): Promise<TestDatabase>;
  /** The postmaster's pid (its children are the instance's backends and workers). */
  postmasterPid(): number;
  stop(): Promise<void>;
}

function asPostgresUser(cmd: string, args: string[]): [string, string[]] {
  // initdb refuses root; the server must not run as root either.
  return process.getuid?.() === 0 ? ['runuser', ['-u', 'postgres', '--', cmd, ...args]] : [cmd, args];
}

function run(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
  const [c, a] = asPostgresUser(cmd, args);
  return new Promise((resolve, reject) =>
    execFile(c, a, { timeout: timeoutMs }, (err, stdout, stderr) => (err ? reject(new Error(`${cmd} failed: ${err.message}\n${stderr}`)) : resolve(stdout))),
  );
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function startInstance(): Promise<Instance> {
  const dir = mkdtempSync(join(tmpdir(), 'coffer-bench-pg-'));
  const data = join(dir, 'data');
  const removeDir = () => rmSync(dir, { recursive: true, force: true });
  const stopSync = () => {
    try {
      const [c, a] = asPostgresUser(join(PG_BIN, 'pg_ctl'), ['-D', data, '-m', 'immediate', '-w', '-t', '30', 'stop']);
      execFileSync(c, a, { stdio: 'ignore', timeout: 40_000 });
    } catch {
      /* not running */
    }
    removeDir();
  };
  emergency.set(`pg:${dir}`, stopSync);
  try {
    if (process.getuid?.() === 0) {
      const uid = Number(execFileSync('id', ['-u', 'postgres']).toString().trim());
      const gid = Number(execFileSync('id', ['-g', 'postgres']).toString().trim());
      chownSync(dir, uid, gid);
    }
    await run(join(PG_BIN, 'initdb'), ['-D', data, '-A', 'trust', '-U', 'postgres', '-E', 'UTF8', '--locale=C', '--no-sync']);
    const port = await freePort();
    // Durable, like Coffer; other settings stay at their defaults, as on the main server.
    appendFileSync(
      join(data, 'postgresql.conf'),
      [
        `listen_addresses = '127.0.0.1'`,
        `port = ${port}`,
        `unix_socket_directories = '${dir}'`,
        `wal_level = logical`,
        `max_wal_senders = 10`,
        `max_replication_slots = 10`,
        `fsync = on`,
        `synchronous_commit = on`,
        ...(PG_STATS ? [`shared_preload_libraries = 'pg_stat_statements'`, `pg_stat_statements.track = all`, `pg_stat_statements.track_planning = on`] : []),
        '',
      ].join('\n'),
    );
    await run(join(PG_BIN, 'pg_ctl'), ['-D', data, '-l', join(dir, 'server.log'), '-w', '-t', '60', 'start'], 90_000);
    const url = (db: string) => `postgres://postgres@127.0.0.1:${port}/${db}`;
    return {
      port,
      url,
      database: (label) => createTestDatabase(label, url('postgres')),
      postmasterPid: () => Number(readFileSync(join(data, 'postmaster.pid'), 'utf8').split('\n')[0]),
      async stop() {
        emergency.delete(`pg:${dir}`);
        await run(join(PG_BIN, 'pg_ctl'), ['-D', data, '-m', 'immediate', '-w', '-t', '30', 'stop'], 40_000).catch(() => undefined);
        removeDir();
      },
    };
  } catch (err) {
    emergency.delete(`pg:${dir}`);
    stopSync();
    throw err;
  }
}

async function client(url: string): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url });
  c.on('error', () => undefined);
  await c.connect();
  return c;
}

const TABLE = `CREATE TABLE entries (path text COLLATE "C" PRIMARY KEY, version bigint NOT NULL, value bytea)`;
const UPSERT = {
  name: 'upsert',
  text: `INSERT INTO entries AS cur (path, version, value) VALUES ($1, 1, $2)
         ON CONFLICT (path) DO UPDATE SET version = cur.version + 1, value = EXCLUDED.value`,
};
const VALUE = Buffer.from(PAYLOAD);

interface NativeResult {
  sustainable: number;
  publishTps: number;
  commits: number;
  loadSeconds: number;
  drainSeconds: number;
  caughtUp: boolean;
  consistent: boolean;
  lag: LagResult;
  backlog: BacklogResult;
}

interface BacklogResult {
  /** Client writes in the backlog (Coffer: KV v2 writes; native: upsert commits). */
  writes: number;
  /** Replicated rows in it (Coffer: WAL rows, two per KV v2 write; native: one per commit). */
  rows: number;
  loadSeconds: number;
  /** From releasing the replica to its first visible progress (reconnect, retry). */
  resumeSeconds: number;
  /** From first progress to caught up. */
  applySeconds: number;
  writesPerSecond: number;
  caughtUp: boolean;
}

interface LagResult {
  rate: number;
  samples: number;
  unresolved: number;
  errors: number;
  p50: number;
  p99: number;
  max: number;
  ackP50: number;
  ackP99: number;
  pollIntervalMs: number;
}

function lagSummary(rate: number, writes: { ack: number; lat: number; lag?: number }[], errors: number, polls: number, pollSeconds: number): LagResult {
  const lags = writes.filter((w) => w.lag !== undefined).map((w) => w.lag!).sort((a, b) => a - b);
  const acks = writes.map((w) => w.lat).sort((a, b) => a - b);
  return {
    rate,
    samples: lags.length,
    unresolved: writes.length - lags.length,
    errors,
    p50: percentile(lags, 50),
    p99: percentile(lags, 99),
    max: lags.length ? lags[lags.length - 1] : NaN,
    ackP50: percentile(acks, 50),
    ackP99: percentile(acks, 99),
    pollIntervalMs: polls ? (pollSeconds * 1000) / polls : NaN,
  };
}

/** Polls (time received, applied position) are monotone in position: first poll reaching `pos`. */
function resolveLags(writes: { ack: number; pos: number; lag?: number }[], polls: { t: number; pos: number }[]): void {
  let max = -Infinity;
  const t: number[] = [];
  const p: number[] = [];
  for (const x of polls) {
    if (x.pos > max) {
      max = x.pos;
      t.push(x.t);
      p.push(x.pos);
    }
  }
  for (const w of writes) {
    let lo = 0;
    let hi = p.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (p[mid] >= w.pos) hi = mid;
      else lo = mid + 1;
    }
    if (lo < p.length) w.lag = Math.max(0, t[lo] - w.ack);
  }
}

async function nativeReference(seconds: number): Promise<NativeResult> {
  const inst = await startInstance();
  const clients: pg.Client[] = [];
  try {
    const admin = await client(inst.url('postgres'));
    clients.push(admin);
    await admin.query('CREATE DATABASE pub');
    await admin.query('CREATE DATABASE sub');
    const pub = await client(inst.url('pub'));
    const sub = await client(inst.url('sub'));
    clients.push(pub, sub);
    await pub.query(TABLE);
    await sub.query(TABLE);
    await pub.query('CREATE PUBLICATION p FOR TABLE entries');
    // Same cluster: the slot must exist before CREATE SUBSCRIPTION (which would wait on itself).
    await pub.query(`SELECT pg_create_logical_replication_slot('s', 'pgoutput')`);
    await sub.query(`CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1 port=${inst.port} dbname=pub user=postgres' PUBLICATION p WITH (create_slot = false, slot_name = 's', copy_data = false)`);
    const origin = `pg_${(await sub.query(`SELECT oid FROM pg_subscription WHERE subname = 's'`)).rows[0].oid}`;
    await pub.query(`INSERT INTO entries VALUES ('probe', 1, NULL)`);
    await waitFor('the subscription to apply a probe row', async () => (await sub.query(`SELECT 1 FROM entries WHERE path = 'probe'`)).rowCount === 1, { timeoutMs: 30_000, intervalMs: 20 });

    // (1) closed-loop burst, then drain.
    const writers = await Promise.all(Array.from({ length: CONCURRENCY }, () => client(inst.url('pub'))));
    clients.push(...writers);
    let n = 0;
    /** Every writer upserts in a loop for `seconds`; returns the commits. */
    const burst = async () => {
      let done = 0;
      const end = Date.now() + seconds * 1000;
      await Promise.all(
        writers.map(async (c) => {
          while (Date.now() < end) {
            await c.query({ ...UPSERT, values: [`k/${n++ % KEYS}`, VALUE] });
            done++;
          }
        }),
      );
      return done;
    };
    const t0 = performance.now();
    const commits = await burst();
    const loadEnd = performance.now();
    await pub.query(`INSERT INTO entries VALUES ('marker/1', 1, NULL)`);
    const drainTimeoutMs = Math.max(60_000, seconds * 10_000);
    let caughtUp = true;
    while ((await sub.query(`SELECT 1 FROM entries WHERE path = 'marker/1'`)).rowCount !== 1) {
      if (performance.now() - loadEnd > drainTimeoutMs) {
        caughtUp = false;
        break;
      }
      await sleep(2);
    }
    const drainEnd = performance.now();
    const sum = async (c: pg.Client) => String((await c.query(`SELECT count(*) AS n, sum(version) AS v FROM entries`)).rows.map((r) => `${r.n}/${r.v}`)[0]);
    const consistent = caughtUp && (await sum(pub)) === (await sum(sub));
    const loadSeconds = (loadEnd - t0) / 1000;
    const drainSeconds = (drainEnd - loadEnd) / 1000;
    const sustainable = commits / (loadSeconds + drainSeconds);

    // (2) open loop at half the sustainable rate: commit ack → subscriber's origin past it.
    const rate = sustainable / 2;
    const pool = new pg.Pool({ connectionString: inst.url('pub'), max: 32 });
    pool.on('error', () => undefined);
    const poller = await client(inst.url('sub'));
    clients.push(poller);
    const writes: { ack: number; lat: number; pos: number; lag?: number }[] = [];
    const polls: { t: number; pos: number }[] = [];
    let errors = 0;
    let polling = true;
    const POLL = { name: 'origin', text: `SELECT (remote_lsn - '0/0')::bigint AS l FROM pg_replication_origin_status WHERE external_id = $1`, values: [origin] };
    const pollStart = performance.now();
    const pollLoop = (async () => {
      while (polling) {
        const r = await poller.query(POLL);
        polls.push({ t: performance.now(), pos: Number(r.rows[0]?.l ?? 0) });
        await sleep(POLL_GAP_MS);
      }
    })();
    try {
      await paced(rate, seconds, async (i, due) => {
        const c = await pool.connect();
        try {
          await c.query({ ...UPSERT, values: [`k/${i % KEYS}`, VALUE] });
          const ack = performance.now();
          // Past our commit record (a slight over-estimate: ≤ one commit of anyone's later).
          const r = await c.query({ name: 'lsn', text: `SELECT (pg_current_wal_lsn() - '0/0')::bigint AS l` });
          writes.push({ ack, lat: ack - due, pos: Number(r.rows[0].l) });
        } catch {
          errors++;
        } finally {
          c.release();
        }
      });
      // The last positions may point past the last published commit (the subscriber's own WAL
      // shares the instance): keep committing fillers until every write is resolved.
      const maxPos = writes.reduce((m, w) => Math.max(m, w.pos), 0);
      const tailEnd = performance.now() + 30_000;
      let f = 0;
      while (performance.now() < tailEnd && (polls[polls.length - 1]?.pos ?? 0) < maxPos) {
        await pool.query({ ...UPSERT, values: [`filler/${f++ % 10}`, VALUE] });
        await sleep(2);
      }
    } finally {
      polling = false;
      await pollLoop.catch(() => undefined);
      await pool.end();
    }
    const pollSeconds = (performance.now() - pollStart) / 1000;
    resolveLags(writes, polls);

    // (3) backlog: subscription disabled during a closed-loop burst, then enabled.
    const originPos = async () => Number((await poller.query(POLL)).rows[0]?.l ?? 0);
    await sub.query('ALTER SUBSCRIPTION s DISABLE');
    await waitFor('the apply worker to exit', async () => (await sub.query(`SELECT 1 FROM pg_stat_subscription WHERE subname = 's' AND pid IS NOT NULL`)).rowCount === 0, { timeoutMs: 30_000, intervalMs: 20 });
    const b0 = performance.now();
    const backlogCommits = await burst();
    const bLoadSeconds = (performance.now() - b0) / 1000;
    await pub.query(`INSERT INTO entries VALUES ('marker/2', 1, NULL)`);
    const heldAt = await originPos();
    const released = performance.now();
    await sub.query('ALTER SUBSCRIPTION s ENABLE');
    let firstProgress = NaN;
    let bCaughtUp = true;
    for (;;) {
      if (Number.isNaN(firstProgress) && (await originPos()) > heldAt) firstProgress = performance.now();
      if ((await sub.query(`SELECT 1 FROM entries WHERE path = 'marker/2'`)).rowCount === 1) break;
      if (performance.now() - released > drainTimeoutMs) {
        bCaughtUp = false;
        break;
      }
      await sleep(1);
    }
    const bDone = performance.now();
    if (Number.isNaN(firstProgress)) firstProgress = bDone;
    const backlog: BacklogResult = {
      writes: backlogCommits,
      rows: backlogCommits,
      loadSeconds: bLoadSeconds,
      resumeSeconds: (firstProgress - released) / 1000,
      applySeconds: (bDone - firstProgress) / 1000,
      writesPerSecond: backlogCommits / Math.max((bDone - firstProgress) / 1000, 1e-3),
      caughtUp: bCaughtUp,
    };
    return {
      backlog,
      sustainable,
      publishTps: commits / loadSeconds,
      commits,
      loadSeconds,
      drainSeconds,
      caughtUp,
      consistent,
      lag: lagSummary(rate, writes, errors, polls.length, pollSeconds),
    };
  } finally {
    // Subscription first (its worker holds a connection to pub), then the whole instance.
    await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
    await inst.stop();
  }
}

// ------------------------------------------------------------------ Coffer primary → secondary

interface CofferSustainable {
  sustainable: number;
  ack: Awaited<ReturnType<typeof closedLoop>>;
  drainSeconds: number;
  caughtUp: boolean;
  walRows: number;
  drainPolls: number;
  inSync: boolean;
  /** Batches the primary sent during the burst and drain, and their mean size in WAL entries. */
  batches: number;
  batchEntriesMean: number;
}

interface CofferFull extends CofferSustainable {
  backlog: BacklogResult;
  lag: LagResult & { missingIndex: number };
}

interface CofferReplicated {
  pri: CofferProcess;
  sec: CofferProcess;
  /** The secondary's database, where its applied position (last_remote_wal) is polled. */
  secDbUrl: string;
  token: string;
}

async function perfStatus(addr: string): Promise<any> {
  const r = await vault(addr, 'GET', 'sys/replication/performance/status');
  if (r.status !== 200) throw new Error(`status ${r.status}: ${JSON.stringify(r.body)}`);
  return r.body.data;
}

/** The primary's batches sent so far and their WAL entries (its metrics). */
async function shippedBatches(addr: string, token: string): Promise<{ count: number; entries: number }> {
  const text = await (await fetch(`${addr}/v1/sys/metrics?format=prometheus`, { headers: { 'x-vault-token': token } })).text();
  const pick = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1] ?? 0);
  return { count: pick('coffer_replication_ship_batch_entries_count'), entries: pick('coffer_replication_ship_batch_entries_sum') };
}

/** BENCH_PROF_DIR=dir: the Coffer processes write V8 CPU profiles there when they stop. */
function profArgs(name: string): string[] | undefined {
  const dir = process.env.BENCH_PROF_DIR;
  return dir ? ['--cpu-prof', `--cpu-prof-dir=${dir}`, `--cpu-prof-name=${name}-${Date.now()}.cpuprofile`] : undefined;
}

async function cofferPair(inst: Instance): Promise<CofferReplicated> {
  const priDb = await inst.database('bench_rpri');
  const secDb = await inst.database('bench_rsec');
  const pri = await startCoffer({ dbUrl: priDb.url, logLevel: 'warn', nodeArgs: profArgs('primary') });
  const sec = await startCoffer({ dbUrl: secDb.url, logLevel: 'warn', nodeArgs: profArgs('secondary') });
  const { rootToken } = await initAndUnseal([pri]);
  const { rootToken: secToken } = await initAndUnseal([sec]);
  await mountKv2(pri.addr, rootToken);
  const en = await vault(pri.addr, 'POST', 'sys/replication/performance/primary/enable', { token: rootToken, body: {} });
  if (en.status !== 200) throw new Error(`primary enable: ${en.status} ${JSON.stringify(en.body)}`);
  const tok = await vault(pri.addr, 'POST', 'sys/replication/performance/primary/secondary-token', { token: rootToken, body: { id: 'bench' } });
  if (tok.status !== 200) throw new Error(`secondary-token: ${tok.status} ${JSON.stringify(tok.body)}`);
  const se = await vault(sec.addr, 'POST', 'sys/replication/performance/secondary/enable', { token: secToken, body: { token: tok.body.wrap_info.token } });
  if (se.status !== 200) throw new Error(`secondary enable: ${se.status} ${JSON.stringify(se.body)}`);
  await waitFor('the secondary to stream', async () => (await perfStatus(sec.addr)).state === 'stream-wals', { timeoutMs: 30_000 });
  // One write through, to see the whole path working before measuring.
  const w = await vault(pri.addr, 'POST', 'secret/data/probe', { token: rootToken, body: { data: { x: 1 } } });
  const idx = Number(w.headers.get('x-vault-index'));
  await waitFor('the probe write on the secondary', async () => (await perfStatus(sec.addr)).last_remote_wal >= idx, { timeoutMs: 30_000, intervalMs: 10 });
  return { pri, sec, secDbUrl: secDb.url, token: rootToken };
}

/** One KV write; resolves with its status and X-Vault-Index at the moment the answer ended. */
function writeOnce(agent: http.Agent, base: URL, path: string, token: string, body: string): Promise<{ status: number; index: number }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { agent, host: base.hostname, port: base.port, method: 'POST', path, headers: { 'x-vault-token': token, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } },
      (res) => {
        res.resume();
        res.on('end', () => resolve({ status: res.statusCode ?? 0, index: Number(res.headers['x-vault-index'] ?? NaN) }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

/** A closed-loop burst of KV v2 writes (100 B secrets over KEYS keys under `prefix`) from CONCURRENCY clients. */
function kvBurst(addr: string, token: string, seconds: number, prefix: string) {
  const body = JSON.stringify({ data: { password: PAYLOAD } });
  return closedLoop(addr, CONCURRENCY, seconds, (i) => ({
    method: 'POST',
    path: `/v1/secret/data/${prefix}/${i % KEYS}`,
    headers: { 'x-vault-token': token, 'content-type': 'application/json' },
    body,
  }));
}

/** The sustainable rate only (`full` false), or with the lag and backlog measurements too. */
async function cofferMeasure(seconds: number, full: true): Promise<CofferFull>;
async function cofferMeasure(seconds: number, full: false): Promise<CofferSustainable>;
async function cofferMeasure(seconds: number, full: boolean): Promise<CofferSustainable | CofferFull> {
  // The instance, and every database in it, goes at the end (emergency cleanup on a signal).
  const inst = await startInstance();
  try {
    const { pri, sec, secDbUrl, token } = await cofferPair(inst);
    const body = JSON.stringify({ data: { password: PAYLOAD } });
    // The secondary's applied position (what its status reports as last_remote_wal) is polled
    // with SQL, as the native reference polls its subscription's origin: the instrument then
    // costs the secondary a prepared one-row read per poll instead of an HTTP status request.
    const poller = await client(secDbUrl);
    const POSITION = { name: 'position', text: `SELECT applied_lsn FROM coffer_replication WHERE id = 1` };
    const secPosition = async () => Number((await poller.query(POSITION)).rows[0].applied_lsn);
    try {
      // (1) closed-loop burst on the primary, then drain until the secondary has it all.
      await pgStats(inst, '', true);
      const walBefore = (await perfStatus(pri.addr)).last_wal as number;
      const shipped0 = await shippedBatches(pri.addr, token);
      const procs = { 'coffer primary': pri.pid, 'coffer secondary': sec.pid };
      const cpu0 = cpuNow(inst, procs);
      const burstStart = performance.now();
      const r = await kvBurst(pri.addr, token, seconds, 'bench');
      const loadEnd = performance.now();
      const target = (await perfStatus(pri.addr)).last_wal as number;
      const drainTimeoutMs = Math.max(60_000, seconds * 10_000);
      let caughtUp = true;
      let polls = 0;
      for (;;) {
        const pos = await secPosition();
        polls++;
        if (pos >= target) break;
        if (performance.now() - loadEnd > drainTimeoutMs) {
          caughtUp = false;
          break;
        }
        await sleep(2);
      }
      const drainSeconds = (performance.now() - loadEnd) / 1000;
      const finalPri = (await perfStatus(pri.addr)).last_wal as number;
      const finalSec = (await perfStatus(sec.addr)).last_remote_wal as number;
      cpuPrint(cpu0, inst, procs, 'Coffer primary → secondary (burst and drain)', r.requests, (performance.now() - burstStart) / 1000);
      const sustainable = r.requests / (r.seconds + drainSeconds);
      const shipped = await shippedBatches(pri.addr, token);
      const batches = shipped.count - shipped0.count;
      const batchEntriesMean = batches > 0 ? (shipped.entries - shipped0.entries) / batches : 0;
      if (CPU) process.stderr.write(`  ${batches} batches, ${batchEntriesMean.toFixed(1)} WAL entries each\n`);
      const first: CofferSustainable = { sustainable, ack: r, drainSeconds, caughtUp, walRows: target - walBefore, drainPolls: polls, inSync: finalSec === finalPri, batches, batchEntriesMean };
      await pgStats(inst, `Coffer primary → secondary, ${r.requests} writes`);
      if (!full) {
        // A graceful stop, so BENCH_PROF_DIR's profiles (written at exit) hold this burst alone.
        if (process.env.BENCH_PROF_DIR) await Promise.all([pri.kill('SIGTERM'), sec.kill('SIGTERM')]);
        return first;
      }

      // (2) open loop at half the sustainable rate; lag from ack to the secondary's apply.
      const rate = sustainable / 2;
      const priBase = new URL(pri.addr);
      const writeAgent = new http.Agent({ keepAlive: true, maxSockets: 256 });
      const writes: { ack: number; lat: number; pos: number; lag?: number }[] = [];
      const lagPolls: { t: number; pos: number }[] = [];
      let errors = 0;
      let missingIndex = 0;
      let polling = true;
      const pollStart = performance.now();
      const pollLoop = (async () => {
        while (polling) {
          const pos = await secPosition();
          lagPolls.push({ t: performance.now(), pos });
          await sleep(POLL_GAP_MS);
        }
      })();
      try {
        await paced(rate, seconds, (i, due) =>
          writeOnce(writeAgent, priBase, `/v1/secret/data/lag/${i % KEYS}`, token, body).then(
            ({ status, index }) => {
              const ack = performance.now();
              if (status >= 400) errors++;
              else if (!Number.isFinite(index) || index <= 0) missingIndex++;
              else writes.push({ ack, lat: ack - due, pos: index });
            },
            () => {
              errors++;
            },
          ),
        );
        const maxPos = writes.reduce((m, w) => Math.max(m, w.pos), 0);
        const tailEnd = performance.now() + 30_000;
        while (performance.now() < tailEnd && (lagPolls[lagPolls.length - 1]?.pos ?? 0) < maxPos) await sleep(5);
      } finally {
        polling = false;
        await pollLoop.catch(() => undefined);
        writeAgent.destroy();
      }
      const pollSeconds = (performance.now() - pollStart) / 1000;
      resolveLags(writes, lagPolls);

      // (3) backlog: the secondary's server stopped during a closed-loop burst, then continued.
      const heldAt = await secPosition();
      const bWalBefore = (await perfStatus(pri.addr)).last_wal as number;
      sec.proc.kill('SIGSTOP');
      let b: Awaited<ReturnType<typeof closedLoop>>;
      let released = 0;
      try {
        b = await kvBurst(pri.addr, token, seconds, 'backlog');
      } finally {
        released = performance.now();
        sec.proc.kill('SIGCONT');
      }
      const bTarget = (await perfStatus(pri.addr)).last_wal as number;
      let firstProgress = NaN;
      let bCaughtUp = true;
      for (;;) {
        const pos = await secPosition();
        if (Number.isNaN(firstProgress) && pos > heldAt) firstProgress = performance.now();
        if (pos >= bTarget) break;
        if (performance.now() - released > drainTimeoutMs) {
          bCaughtUp = false;
          break;
        }
        await sleep(1);
      }
      const bDone = performance.now();
      if (Number.isNaN(firstProgress)) firstProgress = bDone;
      const backlog: BacklogResult = {
        writes: b.requests,
        rows: bTarget - bWalBefore,
        loadSeconds: b.seconds,
        resumeSeconds: (firstProgress - released) / 1000,
        applySeconds: (bDone - firstProgress) / 1000,
        writesPerSecond: b.requests / Math.max((bDone - firstProgress) / 1000, 1e-3),
        caughtUp: bCaughtUp,
      };
      return { ...first, backlog, lag: { ...lagSummary(rate, writes, errors, lagPolls.length, pollSeconds), missingIndex } };
    } finally {
      await poller.end().catch(() => undefined);
    }
  } finally {
    await stopAllCoffers();
    await inst.stop();
  }
}

/**
 * Reference 1a: Postgres logical replication of Coffer's replicated tables under the same KV v2
 * load. A standalone Coffer (replication off) on one database of the instance; its
 * coffer_entries and coffer_wal are published and subscribed by another database (migrated to
 * the same schema; the apply worker runs as a replica, so triggers do not fire there). Caught up:
 * the subscriber holds the publisher's highest WAL position.
 */
async function nativeSameWorkload(seconds: number) {
  const inst = await startInstance();
  const clients: pg.Client[] = [];
  try {
    const pubDb = await inst.database('bench_npub');
    const subDb = await inst.database('bench_nsub');
    for (const d of [pubDb, subDb]) {
      const database = openPostgres(d.url, 1);
      try {
        await migrateToLatest(database.db);
      } finally {
        await database.close();
      }
    }
    const pub = await client(pubDb.url);
    const sub = await client(subDb.url);
    clients.push(pub, sub);
    await pub.query('CREATE PUBLICATION coffer_tables FOR TABLE coffer_entries, coffer_wal');
    // Same instance: the slot must exist before CREATE SUBSCRIPTION (which would wait on itself).
    await pub.query(`SELECT pg_create_logical_replication_slot('coffer_tables', 'pgoutput')`);
    await sub.query(
      `CREATE SUBSCRIPTION coffer_tables CONNECTION 'host=127.0.0.1 port=${inst.port} dbname=${pubDb.name} user=postgres' PUBLICATION coffer_tables WITH (create_slot = false, slot_name = 'coffer_tables', copy_data = false)`,
    );
    const p = await startCoffer({ dbUrl: pubDb.url, logLevel: 'warn' });
    const { rootToken } = await initAndUnseal([p]);
    await mountKv2(p.addr, rootToken);
    const maxLsn = async (c: pg.Client) => Number((await c.query(`SELECT coalesce(max(lsn), 0) AS l FROM coffer_wal`)).rows[0].l);
    const w = await vault(p.addr, 'POST', 'secret/data/probe', { token: rootToken, body: { data: { x: 1 } } });
    const probe = Number(w.headers.get('x-vault-index'));
    await waitFor('the probe write on the subscriber', async () => (await maxLsn(sub)) >= probe, { timeoutMs: 30_000, intervalMs: 10 });

    await pgStats(inst, '', true);
    const procs = { 'coffer (publisher)': p.pid };
    const cpu0 = cpuNow(inst, procs);
    const burstStart = performance.now();
    const r = await kvBurst(p.addr, rootToken, seconds, 'bench');
    const loadEnd = performance.now();
    const target = await maxLsn(pub);
    const drainTimeoutMs = Math.max(60_000, seconds * 10_000);
    let caughtUp = true;
    while ((await maxLsn(sub)) < target) {
      if (performance.now() - loadEnd > drainTimeoutMs) {
        caughtUp = false;
        break;
      }
      await sleep(2);
    }
    const drainSeconds = (performance.now() - loadEnd) / 1000;
    cpuPrint(cpu0, inst, procs, 'Coffer + native logical replication (burst and drain)', r.requests, (performance.now() - burstStart) / 1000);
    const rows = async (c: pg.Client) => String((await c.query(`SELECT count(*) AS n, sum(version) AS v FROM coffer_entries`)).rows.map((x) => `${x.n}/${x.v}`)[0]);
    const consistent = caughtUp && (await rows(pub)) === (await rows(sub));
    await pgStats(inst, `standalone Coffer + native logical replication of its tables, ${r.requests} writes`);
    return { sustainable: r.requests / (r.seconds + drainSeconds), ack: r, drainSeconds, caughtUp, consistent, walRows: target };
  } finally {
    await stopAllCoffers();
    await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
    await inst.stop();
  }
}

export async function replicationScenario(seconds: number): Promise<Figure[]> {
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', runEmergency);
  try {
    // Both sides share the machine's cores with the load generator; a busy host moves both.
    const loadStart = loadavg()[0];
    const native = await nativeReference(seconds);
    // The machine's speed drifts by tens of percent between minutes (shared cores): the same-load
    // comparison runs as BENCH_REPEAT alternating pairs, and reports the medians and each ratio.
    const repeat = Math.max(1, Number(process.env.BENCH_REPEAT ?? 3));
    const pairs: { coffer: number; native: number }[] = [];
    // Each pair's order alternates too (Coffer first in every other pair, native first in the
    // last, which also measures lag), so a drift in the machine's speed favours neither side.
    for (let i = 1; i < repeat; i++) {
      const cofferFirst = (repeat - i) % 2 === 1;
      const c0 = cofferFirst ? await cofferMeasure(seconds, false) : null;
      const n = await nativeSameWorkload(seconds);
      const c = c0 ?? (await cofferMeasure(seconds, false));
      pairs.push({ coffer: c.sustainable, native: n.sustainable });
    }
    const same = await nativeSameWorkload(seconds);
    const coffer = await cofferMeasure(seconds, true);
    pairs.push({ coffer: coffer.sustainable, native: same.sustainable });
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
    const loadEnd = loadavg()[0];
    const r = (x: number) => Math.round(x * 1000) / 1000;
    return [
      {
        name: 'replicated_kv2_writes_sustainable_per_s',
        value: median(pairs.map((p) => p.coffer)),
        unit: 'writes/s',
        reference: { name: `PG native logical replication of Coffer's tables (coffer_entries, coffer_wal), same KV v2 load, sustainable writes/s (medians of ${pairs.length} alternating pairs)`, value: median(pairs.map((p) => p.native)) },
        target: 1,
        extra: {
          pairs: pairs.map((p) => `${Math.round(p.coffer)}/${Math.round(p.native)}=${(p.coffer / p.native).toFixed(2)}`).join(' '),
          concurrency: CONCURRENCY,
          writes: coffer.ack.requests,
          drain_s: r(coffer.drainSeconds),
          native_writes: same.ack.requests,
          native_acked_per_s: same.ack.perSecond,
          native_ack_p50_ms: same.ack.p50Ms,
          native_ack_p99_ms: same.ack.p99Ms,
          native_load_s: r(same.ack.seconds),
          native_drain_s: r(same.drainSeconds),
          native_caught_up: same.caughtUp ? 'yes' : 'NO',
          native_consistent: same.consistent ? 'yes' : 'no',
        },
      },
      {
        name: 'replicated_kv2_writes_sustainable_per_s_vs_raw_upserts',
        value: median(pairs.map((p) => p.coffer)),
        unit: 'writes/s',
        reference: { name: 'PG native logical replication, sustainable 100 B upserts/s (same clients; the database ceiling, not a Vault write)', value: native.sustainable },
        extra: {
          concurrency: CONCURRENCY,
          primary_acked_per_s: coffer.ack.perSecond,
          writes: coffer.ack.requests,
          errors: coffer.ack.errors,
          load_s: r(coffer.ack.seconds),
          drain_s: r(coffer.drainSeconds),
          caught_up: coffer.caughtUp ? 'yes' : 'NO (drain timed out; figure is an upper bound)',
          wal_rows: coffer.walRows,
          last_remote_wal_eq_last_wal: coffer.inSync ? 'yes' : 'no',
          batches: coffer.batches,
          batch_entries_mean: coffer.batchEntriesMean,
          ack_p50_ms: coffer.ack.p50Ms,
          ack_p99_ms: coffer.ack.p99Ms,
          native_publish_tps: native.publishTps,
          native_commits: native.commits,
          native_load_s: r(native.loadSeconds),
          native_drain_s: r(native.drainSeconds),
          native_caught_up: native.caughtUp ? 'yes' : 'NO',
          native_consistent: native.consistent ? 'yes' : 'no',
          host_loadavg_1m_start: loadStart,
          host_loadavg_1m_end: loadEnd,
        },
      },
      {
        name: 'replication_backlog_apply_writes_per_s',
        value: coffer.backlog.writesPerSecond,
        unit: 'writes/s',
        reference: { name: 'PG native logical replication: a disabled subscription catching up, commits applied/s', value: native.backlog.writesPerSecond },
        extra: {
          writes: coffer.backlog.writes,
          wal_rows: coffer.backlog.rows,
          rows_per_s: coffer.backlog.rows / Math.max(coffer.backlog.applySeconds, 1e-3),
          load_s: r(coffer.backlog.loadSeconds),
          resume_s: r(coffer.backlog.resumeSeconds),
          apply_s: r(coffer.backlog.applySeconds),
          caught_up: coffer.backlog.caughtUp ? 'yes' : 'NO',
          native_commits: native.backlog.writes,
          native_load_s: r(native.backlog.loadSeconds),
          native_resume_s: r(native.backlog.resumeSeconds),
          native_apply_s: r(native.backlog.applySeconds),
          native_caught_up: native.backlog.caughtUp ? 'yes' : 'NO',
          native_apply_share_of_publish_rate: r(native.backlog.writesPerSecond / native.publishTps),
        },
      },
      {
        name: 'replication_lag_p50_ms',
        value: coffer.lag.p50,
        unit: 'ms',
        reference: { name: 'PG native commit→applied p50 at half its sustainable rate (lower is better)', value: native.lag.p50 },
        extra: { rate_per_s: coffer.lag.rate, samples: coffer.lag.samples, native_rate_per_s: native.lag.rate, native_samples: native.lag.samples },
      },
      {
        name: 'replication_lag_p99_ms',
        value: coffer.lag.p99,
        unit: 'ms',
        reference: { name: 'PG native commit→applied p99 at half its sustainable rate (lower is better)', value: native.lag.p99 },
        extra: {
          target_ms: LAG_TARGET_P99_MS,
          met: coffer.lag.p99 <= LAG_TARGET_P99_MS ? 'yes' : 'NO',
          max_ms: coffer.lag.max,
          rate_per_s: coffer.lag.rate,
          samples: coffer.lag.samples,
          unresolved: coffer.lag.unresolved,
          errors: coffer.lag.errors,
          missing_index: coffer.lag.missingIndex,
          poll_interval_ms: coffer.lag.pollIntervalMs,
          ack_p50_ms: coffer.lag.ackP50,
          ack_p99_ms: coffer.lag.ackP99,
          native_max_ms: native.lag.max,
          native_samples: native.lag.samples,
          native_unresolved: native.lag.unresolved,
          native_poll_interval_ms: native.lag.pollIntervalMs,
        },
      },
    ];
  } finally {
    runEmergency();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.off('exit', runEmergency);
  }
}

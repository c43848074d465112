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
import { readdir, readFile, readlink } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import Redis from 'ioredis';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, startCofferWorker, stopAllCoffers, type CofferProcess, type StartOptions } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';

const REDIS_URL = process.env.COFFER_TEST_REDIS ?? 'redis://127.0.0.1:6379';
const TAG = randomBytes(4).toString('hex');
const PREFIX_ROOT = `coffer-test-rworkers-${TAG}`;
const queueHcl = (prefix: string) => `queue "redis" {\n  url = "${REDIS_URL}"\n  prefix = "${prefix}"\n}\n`;
const APPLY_PATH = '/v1/sys/replication/performance/internal/apply';
const SECONDARIES = ['dc2', 'dc3', 'dc4'];
const WRITES_PER_PHASE = 3000;
const WRITERS = 16;
const HOT_KEYS = Array.from({ length: 12 }, (_, i) => `hot/${i}`);

type Client = Awaited<ReturnType<typeof sqlClient>>;

// ------------------------------------------------------------------ recording proxy

interface ApplyRecord {
  from: number;
  to: number;
  entries: number;
  status: number;
  applied: boolean | null;
  appliedLsn: number | null;
  reason: string | null;
  pid: number | null;
}

const hex4 = (n: number) => n.toString(16).toUpperCase().padStart(4, '0');

/** The pid (among `pids`) that owns the client end of a loopback TCP connection to `serverPort`. */
async function pidOfPeer(peerPort: number, serverPort: number, pids: () => number[]): Promise<number | null> {
  for (let attempt = 0; attempt < 10; attempt++) {
    let inode: string | null = null;
    for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
      const text = await readFile(table, 'utf8').catch(() => '');
      for (const line of text.split('\n').slice(1)) {
        const f = line.trim().split(/\s+/);
        if (f.length > 9 && f[1].endsWith(`:${hex4(peerPort)}`) && f[2].endsWith(`:${hex4(serverPort)}`)) inode = f[9];
      }
      if (inode) break;
    }
    if (inode && inode !== '0') {
      for (const pid of pids()) {
        const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
        for (const fd of fds) {
          if ((await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '')) === `socket:[${inode}]`) return pid;
        }
      }
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return null;
}

/**
 * An HTTP proxy in front of a secondary: forwards everything, and records each /apply the
 * primary sends (bounds) with the secondary's answer, and how many are in flight at once.
 */
class ApplyRecorder {
  readonly records: ApplyRecord[] = [];
  inFlight = 0;
  maxInFlight = 0;
  target = '';
  port = 0;
  private readonly server: http.Server;
  private readonly peerPid = new WeakMap<Socket, Promise<number | null>>();

  constructor(private readonly pids: () => number[]) {
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.keepAliveTimeout = 60_000;
    this.server.on('connection', (sock: Socket) => {
      const p = pidOfPeer(sock.remotePort!, this.port, this.pids);
      p.catch(() => undefined);
      this.peerPid.set(sock, p);
    });
  }

  async listen(): Promise<void> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as AddressInfo).port;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const body = Buffer.concat(chunks);
    const isApply = req.method === 'POST' && (req.url ?? '').startsWith(APPLY_PATH);
    if (isApply) this.maxInFlight = Math.max(this.maxInFlight, ++this.inFlight);
    try {
      const headers: Record<string, string> = {};
      for (const [k, v] of Object.entries(req.headers)) {
        if (v === undefined || ['host', 'connection', 'content-length', 'transfer-encoding', 'keep-alive'].includes(k)) continue;
        headers[k] = Array.isArray(v) ? v.join(', ') : v;
      }
      const r = await fetch(`${this.target}${req.url}`, {
        method: req.method,
        headers,
        body: req.method === 'GET' || req.method === 'HEAD' ? undefined : body,
        redirect: 'manual',
      });
      const out = Buffer.from(await r.arrayBuffer());
      if (isApply) {
        const sent = JSON.parse(body.toString('utf8'));
        let answer: any = null;
        try {
          answer = JSON.parse(out.toString('utf8'));
        } catch {
          answer = null;
        }
        this.records.push({
          from: Number(sent.from_lsn),
          to: Number(sent.to_lsn),
          entries: Array.isArray(sent.entries) ? sent.entries.length : -1,
          status: r.status,
          applied: typeof answer?.applied === 'boolean' ? answer.applied : null,
          appliedLsn: typeof answer?.applied_lsn === 'number' ? answer.applied_lsn : null,
          reason: answer?.reason ?? null,
          pid: (await this.peerPid.get(req.socket)?.catch(() => null)) ?? null,
        });
      }
      const outHeaders: Record<string, string> = {};
      r.headers.forEach((v, k) => {
        if (!['connection', 'content-length', 'transfer-encoding', 'content-encoding', 'keep-alive'].includes(k)) outHeaders[k] = v;
      });
      res.writeHead(r.status, outHeaders);
      res.end(out);
    } catch (err) {
      res.writeHead(502, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ errors: [`proxy: ${(err as Error).message}`] }));
    } finally {
      if (isApply) this.inFlight--;
    }
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

async function freePort(): Promise<number> {
  const s = http.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

// ------------------------------------------------------------------ state and cleanup

interface Secondary {
  id: string;
  db: TestDatabase;
  proc: CofferProcess;
  /** The secondary's own listener (its api_addr is the proxy). */
  direct: string;
  token: string;
  proxy: ApplyRecorder;
  sql: Client;
  prefix: string;
  /** Primary head just before / after secondary/enable: the bootstrap LSN lies in between. */
  headBefore: number;
  headAfter: number;
}

const dbs: TestDatabase[] = [];
const clients: Client[] = [];
const proxies: ApplyRecorder[] = [];
const prefixes: string[] = [];
let redis: Redis | undefined;
/** The secondaries' start-up, awaited before cleanup (so nothing starts after it). */
let preparing: Promise<unknown> | undefined;

let priDb: TestDatabase;
let priSql: Client;
let priOpts: StartOptions;
let server: CofferProcess;
let root = '';
const workers: CofferProcess[] = [];
const secs: Secondary[] = [];
const primaryPids = () => [server, ...workers].filter(Boolean).map((p) => p.pid);

async function scanKeys(pattern: string): Promise<string[]> {
  const out: string[] = [];
  let cursor = '0';
  do {
    const [next, keys] = await redis!.scan(cursor, 'MATCH', pattern, 'COUNT', 1000);
    out.push(...keys);
    cursor = next;
  } while (cursor !== '0');
  return out;
}

afterAll(async () => {
  await preparing;
  await stopAllCoffers();
  for (const p of proxies) await p.close().catch(() => undefined);
  for (const c of clients) await c.end().catch(() => undefined);
  for (const d of dbs) await d.drop().catch(() => undefined);
  if (redis) {
    for (const prefix of prefixes) {
      const keys = await scanKeys(`${prefix}:*`);
      for (let i = 0; i < keys.length; i += 500) await redis.del(...keys.slice(i, i + 500));
    }
    expect(await scanKeys(`${PREFIX_ROOT}-*`)).toEqual([]);
    redis.disconnect();
  }
}, 60_000);

// ------------------------------------------------------------------ helpers

async function one<T = any>(c: Client, text: string, params: unknown[] = []): Promise<T> {
  return (await c.query(text, params)).rows[0] as T;
}

const head = async () => Number((await one(priSql, 'SELECT last_lsn FROM coffer_wal_head WHERE id = 1')).last_lsn);

async function startWorkers(n: number): Promise<void> {
  const started = await Promise.all(Array.from({ length: n }, () => startCofferWorker(priOpts)));
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
            ? await vault(server.addr, 'POST', `secret/data/${w.path}`, { token: root, body: { data: w.data } })
            : await vault(server.addr, 'DELETE', `secret/data/${w.path}`, { token: root });
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
async function waitConverged(what: string): Promise<number> {
  return waitFor(
    what,
    async () => {
      const unordered = Number((await one(priSql, 'SELECT count(*)::int AS n FROM coffer_wal WHERE lsn IS NULL')).n);
      if (unordered > 0) return null;
      const h = await head();
      const p = (await vault(server.addr, 'GET', 'sys/replication/performance/status')).body.data;
      if (p.last_wal !== h) return null;
      const acked = (await priSql.query('SELECT secondary_id, acked_lsn::bigint AS acked FROM coffer_secondaries')).rows;
      if (acked.length !== secs.length || acked.some((r) => Number(r.acked) !== h)) return null;
      for (const s of secs) {
        const st = (await vault(s.direct, 'GET', 'sys/replication/performance/status')).body.data;
        if (st.last_remote_wal !== h) return null;
      }
      // Nothing moved while we looked.
      return (await head()) === h ? h : null;
    },
    { timeoutMs: 90_000, intervalMs: 200 },
  );
}

const entriesOf = async (c: Client) =>
  (await c.query(`SELECT path, version::bigint::text AS version, encode(value_hash, 'hex') AS hash FROM coffer_entries ORDER BY path`)).rows.map(
    (r) => `${r.path}|${r.version}|${r.hash ?? 'tombstone'}`,
  );

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
  const dense = await one(priSql, 'SELECT count(*)::int AS n, min(lsn)::bigint AS lo, max(lsn)::bigint AS hi FROM coffer_wal WHERE lsn IS NOT NULL');
  expect([Number(dense.n), Number(dense.lo), Number(dense.hi)]).toEqual([h, 1, h]);
  const priEntries = await entriesOf(priSql);
  const priWal = new Set(
    (await priSql.query(`SELECT path, key_version::bigint::text AS v, op, encode(value_hash, 'hex') AS hash FROM coffer_wal`)).rows.map((r) => `${r.path}|${r.v}|${r.op}|${r.hash}`),
  );
  const pidRole = new Map<number, string>([[server.pid, 'server'], ...workers.map((w, i) => [w.pid, `worker${i + 1}`] as [number, string])]);
  const shippedBy: Record<string, number> = {};
  for (const [i, s] of secs.entries()) {
    // Live rows identical to the primary's.
    const mine = await entriesOf(s.sql);
    expect(mine.length).toBe(priEntries.length);
    expect(mine).toEqual(priEntries);
    // (1) At most one WAL row per (path, key_version) on the secondary, each one the primary has.
    const dup = (await s.sql.query('SELECT path, key_version::bigint AS v, count(*)::int AS n FROM coffer_wal GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2 LIMIT 20')).rows;
    expect(dup).toEqual([]);
    const foreign = (await s.sql.query(`SELECT path, key_version::bigint::text AS v, op, encode(value_hash, 'hex') AS hash FROM coffer_wal`)).rows
      .map((r) => `${r.path}|${r.v}|${r.op}|${r.hash}`)
      .filter((k) => !priWal.has(k));
    expect(foreign.slice(0, 20)).toEqual([]);
    // (2) applied_lsn = head; the primary's cursor = head.
    expect(Number((await one(s.sql, 'SELECT applied_lsn::bigint AS a FROM coffer_replication WHERE id = 1')).a)).toBe(h);
    expect(Number((await one(priSql, 'SELECT acked_lsn::bigint AS a FROM coffer_secondaries WHERE secondary_id = $1', [s.id])).a)).toBe(h);
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
async function prepareSecondary(id: string): Promise<Omit<Secondary, 'headBefore' | 'headAfter'>> {
  const db = await createTestDatabase(`rw_${id}`);
  dbs.push(db);
  const prefix = `${PREFIX_ROOT}-${id}`;
  prefixes.push(prefix);
  const proxy = new ApplyRecorder(primaryPids);
  proxies.push(proxy);
  await proxy.listen();
  const port = await freePort();
  const proc = await startCoffer({
    dbUrl: db.url,
    logLevel: 'warn',
    env: { COFFER_FAULTS: '' },
    extraHcl: queueHcl(prefix) + `api_addr = "${proxy.url}"\nlistener "tcp" {\n  address = "127.0.0.1:${port}"\n  tls_disable = true\n}\n`,
  });
  const direct = `http://127.0.0.1:${port}`;
  proxy.target = direct;
  await waitFor(`${id} listening directly`, async () => (await vault(direct, 'GET', 'sys/seal-status')).status === 200);
  const { rootToken } = await initAndUnseal([{ ...proc, addr: direct }]);
  const sql = await sqlClient(db.url);
  clients.push(sql);
  return { id, db, proc, direct, token: rootToken, proxy, sql, prefix };
}

beforeAll(async () => {
  redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 2 });
  await redis.connect();

  // The secondaries' processes start while the primary is set up.
  const prepared = Promise.all(SECONDARIES.map(prepareSecondary));
  preparing = prepared.catch(() => undefined);

  // Primary: static seal (workers auto-unseal), Redis queue, one server process.
  priDb = await createTestDatabase('rw_primary');
  dbs.push(priDb);
  const priPrefix = `${PREFIX_ROOT}-pri`;
  prefixes.push(priPrefix);
  priOpts = { dbUrl: priDb.url, staticSealKeyHex: randomBytes(32).toString('hex'), extraHcl: queueHcl(priPrefix), logLevel: 'warn', env: { COFFER_FAULTS: '' } };
  server = await startCoffer(priOpts);
  const init = await vault(server.addr, 'PUT', 'sys/init', { body: { recovery_shares: 1, recovery_threshold: 1 } });
  expect(init.status).toBe(200);
  expect(init.body.recovery_keys).toHaveLength(1);
  root = init.body.root_token;
  await waitFor('primary unsealed and active', async () => {
    const s = await vault(server.addr, 'GET', 'sys/seal-status');
    return s.body.sealed === false && (await fetch(`${server.addr}/v1/sys/health`, { method: 'HEAD' })).status === 200;
  });
  await mountKv2(server.addr, root);
  priSql = await sqlClient(priDb.url);
  clients.push(priSql);
  expect((await vault(server.addr, 'POST', 'sys/replication/performance/primary/enable', { token: root, body: {} })).status).toBe(200);

  // Three secondaries, each its own database, process, Redis prefix and recording proxy; each
  // enabled with its own activation token.
  for (const p of await prepared) {
    const tok = await vault(server.addr, 'POST', 'sys/replication/performance/primary/secondary-token', { token: root, body: { id: p.id } });
    expect(tok.status).toBe(200);
    const headBefore = await head();
    const en = await vault(p.direct, 'POST', 'sys/replication/performance/secondary/enable', { token: p.token, body: { token: tok.body.wrap_info.token } });
    expect([en.status, en.body.errors]).toEqual([200, undefined]);
    secs.push({ ...p, headBefore, headAfter: await head() });
  }
  for (const s of secs) {
    await waitFor(`${s.id} to stream`, async () => (await vault(s.direct, 'GET', 'sys/replication/performance/status')).body.data.state === 'stream-wals', { timeoutMs: 30_000 });
  }
  const st = (await vault(server.addr, 'GET', 'sys/replication/performance/status')).body.data;
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
}, 140_000);

/**
 * Shared pieces of the performance-replication cluster tests: Redis queue prefixes (scan and
 * delete, never FLUSHALL: the Redis is shared), clusters set up through the API, replicated rows
 * compared in SQL, convergence waits, and a recording proxy in front of a secondary.
 */
import { randomBytes } from 'node:crypto';
import { readdir, readFile, readlink } from 'node:fs/promises';
import http from 'node:http';
import { createServer, type AddressInfo, type Socket } from 'node:net';
import Redis from 'ioredis';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, type CofferProcess, type StartOptions } from './coffer-process';
import { vault } from './http';
import { createTestDatabase, sqlClient, type TestDatabase } from './pg';
import { waitFor } from './wait';

export const REDIS_URL = process.env.COFFER_TEST_REDIS ?? 'redis://127.0.0.1:6379';
export const APPLY_PATH = '/v1/sys/replication/performance/internal/apply';

export type SqlClient = Awaited<ReturnType<typeof sqlClient>>;

/** A cluster's address and a token for it. */
export interface Endpoint {
  addr: string;
  token: string;
}

// ------------------------------------------------------------------ Redis

export const queueHcl = (prefix: string) => `queue "redis" {\n  url = "${REDIS_URL}"\n  prefix = "${prefix}"\n}\n`;

export async function connectRedis(): Promise<Redis> {
  const redis = new Redis(REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 2 });
  await redis.connect();
  return redis;
}

export async function scanKeys(redis: Redis, pattern: string, count = 500): Promise<string[]> {
  const out: string[] = [];
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', pattern, 'COUNT', count);
    out.push(...keys);
    cursor = next;
  } while (cursor !== '0');
  return out;
}

/** Deletes every key under `prefix:`; returns how many there were. */
export async function deletePrefixKeys(redis: Redis, prefix: string, count = 500): Promise<number> {
  const keys = await scanKeys(redis, `${prefix}:*`, count);
  for (let i = 0; i < keys.length; i += 500) await redis.del(...keys.slice(i, i + 500));
  return keys.length;
}

// ------------------------------------------------------------------ processes and clusters

/** A TCP port free right now on 127.0.0.1 (the OS picks it; we release it at once). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

export interface Cluster extends Endpoint {
  p: CofferProcess;
  opts: StartOptions;
  keys: string[];
  db: TestDatabase;
}

export interface ClusterOptions {
  /** Redis queue prefix (a queue "redis" block); none: no queue. */
  prefix?: string;
  logLevel?: string;
  env?: Record<string, string>;
  /** Listen on a fixed free port announced as api_addr (so a restart keeps the address). */
  fixedPort?: boolean;
}

/** One process on a fresh database (registered in `dbs`), initialised and unsealed through the API. */
export async function startCluster(label: string, dbs: TestDatabase[], o: ClusterOptions = {}): Promise<Cluster> {
  const db = await createTestDatabase(label);
  dbs.push(db);
  let extraHcl = '';
  let fixedAddr: string | undefined;
  if (o.fixedPort) {
    const port = await freePort();
    fixedAddr = `http://127.0.0.1:${port}`;
    extraHcl += `api_addr = "${fixedAddr}"\n` + `listener "tcp" {\n  address = "127.0.0.1:${port}"\n  tls_disable = true\n}\n`;
  }
  if (o.prefix) extraHcl += queueHcl(o.prefix);
  const opts: StartOptions = { dbUrl: db.url, env: o.env };
  if (o.logLevel) opts.logLevel = o.logLevel;
  if (extraHcl) opts.extraHcl = extraHcl;
  const p = await startCoffer(opts);
  if (fixedAddr !== undefined) expect(p.addr).toBe(fixedAddr);
  const { rootToken, keys } = await initAndUnseal([p]);
  return { p, opts, token: rootToken, keys, db, addr: p.addr };
}

/** Stops every process, deletes the clusters' Redis keys (checking none is left), drops the databases. */
export async function releaseClusters(redis: Redis | undefined, prefixes: string[], dbs: TestDatabase[]): Promise<void> {
  await stopAllCoffers();
  if (redis) {
    for (const p of prefixes) {
      await deletePrefixKeys(redis, p).catch(() => undefined);
      expect(await scanKeys(redis, `${p}:*`)).toEqual([]);
    }
    redis.disconnect();
  }
  for (const d of dbs) await d.drop();
}

// ------------------------------------------------------------------ replication through the API

export const perfStatus = async (addr: string) => (await vault(addr, 'GET', 'sys/replication/performance/status')).body.data;

export async function enablePrimary(pri: Endpoint): Promise<void> {
  expect((await vault(pri.addr, 'POST', 'sys/replication/performance/primary/enable', { token: pri.token, body: {} })).status).toBe(200);
}

/** An activation token for secondary `id` (the wrapped secondary-token). */
export async function activationToken(pri: Endpoint, id: string): Promise<string> {
  const tok = await vault(pri.addr, 'POST', 'sys/replication/performance/primary/secondary-token', { token: pri.token, body: { id } });
  expect(tok.status).toBe(200);
  return tok.body.wrap_info.token;
}

export async function enableSecondary(sec: Endpoint, activation: string): Promise<void> {
  const en = await vault(sec.addr, 'POST', 'sys/replication/performance/secondary/enable', { token: sec.token, body: { token: activation } });
  expect([en.status, en.body.errors]).toEqual([200, undefined]);
}

export async function waitForStream(addr: string, what: string, opts?: { timeoutMs?: number }): Promise<void> {
  await waitFor(what, async () => (await perfStatus(addr)).state === 'stream-wals', opts);
}

/** kv v2 at secret/ on the primary, primary/enable, secondary `id` enabled, streaming WAL. */
export async function replicatePair(pri: Endpoint, sec: Endpoint, id: string): Promise<void> {
  await mountKv2(pri.addr, pri.token);
  await enablePrimary(pri);
  await enableSecondary(sec, await activationToken(pri, id));
  await waitForStream(sec.addr, 'secondary to stream WAL', { timeoutMs: 30_000 });
}

// ------------------------------------------------------------------ SQL

export async function withSql<T>(url: string, fn: (c: SqlClient) => Promise<T>): Promise<T> {
  const c = await sqlClient(url);
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

export async function one<T = any>(c: SqlClient, text: string, params: unknown[] = []): Promise<T> {
  return (await c.query(text, params)).rows[0] as T;
}

/** The primary's last assigned WAL position. */
export const walHead = async (c: SqlClient) => Number((await one(c, 'SELECT last_lsn FROM coffer_wal_head WHERE id = 1')).last_lsn);

export const unorderedWal = (url: string) => withSql(url, async (c) => (await c.query<{ n: number }>(`SELECT count(*)::int AS n FROM coffer_wal WHERE lsn IS NULL`)).rows[0].n);

/** Live replicated rows: path → "version:value_hash". */
export const liveRows = (url: string) =>
  withSql(url, async (c) => {
    const { rows } = await c.query<{ path: string; version: string; h: string }>(
      `SELECT path, version::text AS version, encode(value_hash, 'hex') AS h FROM coffer_entries WHERE value IS NOT NULL ORDER BY path`,
    );
    return new Map(rows.map((r) => [r.path, `${r.version}:${r.h}`]));
  });

/** Differences between two row sets, summarised (a 20k-row toEqual diff is unreadable). */
export function diffRows(a: Map<string, string>, b: Map<string, string>) {
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

/** Every coffer_entries row (tombstones too) as "path|version|value_hash". */
export const entriesOf = async (c: SqlClient) =>
  (await c.query(`SELECT path, version::bigint::text AS version, encode(value_hash, 'hex') AS hash FROM coffer_entries ORDER BY path`)).rows.map(
    (r) => `${r.path}|${r.version}|${r.hash ?? 'tombstone'}`,
  );

/** Every WAL row as "path|key_version|op|value_hash". */
export const walRows = async (c: SqlClient): Promise<string[]> =>
  (await c.query(`SELECT path, key_version::bigint::text AS v, op, encode(value_hash, 'hex') AS hash FROM coffer_wal`)).rows.map((r) => `${r.path}|${r.v}|${r.op}|${r.hash}`);

/** The primary's WAL is dense up to the head. */
export async function expectWalDense(priSql: SqlClient, h: number): Promise<void> {
  const dense = await one(priSql, 'SELECT count(*)::int AS n, min(lsn)::bigint AS lo, max(lsn)::bigint AS hi FROM coffer_wal WHERE lsn IS NOT NULL');
  expect([Number(dense.n), Number(dense.lo), Number(dense.hi)]).toEqual([h, 1, h]);
}

/** At most one WAL row per (path, key_version) on the secondary, each one the primary has. */
export async function expectNoDoubleApply(secSql: SqlClient, priWal: Set<string>): Promise<void> {
  expect((await secSql.query('SELECT path, key_version::bigint AS v, count(*)::int AS n FROM coffer_wal GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2 LIMIT 20')).rows).toEqual([]);
  const foreign = (await walRows(secSql)).filter((k) => !priWal.has(k));
  expect(foreign.slice(0, 20)).toEqual([]);
}

/** The secondary's applied_lsn = head; the primary's cursor for it = head. */
export async function expectCursorsAt(priSql: SqlClient, secSql: SqlClient, id: string, h: number): Promise<void> {
  expect(Number((await one(secSql, 'SELECT applied_lsn::bigint AS a FROM coffer_replication WHERE id = 1')).a)).toBe(h);
  // The primary records the acknowledgement just after the secondary's apply answers: wait for it.
  const acked = async () => Number((await one(priSql, 'SELECT acked_lsn::bigint AS a FROM coffer_secondaries WHERE secondary_id = $1', [id])).a);
  await waitFor(`the primary's cursor for ${id} to reach ${h}`, async () => (await acked()) === h, { timeoutMs: 10_000 }).catch(() => undefined);
  expect(await acked()).toBe(h);
}

// ------------------------------------------------------------------ convergence

/**
 * Waits until the primary has no unordered WAL and the secondary's last_remote_wal equals the
 * primary's last_wal (and, with `nonEmpty`, last_wal > 0); returns both statuses.
 */
export async function waitForCatchUp(
  what: string,
  pri: { addr: string; dbUrl: string },
  secAddr: string,
  { timeoutMs, nonEmpty = false }: { timeoutMs: number; nonEmpty?: boolean },
): Promise<{ p: any; s: any }> {
  return waitFor(
    what,
    async () => {
      if ((await unorderedWal(pri.dbUrl)) !== 0) return null;
      const p = await perfStatus(pri.addr);
      const s = await perfStatus(secAddr);
      return (!nonEmpty || p.last_wal > 0) && s.last_remote_wal === p.last_wal ? { p, s } : null;
    },
    { timeoutMs, intervalMs: 100 },
  );
}

/**
 * Every secondary caught up with the primary's head, by the API and in SQL, both sides: no
 * unordered WAL, last_wal = head, every cursor = head, every last_remote_wal = head, and the head
 * did not move while we looked. Returns the head.
 */
export async function waitAllConverged(what: string, priAddr: string, priSql: SqlClient, secondaryAddrs: string[], timeoutMs: number): Promise<number> {
  return waitFor(
    what,
    async () => {
      if (Number((await one(priSql, 'SELECT count(*)::int AS n FROM coffer_wal WHERE lsn IS NULL')).n) > 0) return null;
      const h = await walHead(priSql);
      if ((await perfStatus(priAddr)).last_wal !== h) return null;
      const acked = (await priSql.query('SELECT acked_lsn::bigint AS a FROM coffer_secondaries')).rows;
      if (acked.length !== secondaryAddrs.length || acked.some((r) => Number(r.a) !== h)) return null;
      for (const addr of secondaryAddrs) if ((await perfStatus(addr)).last_remote_wal !== h) return null;
      return (await walHead(priSql)) === h ? h : null;
    },
    { timeoutMs, intervalMs: 200 },
  );
}

// ------------------------------------------------------------------ recording proxy

export interface ApplyRecord {
  at: number;
  from: number;
  to: number;
  entries: number;
  status: number;
  applied: boolean | null;
  appliedLsn: number | null;
  reason: string | null;
  /** The process that sent the batch (when the recorder was given the candidate pids). */
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
 * primary sends (bounds) with the secondary's answer, and how many are in flight at once. Given
 * `pids`, it also tells which of those processes sent each batch (by the peer socket's owner in
 * /proc).
 */
export class ApplyRecorder {
  readonly records: ApplyRecord[] = [];
  inFlight = 0;
  maxInFlight = 0;
  target = '';
  port = 0;
  private readonly server: http.Server;
  private readonly peerPid = new WeakMap<Socket, Promise<number | null>>();

  constructor(opts: { pids?: () => number[]; keepAliveTimeoutMs?: number } = {}) {
    this.server = http.createServer((req, res) => void this.handle(req, res));
    if (opts.keepAliveTimeoutMs !== undefined) this.server.keepAliveTimeout = opts.keepAliveTimeoutMs;
    const pids = opts.pids;
    if (pids) {
      this.server.on('connection', (sock: Socket) => {
        const p = pidOfPeer(sock.remotePort!, this.port, pids);
        p.catch(() => undefined);
        this.peerPid.set(sock, p);
      });
    }
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
        const peer = this.peerPid.get(req.socket);
        this.records.push({
          at: Date.now(),
          from: Number(sent.from_lsn),
          to: Number(sent.to_lsn),
          entries: Array.isArray(sent.entries) ? sent.entries.length : -1,
          status: r.status,
          applied: typeof answer?.applied === 'boolean' ? answer.applied : null,
          appliedLsn: typeof answer?.applied_lsn === 'number' ? answer.applied_lsn : null,
          reason: answer?.reason ?? null,
          pid: peer ? ((await peer.catch(() => null)) ?? null) : null,
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

// ------------------------------------------------------------------ primary with workers, proxied secondaries

/** What a multi-secondary test registers for cleanup (see releaseProxied). */
export interface Tracked {
  dbs: TestDatabase[];
  clients: SqlClient[];
  proxies: ApplyRecorder[];
  prefixes: string[];
  redis?: Redis;
  /** The secondaries' start-up, awaited before cleanup (so nothing starts after it). */
  preparing?: Promise<unknown>;
}

export const tracked = (): Tracked => ({ dbs: [], clients: [], proxies: [], prefixes: [] });

export interface StaticSealPrimary {
  db: TestDatabase;
  /** Start options, for `coffer worker` processes of the same cluster. */
  opts: StartOptions;
  server: CofferProcess;
  root: string;
  recoveryKeys: string[];
  sql: SqlClient;
}

/**
 * A primary that worker processes can join: static seal (they auto-unseal), Redis queue under
 * `prefix`, one fault-free server process; initialised, active, kv v2 at secret/, primary/enable.
 */
export async function startStaticSealPrimary(dbLabel: string, prefix: string, t: Tracked): Promise<StaticSealPrimary> {
  const db = await createTestDatabase(dbLabel);
  t.dbs.push(db);
  t.prefixes.push(prefix);
  const opts: StartOptions = { dbUrl: db.url, staticSealKeyHex: randomBytes(32).toString('hex'), extraHcl: queueHcl(prefix), logLevel: 'warn', env: { COFFER_FAULTS: '' } };
  const server = await startCoffer(opts);
  const init = await vault(server.addr, 'PUT', 'sys/init', { body: { recovery_shares: 1, recovery_threshold: 1 } });
  expect(init.status).toBe(200);
  const root: string = init.body.root_token;
  await waitFor('primary unsealed and active', async () => {
    const s = await vault(server.addr, 'GET', 'sys/seal-status');
    return s.body.sealed === false && (await fetch(`${server.addr}/v1/sys/health`, { method: 'HEAD' })).status === 200;
  });
  await mountKv2(server.addr, root);
  const sql = await sqlClient(db.url);
  t.clients.push(sql);
  await enablePrimary({ addr: server.addr, token: root });
  return { db, opts, server, root, recoveryKeys: init.body.recovery_keys, sql };
}

export interface ProxiedSecondary {
  id: string;
  db: TestDatabase;
  proc: CofferProcess;
  /** The secondary's own listener (its api_addr is the proxy). */
  direct: string;
  token: string;
  proxy: ApplyRecorder;
  sql: SqlClient;
  prefix: string;
}

/** A secondary-to-be: own database, Redis prefix, process whose api_addr is `proxy`; initialised. */
export async function startProxiedSecondary(
  id: string,
  o: { dbLabel: string; prefix: string; proxy: ApplyRecorder; listeningWhat: string },
  t: Tracked,
): Promise<ProxiedSecondary> {
  const db = await createTestDatabase(o.dbLabel);
  t.dbs.push(db);
  t.prefixes.push(o.prefix);
  const proxy = o.proxy;
  t.proxies.push(proxy);
  await proxy.listen();
  const port = await freePort();
  const proc = await startCoffer({
    dbUrl: db.url,
    logLevel: 'warn',
    env: { COFFER_FAULTS: '' },
    extraHcl: queueHcl(o.prefix) + `api_addr = "${proxy.url}"\nlistener "tcp" {\n  address = "127.0.0.1:${port}"\n  tls_disable = true\n}\n`,
  });
  const direct = `http://127.0.0.1:${port}`;
  proxy.target = direct;
  await waitFor(o.listeningWhat, async () => (await vault(direct, 'GET', 'sys/seal-status')).status === 200);
  const { rootToken } = await initAndUnseal([{ ...proc, addr: direct }]);
  const sql = await sqlClient(db.url);
  t.clients.push(sql);
  return { id, db, proc, direct, token: rootToken, proxy, sql, prefix: o.prefix };
}

export type EnabledSecondary<S extends ProxiedSecondary> = S & {
  /** Primary head just before / after secondary/enable: the bootstrap LSN lies in between. */
  headBefore: number;
  headAfter: number;
};

/** Enables each secondary with its own activation token (pushing it to `into`), then waits for all to stream. */
export async function enableSecondaries<S extends ProxiedSecondary>(pri: StaticSealPrimary, prepared: S[], into: EnabledSecondary<S>[]): Promise<void> {
  for (const p of prepared) {
    const activation = await activationToken({ addr: pri.server.addr, token: pri.root }, p.id);
    const headBefore = await walHead(pri.sql);
    await enableSecondary({ addr: p.direct, token: p.token }, activation);
    into.push({ ...p, headBefore, headAfter: await walHead(pri.sql) });
  }
  for (const s of into) await waitForStream(s.direct, `${s.id} to stream`, { timeoutMs: 30_000 });
}

/**
 * Redis, then the secondaries' processes (started while the primary is set up), a static-seal
 * primary (startStaticSealPrimary) and the secondaries enabled with their own activation tokens
 * (pushed to `into`), all streaming.
 */
export async function startPrimaryAndSecondaries<S extends ProxiedSecondary>(
  t: Tracked,
  o: { ids: string[]; prepare: (id: string) => Promise<S>; primaryLabel: string; primaryPrefix: string; onPrimary?: (pri: StaticSealPrimary) => void },
  into: EnabledSecondary<S>[],
): Promise<StaticSealPrimary> {
  t.redis = await connectRedis();
  const prepared = Promise.all(o.ids.map(o.prepare));
  t.preparing = prepared.catch(() => undefined);
  const pri = await startStaticSealPrimary(o.primaryLabel, o.primaryPrefix, t);
  o.onPrimary?.(pri);
  await enableSecondaries(pri, await prepared, into);
  return pri;
}

/**
 * Cleanup after startPrimaryAndSecondaries: waits for the secondaries' start-up, runs
 * `beforeStop`, stops every process, closes proxies and clients, drops the databases, deletes the
 * Redis keys; every key under `prefixRoot-` must be gone.
 */
export async function releaseProxied(t: Tracked, prefixRoot: string, beforeStop?: () => Promise<void>): Promise<void> {
  await t.preparing;
  await beforeStop?.();
  await stopAllCoffers();
  for (const p of t.proxies) await p.close().catch(() => undefined);
  for (const c of t.clients) await c.end().catch(() => undefined);
  for (const d of t.dbs) await d.drop().catch(() => undefined);
  const redis = t.redis;
  if (redis) {
    for (const prefix of t.prefixes) await deletePrefixKeys(redis, prefix, 1000);
    expect(await scanKeys(redis, `${prefixRoot}-*`, 1000)).toEqual([]);
    redis.disconnect();
  }
}

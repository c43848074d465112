/**
 * Shared pieces of the merkle cluster tests (merkle-reconcile, wal-retention,
 * merkle-endpoints): clusters started with extra HCL (WAL bounds, merkle timings) on a fixed
 * address, restarts, Prometheus figures, a counting proxy in front of a primary (what a
 * secondary's merkle-diff / merkle-sync cost: round trips and bytes), a state recorder and a
 * background writer.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { initAndUnseal, startCoffer, unseal, type StartOptions } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { createTestDatabase, type TestDatabase } from '../helpers/pg';
import { freePort, one, queueHcl, withSql, type Cluster } from '../helpers/replication';
import { waitFor } from '../helpers/wait';

export const INTERNAL = '/v1/sys/replication/performance/internal';

/**
 * One process on a fresh database (registered in `dbs`), listening on a fixed free port
 * announced as its api_addr (so a restart keeps the address), with `extraHcl` appended to its
 * config; initialised and unsealed through the API.
 */
export async function startClusterWith(label: string, dbs: TestDatabase[], o: { prefix?: string; extraHcl?: string; logLevel?: string } = {}): Promise<Cluster> {
  const db = await createTestDatabase(label);
  dbs.push(db);
  const port = await freePort();
  const addr = `http://127.0.0.1:${port}`;
  const opts: StartOptions = {
    dbUrl: db.url,
    port,
    logLevel: o.logLevel ?? 'warn',
    env: { COFFER_FAULTS: '' },
    extraHcl: `api_addr = "${addr}"\n` + (o.prefix ? queueHcl(o.prefix) : '') + (o.extraHcl ?? ''),
  };
  const p = await startCoffer(opts);
  expect(p.addr).toBe(addr);
  const { rootToken, keys } = await initAndUnseal([p]);
  return { p, opts, token: rootToken, keys, db, addr };
}

/** Restarts a cluster's (killed) process on the same database and address, and unseals it. */
export async function restart(c: Cluster): Promise<void> {
  c.p = await startCoffer(c.opts);
  expect(c.p.addr).toBe(c.addr);
  await unseal(c.p, c.keys);
}

/** KV version 1 at `path`/ (one storage entry per key: the key counts below are exact). */
export async function mountKv1(addr: string, token: string, path = 'kv'): Promise<void> {
  const r = await vault(addr, 'POST', `sys/mounts/${path}`, { token, body: { type: 'kv', options: { version: '1' } } });
  expect([r.status, r.body?.errors]).toEqual([204, undefined]);
}

/** Writes `paths` with `value(path)`, `concurrency` at a time; every write must be acknowledged. */
export async function writeAll(addr: string, token: string, paths: string[], value: (path: string) => Record<string, unknown>, concurrency = 8): Promise<void> {
  let next = 0;
  const failures: string[] = [];
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < paths.length) {
        const path = paths[next++];
        const r = await vault(addr, 'POST', path, { token, body: value(path) });
        if (r.status !== 204 && r.status !== 200) failures.push(`${path}: ${r.status} ${JSON.stringify(r.body).slice(0, 200)}`);
      }
    }),
  );
  expect(failures).toEqual([]);
}

// ------------------------------------------------------------------ metrics

/** The Prometheus text of a cluster. */
export async function prometheus(addr: string, token: string): Promise<string> {
  const r = await fetch(`${addr}/v1/sys/metrics?format=prometheus`, { headers: { 'X-Vault-Token': token } });
  expect(r.status).toBe(200);
  return r.text();
}

/** The value of an unlabelled series (null when absent). */
export function series(text: string, name: string): number | null {
  const m = new RegExp(`^${name} ([0-9.e+-]+)$`, 'm').exec(text);
  return m ? Number(m[1]) : null;
}

export const metric = async (addr: string, token: string, name: string) => series(await prometheus(addr, token), name);

// ------------------------------------------------------------------ SQL views of the merkle index

/** The primary's record of a secondary (status, acked_lsn), by SQL. */
export const secondaryRow = (url: string, id: string) =>
  withSql(url, (c) => one<{ status: string; acked_lsn: string; last_error: string | null }>(c, 'SELECT status, acked_lsn::bigint::text AS acked_lsn, last_error FROM coffer_secondaries WHERE secondary_id = $1', [id]));

/** Oldest and newest ordered WAL position retained, ordered rows and their counted bytes. */
export const walRetained = (url: string) =>
  withSql(url, async (c) => {
    const r = await one(
      c,
      `SELECT min(lsn)::bigint AS lo, max(lsn)::bigint AS hi, count(*)::int AS n, coalesce(sum(value_size + 128), 0)::bigint AS bytes,
              (SELECT last_lsn FROM coffer_wal_head WHERE id = 1)::bigint AS head,
              (SELECT count(*)::int FROM coffer_wal WHERE lsn IS NULL) AS unordered
         FROM coffer_wal WHERE lsn IS NOT NULL`,
    );
    return { lo: r.lo === null ? null : Number(r.lo), hi: r.hi === null ? null : Number(r.hi), rows: Number(r.n), bytes: Number(r.bytes), head: Number(r.head), unordered: Number(r.unordered) };
  });

/**
 * Waits until the active node's index is fully flushed and checkpointed at the WAL head: no
 * unordered WAL, the checkpoint at the head with an empty dirty-page table.
 */
export async function waitFlushedAt(url: string, what: string, timeoutMs = 20_000): Promise<number> {
  return waitFor(
    what,
    () =>
      withSql(url, async (c) => {
        const r = await one(
          c,
          `SELECT (SELECT last_lsn FROM coffer_wal_head WHERE id = 1)::bigint AS head,
                  (SELECT count(*)::int FROM coffer_wal WHERE lsn IS NULL) AS unordered,
                  c.checkpoint_lsn::bigint AS cp, (SELECT count(*)::int FROM jsonb_object_keys(c.dirty)) AS dirty
             FROM coffer_merkle_checkpoint c WHERE id = 1`,
        );
        if (!r) return null;
        return Number(r.unordered) === 0 && Number(r.dirty) === 0 && Number(r.cp) === Number(r.head) ? Number(r.head) : null;
      }),
    { timeoutMs, intervalMs: 100 },
  );
}

// ------------------------------------------------------------------ counting proxy

export interface ProxiedCall {
  at: number;
  method: string;
  path: string;
  status: number;
  reqBytes: number;
  resBytes: number;
}

/**
 * An HTTP proxy in front of a primary (a secondary is enabled with primary_api_addr = its url):
 * forwards everything and records each call's path, status and bytes both ways. `gate`, when
 * set, is awaited before a call is forwarded ('request') and before its answer is returned
 * ('response'): a test holds a call there until a condition it needs is true.
 */
export class CountingProxy {
  readonly calls: ProxiedCall[] = [];
  gate: ((phase: 'request' | 'response', path: string) => Promise<void>) | null = null;
  private readonly server: http.Server;
  port = 0;

  constructor(public target: string) {
    this.server = http.createServer((req, res) => void this.handle(req, res));
  }

  async listen(): Promise<void> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as AddressInfo).port;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Calls to an internal endpoint (`merkle-diff`, `merkle-sync`, ...) recorded after `since`. */
  internal(name: string, since = 0): ProxiedCall[] {
    return this.calls.filter((c) => c.path === `${INTERNAL}/${name}` && c.at >= since);
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const body = Buffer.concat(chunks);
    const path = (req.url ?? '').split('?')[0];
    try {
      if (this.gate) await this.gate('request', path);
      const headers: Record<string, string> = {};
      for (const [k, v] of Object.entries(req.headers)) {
        if (v === undefined || ['host', 'connection', 'content-length', 'transfer-encoding', 'keep-alive'].includes(k)) continue;
        headers[k] = Array.isArray(v) ? v.join(', ') : v;
      }
      const r = await fetch(`${this.target}${req.url}`, { method: req.method, headers, body: req.method === 'GET' || req.method === 'HEAD' ? undefined : body, redirect: 'manual' });
      const out = Buffer.from(await r.arrayBuffer());
      if (this.gate) await this.gate('response', path);
      this.calls.push({ at: Date.now(), method: req.method ?? '', path, status: r.status, reqBytes: body.length, resBytes: out.length });
      const outHeaders: Record<string, string> = {};
      r.headers.forEach((v, k) => {
        if (!['connection', 'content-length', 'transfer-encoding', 'content-encoding', 'keep-alive'].includes(k)) outHeaders[k] = v;
      });
      res.writeHead(r.status, outHeaders);
      res.end(out);
    } catch (err) {
      res.writeHead(502, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ errors: [`proxy: ${(err as Error).message}`] }));
    }
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

// ------------------------------------------------------------------ recorders

/**
 * Polls `probe` until stopped and keeps the sequence of distinct values it returned (errors
 * recorded as "error"): the states a secondary passed through, as far as polling can see.
 */
export class StateRecorder {
  readonly seen: string[] = [];
  private stopped = false;
  private readonly loop: Promise<void>;

  constructor(
    private readonly probe: () => Promise<string>,
    intervalMs = 10,
  ) {
    this.loop = (async () => {
      while (!this.stopped) {
        const v = await this.probe().catch(() => 'error');
        if (this.seen[this.seen.length - 1] !== v) this.seen.push(v);
        await new Promise((r) => setTimeout(r, intervalMs));
      }
    })();
  }

  /** Stops polling; the last value is one read after the call (not a probe begun earlier). */
  async stop(): Promise<string[]> {
    this.stopped = true;
    await this.loop;
    const v = await this.probe().catch(() => 'error');
    if (this.seen[this.seen.length - 1] !== v) this.seen.push(v);
    return this.seen;
  }
}

/** Writers on one cluster until stopped: each write a new key; records what was acknowledged. */
export class Writer {
  readonly acked = new Map<string, Record<string, unknown>>();
  readonly failures: string[] = [];
  private stopped = false;
  private n = 0;
  private readonly loops: Promise<void>[];

  constructor(
    private readonly addr: string,
    private readonly token: string,
    private readonly prefix: string,
    writers = 2,
    /** Pause after each write (paces the load; 0: as fast as acknowledged). */
    private readonly pauseMs = 0,
  ) {
    this.loops = Array.from({ length: writers }, () => this.loop());
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      const n = this.n++;
      const path = `${this.prefix}/${n}`;
      const value = { n, at: Date.now() };
      const r = await vault(this.addr, 'POST', path, { token: this.token, body: value }).catch((err: Error) => ({ status: -1, body: err.message }));
      if (r.status === 204 || r.status === 200) this.acked.set(path, value);
      else this.failures.push(`${path}: ${r.status} ${JSON.stringify(r.body).slice(0, 300)}`);
      if (this.pauseMs > 0) await new Promise((res) => setTimeout(res, this.pauseMs));
    }
  }

  get count(): number {
    return this.acked.size;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
  }
}

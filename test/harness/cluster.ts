/**
 * Clusters of real processes for fault scenarios: N clusters, each of M `coffer server` processes
 * (+ optional `coffer worker` processes) on its own database and Redis prefix, with a static seal
 * so that any process can be killed -9 and restarted unattended, on the same address.
 *
 * Inter-cluster traffic goes through fault proxies (test/harness/fault-proxy.ts):
 *  - a secondary's servers each announce a proxy as their api_addr: the primary's pushes
 *    (/apply) go through it ("downlink");
 *  - a secondary is enabled with primary_api_addr = its own proxy in front of the primary's
 *    servers (fail-over between them): heartbeats, forwarded writes, merkle-diff/-sync go
 *    through it ("uplink").
 * So `partition(secondary)` cuts exactly the links between that secondary and the primary;
 * clients keep talking to every process directly.
 *
 * A cluster may also reach its Postgres through a fault proxy (`pgProxy`): cutting it is a
 * Postgres outage for that cluster alone (open connections reset, new ones refused: what a
 * crashed Postgres looks like to a client), without touching the shared local server. The
 * alternative `blockDatabase()` (ALTER DATABASE … ALLOW_CONNECTIONS false + pg_terminate_backend)
 * is also here; it answers new connections with SQLSTATE 55000 rather than a refusal, which is
 * not what a real outage looks like, so the scenarios use the proxy.
 *
 * Redis loss is the deletion of a cluster's prefix keys (SCAN + DEL; never FLUSHALL: the Redis
 * is shared). Everything is bounded in time and undone by `FaultHarness.cleanup()`.
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import { startCoffer, startCofferWorker, stopAllCoffers, type CofferProcess, type StartOptions } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { createTestDatabase, PG_ADMIN_URL, sqlClient, type TestDatabase } from '../helpers/pg';
import { connectRedis, deletePrefixKeys, freePort, perfStatus, queueHcl, scanKeys, type SqlClient } from '../helpers/replication';
import { waitFor } from '../helpers/wait';
import { FaultProxy, parseHostPort, type Rng } from './fault-proxy';

export type ProcessKind = 'server' | 'worker';

export interface Node {
  cluster: FaultCluster;
  kind: ProcessKind;
  name: string;
  /** Servers: the fixed listen port and direct address (kept across restarts). */
  port: number;
  direct: string;
  /** Secondaries' servers: the proxy announced as api_addr (the primary pushes through it). */
  proxy: FaultProxy | null;
  opts: StartOptions;
  proc: CofferProcess | null;
  starts: number;
}

export interface ClusterOptions {
  servers?: number;
  workers?: number;
  /** HCL appended to every process's config (replication { … }, merkle { … }). */
  extraHcl?: string;
  /** Announce a per-server fault proxy as api_addr (for secondaries). */
  proxiedApi?: boolean;
  /** Reach Postgres through a fault proxy (for Postgres outages). */
  pgProxy?: boolean;
}

export class FaultCluster {
  readonly nodes: Node[] = [];
  root = '';
  sql!: SqlClient;
  pgProxy: FaultProxy | null = null;
  /** The uplink proxy of a secondary (primary_api_addr), set by `FaultHarness.replicate`. */
  uplink: FaultProxy | null = null;
  private blocked = false;

  constructor(
    readonly h: FaultHarness,
    readonly name: string,
    readonly db: TestDatabase,
    readonly prefix: string,
    readonly sealKeyHex: string,
  ) {}

  get servers(): Node[] {
    return this.nodes.filter((n) => n.kind === 'server');
  }

  get workers(): Node[] {
    return this.nodes.filter((n) => n.kind === 'worker');
  }

  /** Direct addresses of the servers currently running. */
  liveAddrs(): string[] {
    return this.servers.filter((n) => n.proc).map((n) => n.direct);
  }

  /** The first running server's address. */
  get addr(): string {
    const a = this.liveAddrs()[0];
    if (!a) throw new Error(`${this.name}: no server running`);
    return a;
  }

  pids(): number[] {
    return this.nodes.filter((n) => n.proc).map((n) => n.proc!.pid);
  }

  async addNode(kind: ProcessKind, o: ClusterOptions): Promise<Node> {
    const index = this.nodes.filter((n) => n.kind === kind).length;
    const name = `${this.name}-${kind}${index}`;
    const dbUrl = this.pgProxy ? withPort(this.db.url, this.pgProxy.port) : this.db.url;
    let port = 0;
    let direct = '';
    let proxy: FaultProxy | null = null;
    let apiHcl = '';
    if (kind === 'server') {
      port = await freePort();
      direct = `http://127.0.0.1:${port}`;
      if (o.proxiedApi) {
        proxy = this.h.proxy([direct], `${name}-in`);
        await proxy.listen();
      }
      apiHcl = `api_addr = "${proxy ? proxy.url : direct}"\n`;
    }
    const opts: StartOptions = {
      dbUrl,
      port: kind === 'server' ? port : undefined,
      staticSealKeyHex: this.sealKeyHex,
      logLevel: 'warn',
      env: { COFFER_FAULTS: '' },
      extraHcl: apiHcl + queueHcl(this.prefix) + (o.extraHcl ?? ''),
    };
    const node: Node = { cluster: this, kind, name, port, direct, proxy, opts, proc: null, starts: 0 };
    this.nodes.push(node);
    await this.start(node);
    return node;
  }

  /** Starts a stopped node (same config, same address); a server is waited on until unsealed (once initialised). */
  async start(node: Node): Promise<void> {
    if (node.proc) throw new Error(`${node.name} is running`);
    node.proc = node.kind === 'server' ? await startCoffer(node.opts) : await startCofferWorker(node.opts);
    node.starts++;
    if (node.kind === 'server' && this.root) await this.waitUnsealed(node);
  }

  async waitUnsealed(node: Node, timeoutMs = 20_000): Promise<void> {
    await waitFor(`${node.name} unsealed`, async () => (await vault(node.direct, 'GET', 'sys/seal-status')).body?.sealed === false, { timeoutMs, intervalMs: 50 });
  }

  /** kill -9 (or another signal); resolves with the exit code once it exited. */
  async kill(node: Node, signal: NodeJS.Signals = 'SIGKILL'): Promise<number | null> {
    const p = node.proc;
    if (!p) return null;
    const code = await p.kill(signal);
    node.proc = null;
    return code;
  }

  async restart(node: Node, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    await this.kill(node, signal);
    await this.start(node);
  }

  /** Starts another `coffer worker` process. */
  addWorker(): Promise<Node> {
    return this.addNode('worker', { extraHcl: this.extraHcl });
  }

  /** Stops (SIGTERM by default) and forgets the last running worker process. */
  async removeWorker(signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
    const w = [...this.workers].reverse().find((n) => n.proc);
    if (!w) return;
    await this.kill(w, signal);
    this.nodes.splice(this.nodes.indexOf(w), 1);
  }

  extraHcl = '';

  // ------------------------------------------------------------------ Postgres and Redis faults

  /** Postgres outage through the cluster's pg proxy: open connections reset, new ones refused. */
  async pgDown(): Promise<void> {
    if (!this.pgProxy) throw new Error(`${this.name} was not started with pgProxy`);
    await this.pgProxy.cut();
  }

  async pgUp(): Promise<void> {
    await this.pgProxy!.heal();
  }

  /**
   * The other way to take a database away from one cluster on a shared server: refuse new
   * connections to it and terminate its backends (the harness's own admin connection is to the
   * `postgres` database, so it is unaffected). Undo with `unblockDatabase()`; cleanup undoes it too.
   */
  async blockDatabase(): Promise<number> {
    this.blocked = true;
    return adminQuery(async (c) => {
      await c.query(`ALTER DATABASE ${this.db.name} ALLOW_CONNECTIONS false`);
      const r = await c.query('SELECT count(*)::int AS n FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()) t', [this.db.name]);
      return r.rows[0].n as number;
    });
  }

  async unblockDatabase(): Promise<void> {
    if (!this.blocked) return;
    await adminQuery((c) => c.query(`ALTER DATABASE ${this.db.name} ALLOW_CONNECTIONS true`));
    this.blocked = false;
  }

  /** Redis loss for this cluster: every key under its prefix deleted. Returns how many. */
  redisLoss(): Promise<number> {
    return deletePrefixKeys(this.h.redis, this.prefix, 1000);
  }
}

async function adminQuery<T>(fn: (c: SqlClient) => Promise<T>): Promise<T> {
  const c = await sqlClient(PG_ADMIN_URL);
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

function withPort(url: string, port: number): string {
  const u = new URL(url);
  u.port = String(port);
  return u.toString();
}

/** The clusters, proxies, databases and Redis prefixes of one test file, and their cleanup. */
export class FaultHarness {
  readonly run = randomBytes(4).toString('hex');
  readonly clusters: FaultCluster[] = [];
  readonly proxies: FaultProxy[] = [];
  redis!: Redis;
  private redisReady: Promise<Redis> | null = null;

  constructor(
    readonly label: string,
    readonly rng: Rng,
  ) {}

  prefixRoot(): string {
    return `coffer-test-${this.label}-${this.run}`;
  }

  proxy(targets: string[], name: string): FaultProxy {
    const p = new FaultProxy(targets.map(parseHostPort), this.rng, name);
    this.proxies.push(p);
    return p;
  }

  /** A cluster of `servers` servers and `workers` worker processes, initialised (static seal) and unsealed. */
  async cluster(name: string, o: ClusterOptions = {}): Promise<FaultCluster> {
    // One connection, however many clusters start at once (a second one would leak).
    this.redisReady ??= connectRedis().then((r) => (this.redis = r));
    await this.redisReady;
    const db = await createTestDatabase(`${this.label}_${name}`);
    const c = new FaultCluster(this, name, db, `${this.prefixRoot()}-${name}`, randomBytes(32).toString('hex'));
    c.extraHcl = o.extraHcl ?? '';
    this.clusters.push(c);
    if (o.pgProxy) {
      c.pgProxy = this.proxy([`tcp://${new URL(db.url).host}`], `${name}-pg`);
      await c.pgProxy.listen();
    }
    const first = await c.addNode('server', o);
    const init = await vault(first.direct, 'PUT', 'sys/init', { body: { recovery_shares: 1, recovery_threshold: 1 } });
    if (init.status !== 200) throw new Error(`${name}: init failed: ${init.status} ${JSON.stringify(init.body)}`);
    c.root = init.body.root_token;
    await c.waitUnsealed(first);
    for (let i = 1; i < (o.servers ?? 1); i++) await c.addNode('server', o);
    for (let i = 0; i < (o.workers ?? 0); i++) await c.addNode('worker', o);
    c.sql = await sqlClient(db.url);
    return c;
  }

  /** primary/enable on `pri` (once), then `sec` enabled through its own uplink proxy; waits for stream-wals. */
  async replicate(pri: FaultCluster, sec: FaultCluster, id = sec.name): Promise<void> {
    const st = await perfStatus(pri.addr);
    if (st.mode !== 'primary') {
      const en = await vault(pri.addr, 'POST', 'sys/replication/performance/primary/enable', { token: pri.root, body: {} });
      if (en.status !== 200) throw new Error(`primary/enable: ${en.status} ${JSON.stringify(en.body)}`);
    }
    const tok = await vault(pri.addr, 'POST', 'sys/replication/performance/primary/secondary-token', { token: pri.root, body: { id } });
    if (tok.status !== 200) throw new Error(`secondary-token: ${tok.status} ${JSON.stringify(tok.body)}`);
    sec.uplink = this.proxy(pri.servers.map((n) => n.direct), `${sec.name}-up`);
    await sec.uplink.listen();
    const en = await vault(sec.addr, 'POST', 'sys/replication/performance/secondary/enable', {
      token: sec.root,
      body: { token: tok.body.wrap_info.token, primary_api_addr: sec.uplink.url },
    });
    if (en.status !== 200) throw new Error(`secondary/enable: ${en.status} ${JSON.stringify(en.body)}`);
    await waitFor(`${sec.name} to stream`, async () => (await perfStatus(sec.addr)).state === 'stream-wals', { timeoutMs: 30_000 });
  }

  /** Cuts every link between a secondary and its primary (uplink and the downlink proxies). */
  async partition(sec: FaultCluster): Promise<void> {
    await Promise.all([sec.uplink!.cut(), ...sec.servers.map((n) => n.proxy!.cut())]);
  }

  async heal(sec: FaultCluster): Promise<void> {
    for (const p of [sec.uplink!, ...sec.servers.map((n) => n.proxy!)]) {
      p.clearToxics();
      await p.heal();
    }
  }

  /** The links of a secondary (uplink and downlinks), to set toxics on. */
  links(sec: FaultCluster): FaultProxy[] {
    return [sec.uplink!, ...sec.servers.map((n) => n.proxy!)];
  }

  /** Kills every process, closes proxies and clients, re-allows and drops the databases, deletes the Redis keys. */
  async cleanup(): Promise<void> {
    await stopAllCoffers();
    for (const p of this.proxies) await p.shutdown().catch(() => undefined);
    for (const c of this.clusters) {
      await c.sql?.end().catch(() => undefined);
      await c.unblockDatabase().catch(() => undefined);
      await c.db.drop().catch(() => undefined);
    }
    if (this.redis) {
      for (const c of this.clusters) await deletePrefixKeys(this.redis, c.prefix, 1000).catch(() => undefined);
      const left = await scanKeys(this.redis, `${this.prefixRoot()}-*`, 1000);
      this.redis.disconnect();
      if (left.length) throw new Error(`Redis keys left behind: ${left.slice(0, 5).join(', ')}`);
    }
  }
}

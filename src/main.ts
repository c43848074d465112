/**
 * The composition root: the one place that wires concrete parts together into a running
 * server process.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import pino, { type Logger } from 'pino';
import type { CofferConfig, ListenerConfig } from './cli/config';
import { systemClock } from './core/clock';
import { Core } from './core/core';
import { createApp } from './http/app';
import { Metrics, type MerkleGauges } from './http/metrics';
import { walGauges } from './storage/wal';
import { replicationGauges } from './storage/replication';
import { listen, type RunningListener } from './http/list-method';
import { clusterApp, listenCluster, type ClusterListener } from './http/cluster-listener';
import { ActiveNode } from './replication/active-node';
import { openEmbedded, openPostgres, type Database } from './storage/db';
import { migrateToLatest } from './storage/migrate';
import { pgStore, type PgStoreOptions } from './storage/pg-store';
import type { ExpiryScheduler } from './core/expiry';
import { VERSION } from './version';
import { replicationInternalRouter, serveApply } from './http/replication-internal';
import { INTERNAL_PREFIX, Replication, type ReplicationOptions } from './replication/manager';
import { replicationRoutes } from './replication/routes';
import { BullQueue, redisConnection } from './queue/bullmq';
import { processExpiry, queueScheduler } from './queue/expiry';
import type { JobQueue } from './queue/jobs';
import { MemoryQueue } from './queue/memory';
import { MerkleIndex } from './merkle/index';
import { MerklePool } from './merkle/pool';

export interface DevOptions {
  rootTokenId?: string;
}

export interface RunningServer {
  core: Core;
  node: ActiveNode;
  database: Database;
  listeners: RunningListener[];
  apiAddr: string;
  /** The cluster listener's advertised address (replication over mutual TLS); '' without TLS. */
  clusterAddr: string;
  log: Logger;
  rootToken?: string;
  unsealKey?: string;
  stop(): Promise<void>;
}

export function createLogger(config: Pick<CofferConfig, 'logLevel' | 'logFormat'>): Logger {
  return pino({
    level: config.logLevel,
    base: { pid: process.pid },
    // Belt and braces for invariant 8: even if a token or body slipped into a log call, these
    // fields are censored.
    redact: { paths: ['token', '*.token', 'body', '*.body', 'headers', '*.headers', 'value', '*.value', 'data', '*.data'], censor: '[redacted]' },
  }, pino.destination(2));
}

function splitAddress(address: string): { host: string; port: number } {
  const i = address.lastIndexOf(':');
  const host = address.slice(0, i).replace(/^\[|\]$/g, '') || '127.0.0.1';
  return { host, port: Number(address.slice(i + 1)) };
}

/** `onWalWritten`: told of the WAL rows this process's writes committed (see pgStore). */
function buildCore(config: CofferConfig, database: Database, scheduler: ExpiryScheduler, onWalWritten?: PgStoreOptions['onWalWritten']): Core {
  return new Core({
    scheduler,
    store: pgStore(database.db, { onWalWritten }),
    clock: systemClock,
    staticSeal: config.seal
      ? { keyId: config.seal.currentKeyId, key: config.seal.currentKey, previous: config.seal.previousKey ? { keyId: config.seal.previousKeyId ?? '', key: config.seal.previousKey } : undefined }
      : undefined,
    clusterName: config.clusterName,
    version: VERSION,
  });
}

/** Static seal: unseal now, and keep trying while sealed (the cluster may be initialised later). */
function keepAutoUnsealed(core: Core, config: CofferConfig, log: Logger): NodeJS.Timeout {
  const t = setInterval(() => {
    if (core.sealed && config.seal) core.autoUnseal().catch((err) => log.warn({ err: err.message }, 'auto-unseal failed'));
  }, 1000);
  t.unref();
  return t;
}

/** How batches are cut and paced (and the replication tick), for servers and `coffer worker` alike. */
function shipping(config: CofferConfig): Pick<ReplicationOptions, 'batchMaxRows' | 'batchMaxBytes' | 'shipLingerMs' | 'shipLingerMinEntries' | 'tickMs'> {
  return {
    batchMaxRows: 1000,
    batchMaxBytes: 4 * 1024 * 1024,
    shipLingerMs: config.replication.shipLingerMs,
    shipLingerMinEntries: config.replication.shipLingerMinEntries,
    // Test hook: a very long tick shows that role changes arrive by NOTIFY.
    tickMs: Number(process.env.COFFER_REPLICATION_TICK_MS) || undefined,
  };
}

export async function startServer(config: CofferConfig, dev?: DevOptions): Promise<RunningServer> {
  const log = createLogger(config);
  const database = config.storage.type === 'embedded' ? await openEmbedded() : openPostgres(config.storage.connectionUrl, config.storage.maxConnections);
  try {
    const applied = await migrateToLatest(database.db);
    if (applied.length) log.info({ applied }, 'applied migrations');

    const queue: JobQueue = config.queue
      ? new BullQueue(redisConnection(config.queue.url), config.queue.prefix, (err) => log.warn({ err: err.message }, 'queue error'))
      : new MemoryQueue();
    // Late-bound like the node below: writes tell the active node of their WAL rows.
    let node: ActiveNode | null = null;
    const core = buildCore(
      config,
      database,
      queueScheduler(queue, (err) => log.warn({ err: err.message }, 'could not schedule an expiry job; the sweep will catch it')),
      (c) => node?.offer(c),
    );

    const first = config.listeners[0];
    const scheme = first.tlsDisable ? 'http' : 'https';
    const nodeId = randomUUID();
    const listeners: RunningListener[] = [];
    // The api_addr is only known once the first listener has its port (port 0 in tests).
    let apiAddr = config.apiAddr ?? '';

    // The node is late-bound: it needs the api_addr, which is known once the first listener has
    // its port (port 0 in tests); the app needs the node for sys/health.
    const replicationOpts: ReplicationOptions = {
      db: database.db,
      core,
      queue,
      log,
      apiAddr: config.apiAddr ?? '',
      version: VERSION,
      isActive: () => node?.isActive() ?? false,
      bestEffortWalWaitMs: config.replication.bestEffortWalWaitDurationMs,
      ...shipping(config),
    };
    const metrics: Metrics = new Metrics(
      async () => ({ ...(await walGauges(database.db)), ...(await replicationGauges(database.db)) }),
      (): MerkleGauges | null => (merkle && node?.isActive() ? { dirtyPages: merkle.dirtyPages, appliedLsn: merkle.appliedLsn } : null),
      async () => ({ 'replication.ship': await queue.depth('replication.ship'), 'expiry.check': await queue.depth('expiry.check') }),
    );
    const pool = config.merkle.index ? new MerklePool() : null;
    const merkle: MerkleIndex | null = pool
      ? new MerkleIndex({ db: database.db, pool, log, flushIntervalMs: config.merkle.flushIntervalMs, flushFraction: config.merkle.flushFraction, sink: metrics.merkle })
      : null;
    replicationOpts.merkle = () => (merkle && node?.merkleReady ? merkle : null);
    replicationOpts.onSynced = (n) => metrics.merkle.synced(n);
    replicationOpts.onShipped = (entries, bytes, ms) => metrics.replication.shipped(entries, bytes, ms);
    replicationOpts.onApplied = (entries, ms) => metrics.replication.applied(entries, ms);
    replicationOpts.onWalWritten = (c) => node?.offer(c);
    const replication = new Replication(replicationOpts);
    core.sys.addRoutes(replicationRoutes(replication));
    const app = createApp({
      core,
      replication: {
        router: replicationInternalRouter(replication),
        prefix: INTERNAL_PREFIX,
        assertIndex: (lsn, wait) => replication.assertIndex(lsn, wait),
        apply: (body, credential) => serveApply(replication, body, credential, undefined),
      },
      metrics,
      unauthenticatedMetrics: config.telemetry.unauthenticatedMetricsAccess,
      node: { isActive: () => node?.isActive() ?? false, poke: () => node?.poke(), leader: () => node!.leader(), stepDown: () => node!.stepDown() },
      log,
      maxRequestSizeBytes: first.maxRequestSizeBytes,
      version: VERSION,
    });
    for (const l of config.listeners) listeners.push(await startListener(app, l));
    if (!apiAddr) apiAddr = `${scheme}://${listeners[0].address.host}:${listeners[0].address.port}`;
    // With TLS, replication between clusters runs over mutual TLS on a cluster listener of its
    // own (Vault's cluster port), with certificates from the primary's replication CA.
    let cluster: ClusterListener | null = null;
    let clusterAddr = '';
    if (!first.tlsDisable) {
      const bind = clusterBind(config, first, listeners[0]);
      cluster = await listenCluster(clusterApp(INTERNAL_PREFIX, replicationInternalRouter(replication, { cluster: true }), first.maxRequestSizeBytes), bind.host, bind.port);
      clusterAddr = config.clusterAddr ?? `https://${hostForUrl(cluster.address.host)}:${cluster.address.port}`;
      replicationOpts.clusterAddr = clusterAddr;
    }
    node = new ActiveNode({
      db: database.db,
      connectionString: database.connectionString,
      nodeId,
      apiAddr,
      clusterAddr: clusterAddr || (config.clusterAddr ?? ''),
      log,
      singleProcess: database.embedded,
      onSequenced: (head) => replication.poke(head),
      // Test hook: a process deaf to role changes shows storage's role guard at work.
      onRoleChanged: process.env.COFFER_TEST_IGNORE_ROLE_NOTIFY ? undefined : () => replication.kick(),
      merkle: merkle ?? undefined,
      retention: { maxRows: config.replication.logshipperBufferLength, maxBytes: config.replication.logshipperBufferSizeBytes },
      checkpointIntervalMs: config.merkle.checkpointIntervalMs,
      // Test hook: a fixed, long poll shows that other processes' writes arrive by NOTIFY.
      followPollMs: Number(process.env.COFFER_WAL_POLL_MS) || undefined,
      onWalCollected: (n) => metrics.merkle.walCollected(n),
    });
    replicationOpts.apiAddr = apiAddr;
    await node!.start();
    replication.start();
    // The cluster listener's certificate follows this cluster's replication role (and the seal).
    let identityTimer: NodeJS.Timeout | undefined;
    if (cluster) {
      const c = cluster;
      const refresh = () =>
        void replication.clusterIdentity().then(
          (id) => c.setIdentity(id),
          (err) => log.warn({ err: (err as Error).message }, 'could not load the replication certificate'),
        );
      replication.tls.onChange = refresh;
      identityTimer = setInterval(refresh, 1000);
      identityTimer.unref();
      refresh();
    }

    const result: RunningServer = {
      core,
      node: node!,
      database,
      listeners,
      apiAddr,
      clusterAddr,
      log,
      async stop() {
        replication.stop();
        clearInterval(identityTimer);
        clearInterval(autoUnsealTimer);
        clearInterval(sweepTimer);
        await queue.close().catch(() => undefined);
        await Promise.all([...listeners.map((l) => l.close()), cluster?.close()]);
        await node!.stop();
        await pool?.destroy();
        await database.close();
      },
    };

    if (dev) {
      const init = await core.initialize(1, 1, { rootTokenId: dev.rootTokenId });
      await core.unseal(init.keys[0]);
      await core.handle({ operation: 'update', path: 'sys/mounts/secret', data: { type: 'kv', options: { version: '2' }, description: 'key/value secret storage' }, query: {}, token: init.rootToken, headers: {} });
      result.rootToken = init.rootToken;
      result.unsealKey = init.keys[0].toString('base64');
    }
    const autoUnsealTimer = keepAutoUnsealed(core, config, log);
    if (config.seal) await core.autoUnseal().catch((err) => log.warn({ err: err.message }, 'auto-unseal failed'));
    // Workers run in every server by default; `coffer worker` processes add capacity.
    processExpiry(queue, core);
    // The backstop sweep runs on the active node only (the queue's jobs may have been lost).
    const sweepTimer = setInterval(() => {
      if (node!.isActive()) core.sweep().catch((err) => log.warn({ err: err.message }, 'expiry sweep failed'));
    }, config.expirySweepIntervalMs);
    sweepTimer.unref();
    log.info({ apiAddr, ...(clusterAddr ? { clusterAddr } : {}), node: nodeId, storage: config.storage.type, queue: config.queue ? 'redis' : 'in-process' }, 'coffer server started');
    return result;
  } catch (err) {
    await database.close().catch(() => undefined);
    throw err;
  }
}

/**
 * Where the cluster listener binds: the listener's `cluster_address`; else the API listener's
 * host with `cluster_addr`'s port; else the API port + 1 (Vault's default), or any free port
 * when the API port was 0.
 */
function clusterBind(config: CofferConfig, first: ListenerConfig, api: RunningListener): { host: string; port: number } {
  if (first.clusterAddress) return splitAddress(first.clusterAddress);
  if (config.clusterAddr) {
    const u = new URL(config.clusterAddr);
    return { host: api.address.host, port: Number(u.port || 8201) };
  }
  return { host: api.address.host, port: splitAddress(first.address).port === 0 ? 0 : api.address.port + 1 };
}

function hostForUrl(host: string): string {
  return host.includes(':') ? `[${host}]` : host;
}

async function startListener(app: ReturnType<typeof createApp>, l: ListenerConfig): Promise<RunningListener> {
  const { host, port } = splitAddress(l.address);
  return listen(app, {
    host,
    port,
    requestTimeoutMs: l.requestTimeoutMs,
    tls: l.tlsDisable ? undefined : { cert: readFileSync(l.tlsCertFile!), key: readFileSync(l.tlsKeyFile!) },
  });
}

/**
 * `coffer worker`: queue workers without an API listener, to add capacity. It needs no
 * unseal: expiry works on local tables by accessor and lease id.
 */
export async function startWorker(config: CofferConfig): Promise<{ stop(): Promise<void> }> {
  const log = createLogger(config);
  if (config.storage.type !== 'postgresql' || !config.queue) {
    throw new Error('coffer worker needs storage "postgresql" and queue "redis" blocks');
  }
  const database = openPostgres(config.storage.connectionUrl, config.storage.maxConnections);
  await migrateToLatest(database.db);
  const queue = new BullQueue(redisConnection(config.queue.url), config.queue.prefix, (err) => log.warn({ err: err.message }, 'queue error'));
  const core = buildCore(config, database, queueScheduler(queue, () => undefined));
  processExpiry(queue, core);
  // Shipping needs the barrier (a secondary's credential is stored encrypted): a worker ships
  // only once unsealed, which the static seal does unattended. Until then the servers ship.
  const autoUnsealTimer = keepAutoUnsealed(core, config, log);
  if (config.seal) await core.autoUnseal().catch((err) => log.warn({ err: err.message }, 'auto-unseal failed'));
  const replication = new Replication({
    db: database.db,
    core,
    queue,
    log,
    apiAddr: '',
    version: VERSION,
    isActive: () => false,
    bestEffortWalWaitMs: config.replication.bestEffortWalWaitDurationMs,
    ...shipping(config),
  });
  replication.start();
  log.info({ queue: config.queue.prefix }, 'coffer worker started');
  return {
    async stop() {
      replication.stop();
      clearInterval(autoUnsealTimer);
      await queue.close();
      await database.close();
    },
  };
}

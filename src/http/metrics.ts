/**
 * Prometheus metrics (`sys/metrics`), named as Vault names them where Vault has a name.
 * Gauges that describe storage are read at scrape time through collectors main.ts provides.
 */
import { collectDefaultMetrics, Counter, Gauge, Registry, Summary } from 'prom-client';
import type { MerkleSink, RecoveryReport } from '../merkle/index';

export interface StorageGauges {
  walHeadLsn: number;
  walUnorderedRows: number;
  walOldestUnorderedAgeSeconds: number;
  /** Secondary: last primary WAL position applied here. */
  lastRemoteWal: number;
  /** Primary: the largest gap between our head and a secondary's acknowledged position. */
  maxSecondaryLagWal: number;
  knownSecondaries: number;
  /** Ordered WAL rows retained, and their bytes as the retention bound counts them. */
  walRetainedRows: number;
  walRetainedBytes: number;
}

/** In-process figures of the merkle index (absent on a node that is not active). */
export interface MerkleGauges {
  dirtyPages: number;
  appliedLsn: number;
}

/** The longest a scrape waits for the queue's depth. */
const QUEUE_READ_MS = 1000;

/** Jobs in the queue by job name and state (waiting, active, delayed), read at scrape time. */
export type QueueDepths = Record<string, Record<string, number>>;

/** Where replication reports each batch it sent (primary side) or applied (secondary side). */
export interface ReplicationSink {
  shipped(entries: number, bytes: number, ms: number): void;
  applied(entries: number, ms: number): void;
}

export class Metrics {
  readonly registry = new Registry();
  readonly handleRequest: Summary<'method'>;

  /** Where the merkle index and WAL collection report what they did. */
  readonly merkle: MerkleSink & { walCollected(deleted: number): void; synced(keys: number): void };

  /** Shipping and apply, per batch. */
  readonly replication: ReplicationSink;

  constructor(readStorage: () => Promise<StorageGauges>, readMerkle: () => MerkleGauges | null = () => null, readQueue: () => Promise<QueueDepths> = async () => ({})) {
    collectDefaultMetrics({ register: this.registry });
    this.handleRequest = new Summary({
      name: 'vault_core_handle_request',
      help: 'Time to handle a request, in milliseconds',
      labelNames: ['method'],
      percentiles: [0.5, 0.9, 0.99],
      maxAgeSeconds: 60,
      ageBuckets: 5,
      registers: [this.registry],
    });
    let cached: Promise<StorageGauges> | null = null;
    // One storage read per scrape, shared by the gauges below.
    const read = () => (cached ??= readStorage().finally(() => setTimeout(() => (cached = null), 0)));
    const gauge = (name: string, help: string, pick: (s: StorageGauges) => number) =>
      new Gauge({
        name,
        help,
        registers: [this.registry],
        async collect() {
          this.set(pick(await read()));
        },
      });
    gauge('vault_replication_wal_last_wal', 'Last dense WAL position handed out (LSN)', (s) => s.walHeadLsn);
    gauge('vault_replication_fsm_last_remote_wal', 'Secondary: the last WAL position of the primary applied here', (s) => s.lastRemoteWal);
    gauge('coffer_replication_secondary_lag_wal', 'Primary: the largest number of WAL positions a secondary is behind', (s) => s.maxSecondaryLagWal);
    gauge('coffer_replication_known_secondaries', 'Primary: secondaries not revoked', (s) => s.knownSecondaries);
    gauge('coffer_wal_unordered_rows', 'WAL rows written but not yet given a position', (s) => s.walUnorderedRows);
    gauge('coffer_wal_oldest_unordered_age_seconds', 'Age of the oldest committed WAL row without a position (only rows an older version left; numbered at takeover)', (s) => s.walOldestUnorderedAgeSeconds);
    gauge('vault_logshipper_buffer_length', 'Ordered WAL rows retained for shipping (bounded by logshipper_buffer_length)', (s) => s.walRetainedRows);
    gauge('vault_logshipper_buffer_size', 'Bytes of retained WAL as the bound counts them (bounded by logshipper_buffer_size)', (s) => s.walRetainedBytes);

    const r = [this.registry];
    const ms = (name: string, help: string) => new Summary({ name, help, percentiles: [0.5, 0.99], maxAgeSeconds: 300, ageBuckets: 5, registers: r });
    const flushMs = ms('vault_merkle_flushdirty', 'Time to flush a batch of dirty merkle pages, in milliseconds');
    const flushPages = ms('vault_merkle_flushdirty_num_pages', 'Merkle pages written per flush');
    const cpMs = ms('vault_merkle_savecheckpoint', 'Time to save a merkle checkpoint, in milliseconds');
    const cpDirty = ms('vault_merkle_savecheckpoint_num_dirty', 'Dirty merkle pages recorded in a checkpoint');
    const recoverySeconds = new Gauge({ name: 'coffer_merkle_recovery_seconds', help: 'Duration of the last merkle recovery (redo or rebuild)', labelNames: ['mode'], registers: r });
    const recoveryRecords = new Gauge({ name: 'coffer_merkle_recovery_records', help: 'WAL records scanned by the last merkle redo', registers: r });
    const gc = new Counter({ name: 'coffer_wal_gc_deleted_total', help: 'WAL rows removed by garbage collection (bounded WAL)', registers: r });
    const synced = new Counter({ name: 'coffer_merkle_sync_keys_total', help: 'Secondary: keys fetched or purged by merkle-sync', registers: r });
    new Gauge({ name: 'coffer_merkle_dirty_pages', help: 'Merkle subpages changed since their last flush (this node, if active)', registers: r, collect() { this.set(readMerkle()?.dirtyPages ?? 0); } });
    new Gauge({ name: 'coffer_merkle_applied_lsn', help: 'WAL position the in-memory merkle index reflects (this node, if active)', registers: r, collect() { this.set(readMerkle()?.appliedLsn ?? 0); } });
    // Per batch, in the process that sent or applied it (a `coffer worker` ships too, and has no
    // listener: its batches are in its logs, not here).
    const shipMs = ms('vault_replication_rpc_client_stream_wals', 'Primary: time to send a WAL batch to a secondary and hear it applied, in milliseconds');
    const shipEntries = ms('coffer_replication_ship_batch_entries', 'Primary: WAL entries per batch sent to a secondary');
    const shipBytes = ms('coffer_replication_ship_batch_bytes', 'Primary: value bytes per batch sent to a secondary');
    const applyMs = ms('vault_replication_rpc_server_stream_wals_request', 'Secondary: time to apply a WAL batch from the primary, in milliseconds');
    const applyEntries = ms('coffer_replication_apply_batch_entries', 'Secondary: WAL entries per batch applied');
    this.replication = {
      shipped: (entries, bytes, t) => {
        shipEntries.observe(entries);
        shipBytes.observe(bytes);
        shipMs.observe(t);
      },
      applied: (entries, t) => {
        applyEntries.observe(entries);
        applyMs.observe(t);
      },
    };
    new Gauge({
      name: 'coffer_queue_jobs',
      help: 'Jobs in the work queue (BullMQ, or the in-process queue of -dev) by job name and state',
      labelNames: ['queue', 'state'],
      registers: r,
      async collect() {
        // Redis away (or a BullMQ connection still waiting to be ready, which never rejects):
        // the scrape still answers within a second, and the gauges keep their last values.
        let timer: NodeJS.Timeout | undefined;
        const late = new Promise<null>((resolve) => (timer = setTimeout(() => resolve(null), QUEUE_READ_MS)));
        const depths = await Promise.race([readQueue().catch(() => null), late]);
        clearTimeout(timer);
        for (const [queue, states] of Object.entries(depths ?? {})) for (const [state, n] of Object.entries(states)) this.set({ queue, state }, n);
      },
    });

    this.merkle = {
      flushed: (pages, t) => {
        flushPages.observe(pages);
        flushMs.observe(t);
      },
      checkpointed: (dirty, t) => {
        cpDirty.observe(dirty);
        cpMs.observe(t);
      },
      recovered: (rep: RecoveryReport) => {
        recoverySeconds.set({ mode: rep.mode }, rep.ms / 1000);
        recoveryRecords.set(rep.recordsScanned);
      },
      walCollected: (n) => gc.inc(n),
      synced: (n) => synced.inc(n),
    };
  }
}

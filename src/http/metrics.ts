/**
 * Prometheus metrics (`sys/metrics`), named as Vault names them where Vault has a name.
 * Gauges that describe storage are read at scrape time through collectors main.ts provides.
 */
import { collectDefaultMetrics, Gauge, Registry, Summary } from 'prom-client';

export interface StorageGauges {
  walHeadLsn: number;
  walUnorderedRows: number;
  walOldestUnorderedAgeSeconds: number;
  /** Secondary: last primary WAL position applied here. */
  lastRemoteWal: number;
  /** Primary: the largest gap between our head and a secondary's acknowledged position. */
  maxSecondaryLagWal: number;
  knownSecondaries: number;
}

export class Metrics {
  readonly registry = new Registry();
  readonly handleRequest: Summary<'method'>;

  constructor(readStorage: () => Promise<StorageGauges>) {
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
    gauge('coffer_wal_oldest_unordered_age_seconds', 'Age of the oldest WAL row still waiting for a position (the xid horizon lag)', (s) => s.walOldestUnorderedAgeSeconds);
  }
}

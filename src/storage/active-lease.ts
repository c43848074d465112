/**
 * The cluster's active lease: a session-level Postgres advisory lock held on a dedicated
 * connection. Whoever holds it runs the singleton duties (WAL ordering, later merkle flush and
 * shipping coordination). When the holder dies its connection closes and Postgres releases the
 * lock at once; a standby polling with pg_try_advisory_lock takes it within one poll interval.
 *
 * States: standby → active (lock taken) → standby (connection lost or released).
 */
import pg from 'pg';

const ACTIVE_LOCK = 0x636f666665726163n; // "cofferac"

export interface ActiveLeaseEvents {
  onActive(): void;
  onLost(reason: string): void;
  /** Another process of the cluster committed WAL rows (a NOTIFY on WAL_CHANNEL). */
  onWal?(): void;
  /** The cluster's replication role changed, here or in another process (REPLICATION_CHANNEL, migration 0009). */
  onReplication?(): void;
}

/**
 * Processes that are not active NOTIFY here after committing WAL rows; the lease connection
 * LISTENs, so the active node's WAL follower reads them at once instead of polling for them.
 */
export const WAL_CHANNEL = 'coffer_wal';
/** Sent by a trigger when the `coffer_replication` row's role changes (migration 0009). */
export const REPLICATION_CHANNEL = 'coffer_replication';

export class ActiveLease {
  private client: pg.Client | null = null;
  private timer: NodeJS.Timeout | null = null;
  private stopped = false;
  private held = false;

  constructor(
    private readonly connectionString: string,
    private readonly events: ActiveLeaseEvents,
    private readonly pollMs = 1000,
  ) {}

  get isActive(): boolean {
    return this.held;
  }

  start(): void {
    this.stopped = false;
    void this.tick();
  }

  private schedule(): void {
    if (!this.stopped) this.timer = setTimeout(() => void this.tick(), this.pollMs);
  }

  private async tick(): Promise<void> {
    try {
      if (!this.client) await this.connect();
      if (this.held) {
        // Liveness check: a dead connection means the lock is gone too.
        await this.client!.query('SELECT 1');
      } else {
        const r = await this.client!.query('SELECT pg_try_advisory_lock($1) AS ok', [ACTIVE_LOCK.toString()]);
        if (r.rows[0].ok && !this.stopped) {
          this.held = true;
          this.events.onActive();
        }
      }
    } catch (err) {
      this.drop(`active lease connection failed: ${(err as Error).message}`);
    }
    this.schedule();
  }

  private async connect(): Promise<void> {
    const client = new pg.Client({ connectionString: this.connectionString, application_name: 'coffer-active-lease' });
    // An error on a connection that is no longer ours (replaced, or never adopted) drops nothing.
    client.on('error', (err) => {
      if (this.client === client) this.drop(`active lease connection error: ${err.message}`);
    });
    client.on('notification', (msg) => (msg.channel === REPLICATION_CHANNEL ? this.events.onReplication?.() : this.events.onWal?.()));
    try {
      await client.connect();
      await client.query(`LISTEN ${WAL_CHANNEL}; LISTEN ${REPLICATION_CHANNEL}`);
    } catch (err) {
      await client.end().catch(() => undefined);
      throw err;
    }
    this.client = client;
    // Notifications sent while this process was not listening (a new or re-made connection)
    // are lost: look now rather than at the next poll.
    this.events.onWal?.();
    this.events.onReplication?.();
  }

  private drop(reason: string): void {
    const c = this.client;
    this.client = null;
    c?.end().catch(() => undefined);
    if (this.held) {
      this.held = false;
      this.events.onLost(reason);
    }
  }

  /** Gives up the lease (step-down, shutdown). */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    const wasHeld = this.held;
    this.held = false;
    const c = this.client;
    this.client = null;
    if (c) await c.end().catch(() => undefined);
    if (wasHeld) this.events.onLost('stopped');
  }
}

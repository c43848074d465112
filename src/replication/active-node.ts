/**
 * This process's role inside its cluster. Every server serves reads and writes (they share
 * Postgres); the one holding the active lease also runs the singleton duties — today the WAL
 * sequencer — and advertises itself in coffer_nodes for `sys/leader`.
 *
 *   standby ──lease taken──▶ active ──lease lost / step-down──▶ standby
 */
import { sql, type Kysely } from 'kysely';
import type { Logger } from 'pino';
import type { MerkleIndex } from '../merkle/index';
import { ActiveLease } from '../storage/active-lease';
import { collectWal, type WalRetention } from '../storage/merkle';
import type { DB } from '../storage/schema';
import { sequenceWal } from '../storage/wal';

export interface ActiveNodeOptions {
  db: Kysely<DB>;
  connectionString: string;
  nodeId: string;
  apiAddr: string;
  clusterAddr: string;
  log: Logger;
  /** Embedded dev database: one process, always active, no lease. */
  singleProcess: boolean;
  leasePollMs?: number;
  /** Runs after the sequencer handed out new positions (replication ships them at once). */
  onSequenced?: (headLsn: number) => void;
  /** The merkle index this node maintains while active (absent: index disabled). */
  merkle?: MerkleIndex;
  /** Bounded WAL, collected by the active node after each checkpoint. */
  retention: WalRetention;
  checkpointIntervalMs: number;
  /** Told how many WAL rows garbage collection removed. */
  onWalCollected?: (deleted: number) => void;
}

/** How many recent (seq → lsn) pairs the active node remembers for its writers. */
const RECENT_POSITIONS = 65_536;
/** A writer still waiting after this long asks Postgres once (its row may be ordered already). */
const RECENT_CHECK_MS = 200;

export class ActiveNode {
  private lease: ActiveLease | null = null;
  private active = false;
  private activeSince: Date | null = null;
  private loop: Promise<void> | null = null;
  private stopping = false;
  private wake: (() => void) | null = null;
  /** Set by poke(); the sequencer loop clears it before each step. */
  private poked = false;
  private housekeeping: NodeJS.Timeout | null = null;
  /** Set once the merkle index has recovered on this node's current term as active. */
  merkleReady = false;
  /** Last dense WAL position handed out by this node's sequencer. */
  headLsn = 0;
  /** Writers in this process waiting for their WAL row's position (seq → resolve). */
  private readonly waiters = new Map<number, (lsn: number | null) => void>();
  /**
   * Positions this node's sequencer handed out lately (seq → lsn, oldest first), so a writer
   * whose row was ordered before it asked finds it without a query. Bounded; a writer that
   * misses it (a very slow one) asks Postgres.
   */
  private readonly recent = new Map<number, number>();

  constructor(private readonly o: ActiveNodeOptions) {}

  isActive(): boolean {
    return this.active;
  }

  async start(): Promise<void> {
    await this.o.db
      .insertInto('coffer_nodes')
      .values({ node_id: this.o.nodeId, api_addr: this.o.apiAddr, cluster_addr: this.o.clusterAddr })
      .onConflict((oc) => oc.column('node_id').doUpdateSet({ api_addr: this.o.apiAddr, cluster_addr: this.o.clusterAddr, last_seen: new Date() }))
      .execute();
    if (this.o.singleProcess) {
      this.becomeActive();
      return;
    }
    this.lease = new ActiveLease(
      this.o.connectionString,
      { onActive: () => this.becomeActive(), onLost: (why) => this.becomeStandby(why) },
      this.o.leasePollMs ?? 1000,
    );
    this.lease.start();
  }

  private becomeActive(): void {
    this.active = true;
    this.activeSince = new Date();
    this.o.log.info({ node: this.o.nodeId }, 'became the active node');
    void this.o.db
      .transaction()
      .execute(async (tx) => {
        await tx.updateTable('coffer_nodes').set({ is_active: false }).where('node_id', '<>', this.o.nodeId).execute();
        await tx.updateTable('coffer_nodes').set({ is_active: true, active_since: this.activeSince, last_seen: new Date() }).where('node_id', '=', this.o.nodeId).execute();
      })
      .catch((err) => this.o.log.warn({ err: err.message }, 'could not record active node'));
    this.startMerkle();
    this.loop = this.runDuties();
  }

  /**
   * ARIES recovery of the merkle index, then its background flushes and checkpoints, and WAL
   * collection. The sequencer starts at once: what it orders meanwhile queues behind recovery.
   */
  private startMerkle(): void {
    const merkle = this.o.merkle;
    this.merkleReady = false;
    if (merkle) {
      const attempt = () =>
        merkle.recover().then(
          () => {
            if (!this.active) return;
            this.merkleReady = true;
            merkle.startDuties();
          },
          (err) => {
            this.o.log.warn({ err: (err as Error).message }, 'merkle recovery failed; retrying');
            if (this.active && !this.stopping) setTimeout(attempt, 1000).unref();
          },
        );
      void attempt();
    }
    this.housekeeping = setInterval(() => {
      if (!this.active || (merkle && !this.merkleReady)) return;
      const run = async () => {
        if (merkle) await merkle.checkpoint();
        // Never collect WAL the index's recovery would need (its last redo point) ...
        const collect = async () => {
          const r = await collectWal(this.o.db, this.o.retention, merkle ? merkle.redoPoint : Number.MAX_SAFE_INTEGER);
          if (r.deleted > 0) this.o.onWalCollected?.(r.deleted);
          return r;
        };
        const r = await collect();
        // ... but when that is what keeps the WAL over its bound (a burst outran the gentle
        // background flush), flush the subpages holding it back, checkpoint, and collect again
        // — as Postgres checkpoints early when WAL passes max_wal_size.
        if (merkle && r.wanted > r.cutoff) {
          await merkle.flushBefore(r.wanted + 1);
          await merkle.checkpoint();
          await collect();
        }
      };
      run().catch((err) => this.o.log.warn({ err: (err as Error).message }, 'checkpoint or WAL collection failed'));
    }, this.o.checkpointIntervalMs);
    this.housekeeping.unref();
  }

  private stopMerkle(): Promise<void> {
    if (this.housekeeping) clearInterval(this.housekeeping);
    this.housekeeping = null;
    this.merkleReady = false;
    return this.o.merkle?.stop() ?? Promise.resolve();
  }

  private becomeStandby(why: string): void {
    if (!this.active) return;
    this.active = false;
    this.o.log.warn({ node: this.o.nodeId, why }, 'lost the active lease; now standby');
    // Another node orders what is left; its writers ask Postgres.
    for (const finish of [...this.waiters.values()]) finish(null);
    this.recent.clear();
    void this.stopMerkle();
    this.wake?.();
  }

  /**
   * The position of WAL row `seq`, once this process's sequencer hands it out; null if this
   * process is not (or stops being) the active node, or `timeoutMs` passes (the caller then asks
   * Postgres). The common case costs no query: the row, committed by a writer in this process
   * while it is active, is ordered by this sequencer, either before the writer asks (it is in
   * `recent`) or after (the waiter fires). JavaScript runs the look-up and the registration
   * without a sequencer step in between. Postgres is asked once after RECENT_CHECK_MS, for the
   * rows that cannot be here (ordered by an earlier active node, or evicted from `recent`).
   */
  async lsnFor(seq: number, timeoutMs: number, check: () => Promise<number | null>): Promise<number | null> {
    if (!this.active) return check();
    const known = this.recent.get(seq);
    if (known !== undefined) return known;
    return new Promise((resolve) => {
      let done = false;
      const finish = (v: number | null) => {
        if (done) return;
        done = true;
        clearTimeout(t);
        clearTimeout(c);
        this.waiters.delete(seq);
        resolve(v);
      };
      const t = setTimeout(() => finish(null), timeoutMs);
      const c = setTimeout(() => check().then((v) => v !== null && finish(v), () => undefined), RECENT_CHECK_MS);
      this.waiters.set(seq, finish);
      this.poke();
    });
  }

  /**
   * Asks the sequencer to run now (a local write just committed). A poke that arrives while a
   * step is running is remembered, so the loop goes again instead of sleeping: that step's
   * snapshot may predate the commit.
   */
  poke(): void {
    this.poked = true;
    this.wake?.();
  }

  private async runDuties(): Promise<void> {
    let idleMs = 1;
    while (this.active && !this.stopping) {
      let assigned = 0;
      let failed = false;
      this.poked = false;
      try {
        const r = await sequenceWal(this.o.db);
        assigned = r.assigned;
        this.headLsn = r.headLsn;
        this.feedMerkle(r.headLsn, r.records ?? []);
        if (assigned > 0) {
          for (const [seq, lsn] of r.pairs ?? []) {
            this.recent.set(seq, lsn);
            this.waiters.get(seq)?.(lsn);
          }
          for (const seq of this.recent.keys()) {
            if (this.recent.size <= RECENT_POSITIONS) break;
            this.recent.delete(seq);
          }
          this.o.onSequenced?.(r.headLsn);
        }
      } catch (err) {
        this.o.log.warn({ err: (err as Error).message }, 'WAL sequencing failed; retrying');
        idleMs = 500;
        failed = true;
      }
      // A failing step waits (backs off) even when poked.
      if (!failed && (assigned > 0 || this.poked)) {
        idleMs = 1;
        continue;
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, idleMs);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = null;
      idleMs = Math.min(idleMs * 2, 20);
    }
  }

  /** Hands newly ordered records to the index (not awaited: ordering never waits for it). */
  private feedMerkle(head: number, records: import('../storage/wal').OrderedRecord[]): void {
    const merkle = this.o.merkle;
    if (!merkle) return;
    // The WAL went backwards under the index (a secondary enable wiped it): start over.
    if (head < merkle.appliedLsn) {
      void merkle.rebuild('the WAL was reset').catch((err) => this.o.log.warn({ err: (err as Error).message }, 'merkle rebuild failed'));
      return;
    }
    if (records.length === 0) return;
    merkle.apply(records).catch((err) => {
      this.o.log.error({ err: (err as Error).message }, 'merkle apply failed; rebuilding the index');
      void merkle.rebuild('apply failed').catch(() => undefined);
    });
  }

  async leader() {
    const row = await this.o.db
      .selectFrom('coffer_nodes')
      .select(['node_id', 'api_addr', 'cluster_addr', 'active_since'])
      .where('is_active', '=', true)
      .executeTakeFirst();
    return {
      haEnabled: !this.o.singleProcess,
      isSelf: this.active,
      activeTime: (this.active ? this.activeSince : row?.active_since)?.toISOString() ?? '0001-01-01T00:00:00Z',
      leaderAddress: this.active ? this.o.apiAddr : (row?.api_addr ?? ''),
      leaderClusterAddress: this.active ? this.o.clusterAddr : (row?.cluster_addr ?? ''),
    };
  }

  /** Gives up the lease; another process takes it (or this one again after a poll). */
  async stepDown(): Promise<void> {
    if (!this.lease || !this.active) return;
    const lease = this.lease;
    await lease.stop();
    await this.loop;
    if (!this.stopping) setTimeout(() => lease.start(), 2000);
  }

  async stop(): Promise<void> {
    this.stopping = true;
    this.wake?.();
    await this.lease?.stop();
    this.active = false;
    await this.loop;
    await this.stopMerkle();
    await sql`UPDATE coffer_nodes SET is_active = false WHERE node_id = ${this.o.nodeId}`.execute(this.o.db).catch(() => undefined);
  }
}

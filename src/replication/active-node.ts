/**
 * This process's role inside its cluster. Every server serves reads and writes (they share
 * Postgres); the one holding the active lease also runs the singleton duties — following the
 * WAL into the merkle index and waking shipping, checkpoints, WAL collection — and advertises
 * itself in coffer_nodes for `sys/leader`.
 *
 *   standby ──lease taken──▶ active ──lease lost / step-down──▶ standby
 */
import { sql, type Kysely } from 'kysely';
import type { Logger } from 'pino';
import type { MerkleIndex } from '../merkle/index';
import { ActiveLease, WAL_CHANNEL } from '../storage/active-lease';
import { collectWal, type WalRetention } from '../storage/merkle';
import type { DB } from '../storage/schema';
import type { CommittedRows } from '../storage/entries';
import { orderStragglers, readNewWal, type OrderedRecord } from '../storage/wal';

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
  /**
   * Test hook: the follower's wait with nothing new, fixed (by default it backs off 1, 2, 4 … ms
   * up to FOLLOW_POLL_MS). Local writes offer their rows and other processes NOTIFY: the poll is
   * only the safety net for a lost notification, which a test proves by making it very long.
   */
  followPollMs?: number;
  /** Runs when the WAL head moved (replication ships the new rows at once). */
  onSequenced?: (headLsn: number) => void;
  /** Runs when the cluster's replication role changed (NOTIFY) and when this node became active. */
  onRoleChanged?: () => void;
  /** The merkle index this node maintains while active (absent: index disabled). */
  merkle?: MerkleIndex;
  /** Bounded WAL, collected by the active node after each checkpoint. */
  retention: WalRetention;
  checkpointIntervalMs: number;
  /** Told how many WAL rows garbage collection removed. */
  onWalCollected?: (deleted: number) => void;
}

/** Records read per step of the WAL follower. */
const FOLLOW_BATCH = 5000;
/**
 * With nothing new, the follower looks again after 1, 2, 4 … up to this many ms, or when poked:
 * by a local commit (offer), or by another process's NOTIFY. The poll only catches what a lost
 * notification (the lease connection reconnecting) or an older version's writer left; at 20 ms it
 * cost an idle server ~50 statements/s, a few % of a core in Node and ~1% in Postgres.
 */
const FOLLOW_POLL_MS = 1000;

export class ActiveNode {
  private lease: ActiveLease | null = null;
  private active = false;
  private activeSince: Date | null = null;
  private loop: Promise<void> | null = null;
  private stopping = false;
  private wake: (() => void) | null = null;
  /** Set by poke(); the follower loop clears it before each step. */
  private poked = false;
  private housekeeping: NodeJS.Timeout | null = null;
  /** The index's position and redo point at the last WAL collection (housekeeping skips while they stay). */
  private collectedAt: string | null = null;
  /** Set once the merkle index has recovered on this node's current term as active. */
  merkleReady = false;
  /** The WAL head as this node's follower last read it. */
  headLsn = 0;
  /** Every WAL record up to here has been handed to the merkle index (-1: not read yet this term). */
  private followedLsn = -1;
  /** coffer_wal_head.resets when followedLsn was read. */
  private followedResets = 0;

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
      { onActive: () => this.becomeActive(), onLost: (why) => this.becomeStandby(why), onWal: () => this.poke(), onReplication: () => this.o.onRoleChanged?.() },
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
    this.o.onRoleChanged?.();
  }

  /**
   * ARIES recovery of the merkle index, then its background flushes and checkpoints, and WAL
   * collection. The WAL follower starts at once: what it reads meanwhile queues behind recovery.
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
            this.o.onRoleChanged?.(); // duties that wait for the index (reconciliation) can start
          },
          (err) => {
            this.o.log.warn({ err: (err as Error).message }, 'merkle recovery failed; retrying');
            if (this.active && !this.stopping) setTimeout(attempt, 1000).unref();
          },
        );
      void attempt();
    }
    this.collectedAt = null;
    this.housekeeping = setInterval(() => {
      if (!this.active || (merkle && !this.merkleReady)) return;
      const run = async () => {
        if (merkle) await merkle.checkpoint();
        // Idle (the index has not moved, nor its redo point): the last collection still holds.
        const at = merkle ? `${merkle.appliedLsn}:${merkle.redoPoint}` : null;
        if (at !== null && at === this.collectedAt) return;
        // Never collect WAL the index's recovery would need (its last redo point) ...
        const collect = async () => {
          const r = await collectWal(this.o.db, this.o.retention, merkle ? merkle.redoPoint : Number.MAX_SAFE_INTEGER);
          if (r.deleted > 0) this.o.onWalCollected?.(r.deleted);
          return r;
        };
        let r = await collect();
        // ... but when that is what keeps the WAL over its bound (a burst outran the gentle
        // background flush), flush the subpages holding it back, checkpoint, and collect again
        // — as Postgres checkpoints early when WAL passes max_wal_size.
        if (merkle && r.wanted > r.cutoff) {
          await merkle.flushBefore(r.wanted + 1);
          await merkle.checkpoint();
          r = await collect();
        }
        // Nothing left to collect at this position: skip until the index moves.
        this.collectedAt = r.deleted === 0 ? at : null;
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
    void this.stopMerkle();
    this.wake?.();
  }

  /**
   * A local write committed: read the new WAL now instead of at the next poll. A poke that
   * arrives while a step is running is remembered, so the loop goes again instead of sleeping:
   * that step's snapshot may predate the commit.
   */
  poke(): void {
    this.poked = true;
    this.wake?.();
  }

  /**
   * WAL rows a writer in this process just committed, in position order (null: a transaction
   * committed some; read them). When they follow on from what this node has followed, they go
   * to the merkle index and shipping at once, with no read of the WAL; otherwise (a write of
   * another process or batch came between, or this node is not the active one) the follower
   * reads the WAL as usual.
   */
  offer(committed: CommittedRows | null): void {
    if (!this.active) {
      this.notifyActive();
      return;
    }
    const records = committed?.records ?? [];
    if (records.length === 0 || this.followedLsn < 0 || committed!.resets !== this.followedResets || records[0].lsn !== this.followedLsn + 1) {
      this.poke();
      return;
    }
    const last = records[records.length - 1].lsn;
    this.feedMerkle(records);
    this.followedLsn = last;
    if (last > this.headLsn) {
      this.headLsn = last;
      this.o.onSequenced?.(last);
    }
  }

  /**
   * A standby committed WAL rows: tell the active node (its lease connection LISTENs). Coalesced:
   * one NOTIFY in flight, and one more after it if commits came meanwhile — a notification means
   * "read the WAL", so one covers every commit before it was sent.
   */
  private notifyActive(): void {
    if (this.o.singleProcess) return;
    this.notifyWanted = true;
    if (this.notifying) return;
    this.notifying = true;
    void (async () => {
      // Cleared in the same step that sees no further request: an offer can never fall between.
      while (this.notifyWanted) {
        this.notifyWanted = false;
        await sql`SELECT pg_notify(${WAL_CHANNEL}, '')`.execute(this.o.db).catch(
          // Lost: the active node's safety poll finds the rows.
          (err) => this.o.log.debug({ err: (err as Error).message }, 'could not notify the active node of new WAL'),
        );
      }
      this.notifying = false;
    })();
  }
  private notifying = false;
  private notifyWanted = false;

  /**
   * The WAL follower: reads what was committed since the last step (writers number their rows
   * at commit, in commit order, so resuming after the last position misses nothing) and hands it
   * to the merkle index and to shipping. Local writes offer their rows or poke it; other
   * processes of the cluster NOTIFY the lease connection after their commits (notifyActive);
   * a poll at most FOLLOW_POLL_MS apart is the safety net.
   */
  private async runDuties(): Promise<void> {
    let idleMs = this.o.followPollMs ?? 1;
    this.followedLsn = -1;
    await orderStragglers(this.o.db).catch((err) => this.o.log.warn({ err: (err as Error).message }, 'numbering WAL rows left by an older version failed'));
    while (this.active && !this.stopping) {
      let more = false;
      let failed = false;
      this.poked = false;
      try {
        // First step of a term: start at the head; recovery covers what came before it.
        const r = await readNewWal(this.o.db, this.followedLsn < 0 ? Number.MAX_SAFE_INTEGER : this.followedLsn, FOLLOW_BATCH);
        if (this.followedLsn < 0 || r.resets !== this.followedResets) {
          // A new term (the index catches up to the head once recovered), or the WAL was reset
          // (a secondary enable wiped the replicated data): the index starts over, and this
          // branch runs again at every step until a rebuild has succeeded (offers are refused
          // meanwhile: their generation is not the followed one).
          if (this.followedLsn < 0) {
            this.o.merkle?.catchUp(r.headLsn).catch(() => undefined);
            this.followedResets = r.resets;
          } else {
            this.resetMerkle(r.resets);
          }
          this.followedLsn = r.headLsn;
          this.headLsn = -1; // told below
        } else if (r.records.length > 0) {
          // Records offered meanwhile may already be fed: the index skips what it has.
          this.feedMerkle(r.records);
          this.followedLsn = Math.max(this.followedLsn, r.records[r.records.length - 1].lsn);
          more = r.records.length === FOLLOW_BATCH;
        }
        if (r.headLsn > this.headLsn) {
          this.headLsn = r.headLsn;
          this.o.onSequenced?.(r.headLsn);
        }
      } catch (err) {
        this.o.log.warn({ err: (err as Error).message }, 'reading new WAL failed; retrying');
        idleMs = 500;
        failed = true;
      }
      // A failing step waits (backs off) even when poked.
      if (!failed && (more || this.poked)) {
        idleMs = this.o.followPollMs ?? 1;
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
      idleMs = this.o.followPollMs ?? Math.min(idleMs * 2, FOLLOW_POLL_MS);
    }
  }

  /** Hands new records to the index (not awaited: following the WAL never waits for it). */
  private feedMerkle(records: OrderedRecord[]): void {
    const merkle = this.o.merkle;
    if (!merkle) return;
    merkle.apply(records).catch((err) => {
      this.o.log.error({ err: (err as Error).message }, 'merkle apply failed; rebuilding the index');
      void merkle.rebuild('apply failed').catch(() => undefined);
    });
  }

  /** Rebuilds the index for WAL generation `resets` (once at a time); the generation is followed once it succeeded. */
  private resetMerkle(resets: number): void {
    const merkle = this.o.merkle;
    if (!merkle) {
      this.followedResets = resets;
      return;
    }
    if (this.rebuilding) return;
    this.rebuilding = merkle
      .rebuild('the WAL was reset')
      .then(async () => {
        this.followedResets = resets;
        // Anything committed while it rebuilt is read from the WAL.
        await merkle.catchUp(this.followedLsn);
      })
      .catch((err) => this.o.log.warn({ err: (err as Error).message }, 'merkle rebuild after a WAL reset failed; retrying'))
      .finally(() => (this.rebuilding = null));
  }
  private rebuilding: Promise<void> | null = null;

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

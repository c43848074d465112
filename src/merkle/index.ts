/**
 * The merkle index of a cluster's replicated entries, held by the active node.
 *
 * Every WAL record is applied here in LSN order (`apply`), in memory, as the active node reads it.
 * Dirty subpages are flushed to Postgres in the background, each image carrying its pageLSN;
 * a fuzzy checkpoint records the dirty-page table. After a crash or a takeover, `recover` is
 * ARIES redo from the checkpoint (docs/merkle-and-recovery.md maps each concept to this file).
 * There is no undo: the index only ever applies WAL rows that Postgres already committed (a row
 * is read by position after its transaction committed), so no loser transaction can have
 * touched it.
 *
 * Subpages load lazily: after recovery only the subpages redo touched hold their records in
 * memory; the others are known by their flushed hash and pageLSN until a write, a sync or a
 * check needs them. An unloaded subpage's state is exactly its flushed image.
 *
 * CPU work — hashing at flush and snapshot, rebuild, redo, sync planning — runs on Piscina
 * (workers/merkle.ts). What stays on the event loop is O(records of a few subpages).
 */
import type { Kysely } from 'kysely';
import type { Logger } from 'pino';
import { faultPoint } from '../faults';
import {
  loadPageHeads,
  loadRuns,
  oldestRetainedLsn,
  readCheckpoint,
  saveCheckpoint,
  savePages,
  scanRuns,
  walForRedo,
} from '../storage/merkle';
import type { DB } from '../storage/schema';
import { walHead } from '../storage/wal';
import type { MerklePool } from './pool';
import {
  EMPTY_RUN,
  EMPTY_RUN_HASH,
  keyHash,
  makeRecord,
  pageHashes,
  removeKey,
  rootOf,
  SUBPAGES,
  subpageOf,
  upsertRecord,
} from './tree';

/** One ordered WAL record as the index sees it. */
export interface IndexRecord {
  lsn: number;
  path: string;
  op: 'put' | 'delete';
  valueHash: Buffer | null;
  /** The key's subpage, as Postgres computed it. */
  sp: number;
}

interface Subpage {
  /** Sorted records; null while not loaded (then the flushed image is the truth). */
  run: Buffer | null;
  /** null when stale (changed since last hashed). */
  hash: Buffer | null;
  pageLsn: number;
}

export interface RecoveryReport {
  mode: 'redo' | 'rebuild';
  reason: string;
  checkpointLsn: number;
  redoFromLsn: number;
  recoveredToLsn: number;
  recordsScanned: number;
  recordsApplied: number;
  subpagesRedone: number;
  ms: number;
}

export interface MerkleSink {
  flushed(pages: number, ms: number): void;
  checkpointed(dirty: number, ms: number): void;
  recovered(report: RecoveryReport): void;
}

export interface MerkleOptions {
  db: Kysely<DB>;
  pool: MerklePool;
  log: Logger;
  flushIntervalMs: number;
  flushFraction: number;
  sink?: MerkleSink;
}

/** A consistent picture of the index at one LSN (hashes computed from it). */
export interface IndexSnapshot {
  lsn: number;
  subpageHashes: Buffer[];
}

const REDO_CHUNK = 20_000;
/** Up to this many records are applied on the event loop; more go to a worker. */
const INLINE_APPLY = 256;

const asBuffer = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.byteLength);
/** A copy that owns its memory, so structured clone to a worker copies only these bytes. */
const own = (b: Buffer): Uint8Array => (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength ? b : new Uint8Array(b));

export class MerkleIndex {
  private subs: Subpage[] = MerkleIndex.emptySubs(0);
  /** Every record up to this LSN is reflected. */
  appliedLsn = 0;
  /** Dirty-page table: subpage → recLSN (the first change since its last flushed image). */
  private readonly dpt = new Map<number, number>();
  /** Subpages being written right now, with the recLSN they had. */
  private readonly inFlight = new Map<number, number>();
  private queue: Promise<unknown> = Promise.resolve();
  private flushing: Promise<void> | null = null;
  private paused = false;
  private timers: NodeJS.Timeout[] = [];
  private stopped = false;
  /** The redo point of the last checkpoint written: WAL from here on is never collected. */
  private persistedRedoLsn = 1;
  lastRecovery: RecoveryReport | null = null;
  lastReindexAt: Date | null = null;
  flushedPagesTotal = 0;

  constructor(private readonly o: MerkleOptions) {}

  private static emptySubs(lsn: number): Subpage[] {
    return Array.from({ length: SUBPAGES }, () => ({ run: EMPTY_RUN, hash: EMPTY_RUN_HASH, pageLsn: lsn }));
  }

  /** Runs `fn` after every earlier index operation (apply, recover, rebuild) finished. */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => undefined);
    return next;
  }

  /** Recovery reads the WAL from here: garbage collection keeps it. */
  get redoPoint(): number {
    return this.persistedRedoLsn;
  }

  get dirtyPages(): number {
    return this.dpt.size + this.inFlight.size;
  }

  // ---------------------------------------------------------------- background duties

  /** Starts background flushing (the active node calls this after `recover`; it checkpoints). */
  startDuties(): void {
    this.stopped = false;
    const every = (ms: number, fn: () => Promise<unknown>) => {
      const t = setInterval(() => {
        if (!this.stopped && !this.paused) fn().catch((err) => this.o.log.warn({ err: (err as Error).message }, 'merkle background duty failed'));
      }, ms);
      t.unref();
      this.timers.push(t);
    };
    every(this.o.flushIntervalMs, () => this.flush());
  }

  /** Stops background work (lease lost, shutdown). In-flight writes finish. */
  async stop(): Promise<void> {
    this.stopped = true;
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    await this.flushing?.catch(() => undefined);
    await this.queue;
  }

  // ---------------------------------------------------------------- apply

  /**
   * Applies ordered WAL records. Calls queue in order; records at or below `appliedLsn` are
   * skipped, and a gap before the first record is read from the WAL table first.
   */
  apply(recs: IndexRecord[]): Promise<void> {
    return this.serial(async () => {
      const fresh = recs.filter((r) => r.lsn > this.appliedLsn);
      if (fresh.length === 0) return;
      if (fresh[0].lsn > this.appliedLsn + 1) await this.redoRange(this.appliedLsn + 1, fresh[0].lsn - 1);
      if (fresh.length > INLINE_APPLY) {
        await this.redoRecords(fresh);
      } else {
        await this.ensureLoaded(fresh.map((r) => r.sp));
        for (const r of fresh) this.applyOne(r);
      }
    });
  }

  /** Catches up with the ordered WAL up to `head` (after a rebuild, or when asked). */
  catchUp(head: number): Promise<void> {
    return this.serial(async () => {
      if (head > this.appliedLsn) await this.redoRange(this.appliedLsn + 1, head);
    });
  }

  private applyOne(r: IndexRecord): void {
    if (r.lsn !== this.appliedLsn + 1) throw new Error(`merkle apply out of order: ${r.lsn} after ${this.appliedLsn}`);
    const kh = keyHash(r.path);
    if (subpageOf(kh) !== r.sp) throw new Error(`subpage of "${r.path}" differs between Node and Postgres (database encoding must be UTF8)`);
    const s = this.subs[r.sp];
    const run = s.run!;
    const next = r.op === 'put' && r.valueHash ? upsertRecord(run, makeRecord(kh, r.valueHash)) : removeKey(run, kh);
    if (next !== run) {
      s.run = next;
      s.hash = null;
    }
    s.pageLsn = r.lsn;
    if (!this.dpt.has(r.sp)) this.dpt.set(r.sp, r.lsn);
    this.appliedLsn = r.lsn;
  }

  private async ensureLoaded(sps: number[]): Promise<void> {
    const missing = [...new Set(sps)].filter((sp) => this.subs[sp].run === null);
    if (missing.length === 0) return;
    const loaded = await loadRuns(this.o.db, missing);
    for (const sp of missing) {
      const got = loaded.get(sp);
      // Loading never changes what the index says: the image is the state it already knew.
      // (A concurrent loader may have loaded and an apply changed it since: keep that.)
      if (this.subs[sp].run === null) this.subs[sp].run = got ? got.run : EMPTY_RUN;
    }
  }

  /** Redo of ordered WAL [from, to] from the WAL table, in worker chunks. */
  private async redoRange(from: number, to: number): Promise<{ scanned: number; applied: number; subpages: Set<number> }> {
    const touched = new Set<number>();
    let scanned = 0;
    let applied = 0;
    let next = from;
    while (next <= to) {
      const chunk = await walForRedo(this.o.db, next, to, REDO_CHUNK);
      if (chunk.length === 0 || chunk[0].lsn !== next) throw new WalGap(next, chunk[0]?.lsn ?? null);
      // Dense inside the chunk too (collection only ever removes a prefix, but say so if not).
      const hole = chunk.findIndex((r, i) => r.lsn !== next + i);
      if (hole > 0) throw new WalGap(next + hole, chunk[hole].lsn);
      scanned += chunk.length;
      const r = await this.redoRecords(chunk);
      applied += r.applied;
      for (const sp of r.subpages) touched.add(sp);
      next = chunk[chunk.length - 1].lsn + 1;
    }
    return { scanned, applied, subpages: touched };
  }

  /**
   * ARIES redo of records (LSN order) in a worker: each applies only where its LSN is newer
   * than the subpage's pageLSN.
   */
  private async redoRecords(recs: IndexRecord[]): Promise<{ applied: number; subpages: Set<number> }> {
    const needed = [...new Set(recs.filter((r) => r.lsn > this.subs[r.sp].pageLsn).map((r) => r.sp))];
    await this.ensureLoaded(needed);
    const neededSet = new Set(needed);
    const results = await this.o.pool.run('redo', {
      pages: needed.map((id) => ({ id, run: own(this.subs[id].run!), pageLsn: this.subs[id].pageLsn })),
      recs: recs.filter((r) => neededSet.has(r.sp)).map((r) => ({ sp: r.sp, lsn: r.lsn, path: r.path, op: r.op, valueHash: r.valueHash })),
    });
    let applied = 0;
    for (const res of results) {
      this.subs[res.id] = { run: asBuffer(res.run), hash: asBuffer(res.hash), pageLsn: res.pageLsn };
      if (!this.dpt.has(res.id)) this.dpt.set(res.id, res.firstLsn);
      applied++;
    }
    this.appliedLsn = Math.max(this.appliedLsn, recs[recs.length - 1].lsn);
    return { applied, subpages: new Set(results.map((r) => r.id)) };
  }

  // ---------------------------------------------------------------- snapshots and hashes

  /**
   * The index's hashes at one LSN. The picture is taken synchronously (runs are immutable,
   * so holding references freezes them); stale subpages are hashed in a worker and the
   * hashes cached if the subpage has not changed meanwhile.
   */
  async snapshot(): Promise<IndexSnapshot> {
    const lsn = this.appliedLsn;
    const runs = this.subs.map((s) => s.run);
    const hashes = this.subs.map((s) => s.hash);
    const stale = hashes.map((h, i) => (h === null ? i : -1)).filter((i) => i >= 0);
    if (stale.length > 0) {
      const got = await this.o.pool.run('hashRuns', { runs: stale.map((i) => own(runs[i]!)) });
      stale.forEach((sp, k) => {
        const h = asBuffer(got[k]);
        hashes[sp] = h;
        if (this.subs[sp].run === runs[sp]) this.subs[sp].hash = h;
      });
    }
    return { lsn, subpageHashes: hashes as Buffer[] };
  }

  async root(): Promise<{ lsn: number; root: Buffer }> {
    const snap = await this.snapshot();
    return { lsn: snap.lsn, root: rootOf(pageHashes(snap.subpageHashes)) };
  }

  /** Records of some subpages (loaded on demand), for merkle-sync and checks. */
  async runsOf(sps: number[]): Promise<Map<number, Buffer>> {
    await this.ensureLoaded(sps);
    return new Map(sps.map((sp) => [sp, this.subs[sp].run!]));
  }

  // ---------------------------------------------------------------- flush and checkpoint

  /**
   * Writes the oldest dirty subpages (by recLSN): `flushFraction` of them, at least one; all
   * of them when `all`. One flush at a time; a subpage changed during its write stays dirty.
   */
  flush(all = false): Promise<void> {
    if (this.flushing) return this.flushing;
    this.flushing = this.flushOnce(all).finally(() => (this.flushing = null));
    return this.flushing;
  }

  /** Flushes every dirty subpage whose recLSN is below `lsn` (the WAL bound needs them clean). */
  async flushBefore(lsn: number): Promise<void> {
    await this.flushing?.catch(() => undefined);
    if (this.flushing) return;
    this.flushing = this.flushOnce(false, lsn).finally(() => (this.flushing = null));
    return this.flushing;
  }

  private async flushOnce(all: boolean, before?: number): Promise<void> {
    if (this.dpt.size === 0 || this.paused) return;
    const t0 = performance.now();
    const old = before === undefined ? 0 : [...this.dpt.values()].filter((rec) => rec < before).length;
    const n = all ? this.dpt.size : Math.max(old, Math.min(this.dpt.size, Math.max(1, Math.ceil(this.dpt.size * this.o.flushFraction))));
    const chosen = [...this.dpt.entries()].sort((a, b) => a[1] - b[1]).slice(0, n);
    const pages = chosen.map(([sp, rec]) => {
      this.dpt.delete(sp);
      this.inFlight.set(sp, rec);
      return { subpage: sp, rec, run: this.subs[sp].run!, pageLsn: this.subs[sp].pageLsn };
    });
    try {
      faultPoint('merkle.flush.beforeHash');
      const hashes = await this.o.pool.run('hashRuns', { runs: pages.map((p) => own(p.run)) });
      const images = pages.map((p, i) => {
        const hash = asBuffer(hashes[i]);
        if (this.subs[p.subpage].run === p.run) this.subs[p.subpage].hash = hash;
        return { subpage: p.subpage, pageLsn: p.pageLsn, hash, run: p.run };
      });
      // Several statements for a large flush: a crash between them leaves a torn flush,
      // which recovery must (and does) handle, since each image carries its own pageLSN.
      for (let i = 0; i < images.length; i += 128) {
        await savePages(this.o.db, images.slice(i, i + 128));
        faultPoint('merkle.flush.midBatch');
      }
      faultPoint('merkle.flush.afterWrite');
      for (const p of pages) this.inFlight.delete(p.subpage);
      this.flushedPagesTotal += pages.length;
      this.o.sink?.flushed(pages.length, performance.now() - t0);
    } catch (err) {
      for (const p of pages) {
        this.inFlight.delete(p.subpage);
        this.dpt.set(p.subpage, Math.min(p.rec, this.dpt.get(p.subpage) ?? Infinity));
      }
      throw err;
    }
  }

  /**
   * Fuzzy checkpoint: the LSN the index has reached and the dirty-page table (in-flight pages
   * included, with their recLSN), taken at one instant without stopping writes or flushes.
   * One at a time (the housekeeping timer does not wait for the last one): overlapping
   * checkpoints could land out of order, leaving an older one stored after `redoPoint` moved to
   * the newer one's and the WAL collection deleted what the older one needs — the next
   * recovery would then rebuild from storage instead of redo
   * (test/integration/merkle-index.test.ts, "overlapping checkpoints").
   */
  checkpoint(): Promise<void> {
    if (this.checkpointing) return this.checkpointing;
    this.checkpointing = this.checkpointOnce().finally(() => (this.checkpointing = null));
    return this.checkpointing;
  }

  private checkpointing: Promise<void> | null = null;

  private async checkpointOnce(): Promise<void> {
    if (this.paused) return;
    const t0 = performance.now();
    const dirty = new Map(this.dpt);
    for (const [sp, rec] of this.inFlight) dirty.set(sp, Math.min(rec, dirty.get(sp) ?? Infinity));
    // Idle: the last checkpoint already says this (this position, nothing dirty).
    if (dirty.size === 0 && this.cleanCheckpointLsn === this.appliedLsn) return;
    const lsnAtSnapshot = this.appliedLsn;
    const snapPromise = this.snapshot(); // synchronous capture happens inside, before any await
    const snap = await snapPromise;
    if (snap.lsn !== lsnAtSnapshot) throw new Error('checkpoint snapshot moved');
    const redoLsn = dirty.size > 0 ? Math.min(...dirty.values()) : snap.lsn + 1;
    const root = rootOf(pageHashes(snap.subpageHashes));
    faultPoint('merkle.checkpoint.beforeWrite');
    await saveCheckpoint(this.o.db, { checkpointLsn: snap.lsn, redoLsn, dirty, root });
    faultPoint('merkle.checkpoint.afterWrite');
    this.persistedRedoLsn = redoLsn;
    this.cleanCheckpointLsn = dirty.size === 0 ? snap.lsn : null;
    this.o.sink?.checkpointed(dirty.size, performance.now() - t0);
  }
  /** The position of the last checkpoint written with no dirty subpage (null: none since the index was loaded). */
  private cleanCheckpointLsn: number | null = null;

  // ---------------------------------------------------------------- recovery and rebuild

  /** ARIES recovery from the last checkpoint; a full rebuild when there is none to use. */
  recover(): Promise<RecoveryReport> {
    return this.serial(async () => {
      const t0 = performance.now();
      const cp = await readCheckpoint(this.o.db);
      const head = await walHead(this.o.db);
      if (!cp) return this.rebuildNow('no checkpoint', t0);
      if (head < cp.checkpointLsn) return this.rebuildNow('the WAL was reset (secondary enable)', t0);
      const oldest = await oldestRetainedLsn(this.o.db);
      if (cp.redoLsn <= head && (oldest === null || oldest > cp.redoLsn)) return this.rebuildNow(`WAL from the redo point ${cp.redoLsn} is gone`, t0);

      // Analysis: every flushed subpage's pageLSN and hash; records load lazily.
      this.dpt.clear();
      this.inFlight.clear();
      const subs = MerkleIndex.emptySubs(0);
      for (const p of await loadPageHeads(this.o.db)) subs[p.subpage] = { run: null, hash: p.hash, pageLsn: p.pageLsn };
      this.subs = subs;
      this.appliedLsn = cp.redoLsn - 1;
      // Redo: repeat history from the smallest recLSN, page by page where pageLSN is older.
      let r = { scanned: 0, applied: 0, subpages: new Set<number>() };
      try {
        if (cp.redoLsn <= head) r = await this.redoRange(cp.redoLsn, head);
      } catch (err) {
        if (err instanceof WalGap) return this.rebuildNow(err.message, t0);
        throw err;
      }
      this.appliedLsn = Math.max(head, cp.checkpointLsn);
      this.persistedRedoLsn = cp.redoLsn;
      const report: RecoveryReport = {
        mode: 'redo',
        reason: 'checkpoint',
        checkpointLsn: cp.checkpointLsn,
        redoFromLsn: cp.redoLsn,
        recoveredToLsn: this.appliedLsn,
        recordsScanned: r.scanned,
        recordsApplied: r.applied,
        subpagesRedone: r.subpages.size,
        ms: performance.now() - t0,
      };
      this.finishRecovery(report);
      return report;
    });
  }

  /** sys/replication/reindex: rebuild from storage, then catch up with the WAL. */
  rebuild(reason = 'reindex'): Promise<RecoveryReport> {
    return this.serial(() => this.rebuildNow(reason, performance.now()));
  }

  /** Drops the index and rebuilds it (the WAL was reset under it). */
  private async rebuildNow(reason: string, t0: number): Promise<RecoveryReport> {
    this.paused = true;
    try {
      await this.flushing?.catch(() => undefined);
      // A checkpoint begun before the pause must not land after the rebuild's own.
      await this.checkpointing?.catch(() => undefined);
      const built = await this.buildFromStorage();
      // Persist the whole image first: older (maybe corrupt) images must not survive.
      const images = built.subs.map((s, subpage) => ({ subpage, pageLsn: built.lsn, hash: s.hash!, run: s.run! }));
      await this.o.db.transaction().execute(async (tx) => {
        for (let i = 0; i < images.length; i += 64) await savePages(tx, images.slice(i, i + 64), true);
        await tx.deleteFrom('coffer_merkle_checkpoint').execute();
        await saveCheckpoint(tx, { checkpointLsn: built.lsn, redoLsn: built.lsn + 1, dirty: new Map(), root: rootOf(pageHashes(images.map((p) => p.hash))) });
      });
      this.subs = built.subs;
      this.dpt.clear();
      this.inFlight.clear();
      this.appliedLsn = built.lsn;
      this.persistedRedoLsn = built.lsn + 1;
      this.lastReindexAt = new Date();
      const report: RecoveryReport = {
        mode: 'rebuild',
        reason,
        checkpointLsn: built.lsn,
        redoFromLsn: built.lsn + 1,
        recoveredToLsn: built.lsn,
        recordsScanned: 0,
        recordsApplied: 0,
        subpagesRedone: SUBPAGES,
        ms: performance.now() - t0,
      };
      this.finishRecovery(report);
      return report;
    } finally {
      this.paused = false;
    }
  }

  /** Progress of the current rebuild, if one runs (sys/replication/status reindex_* fields). */
  reindexProgress: { stage: string; done: number; total: number } | null = null;

  /** A complete index built from one snapshot of the entries, and the WAL head it matches. */
  async buildFromStorage(): Promise<{ lsn: number; subs: Subpage[] }> {
    const subs = MerkleIndex.emptySubs(0);
    this.reindexProgress = { stage: 'scanning', done: 0, total: SUBPAGES };
    let done = 0;
    const lsn = await scanRuns(this.o.db, async (_head, batch) => {
      const hashes = await this.o.pool.run('hashRuns', { runs: batch.map((b) => own(b.run)) });
      batch.forEach((b, i) => (subs[b.subpage] = { run: b.run, hash: asBuffer(hashes[i]), pageLsn: 0 }));
      done = batch[batch.length - 1].subpage + 1;
      this.reindexProgress = { stage: 'scanning', done, total: SUBPAGES };
    }).finally(() => (this.reindexProgress = null));
    for (const s of subs) s.pageLsn = lsn;
    return { lsn, subs };
  }

  private finishRecovery(report: RecoveryReport): void {
    this.lastRecovery = report;
    this.cleanCheckpointLsn = null;
    this.o.log.info(report, report.mode === 'redo' ? 'merkle index recovered (ARIES redo)' : 'merkle index rebuilt');
    this.o.sink?.recovered(report);
  }

  /** Makes the index reflect every ordered WAL row (rebuilding if the WAL was reset under it). */
  async syncWithWal(): Promise<void> {
    const head = await walHead(this.o.db);
    if (head < this.appliedLsn) await this.rebuild('the WAL was reset');
    else await this.catchUp(head);
  }

  /** merkle-sync's plan on the primary, computed in a worker. */
  planSync(arg: Parameters<typeof import('../../workers/merkle').syncPlan>[0]) {
    return this.o.pool.run('syncPlan', { theirs: arg.theirs.map((t) => ({ sp: t.sp, run: own(asBuffer(t.run)) })), rows: arg.rows });
  }

  keyHashes(paths: string[]): Promise<Uint8Array[]> {
    return this.o.pool.run('keyHashes', { paths });
  }

  // ---------------------------------------------------------------- checking

  /**
   * merkle-check: rebuilds from storage, brings the rebuild to the index's LSN with the WAL,
   * and compares subpage by subpage. Returns the subpages whose hashes differ.
   */
  async check(): Promise<{ lsn: number; root: Buffer; corrupted: number[] }> {
    const built = await this.buildFromStorage();
    // Every write the rebuild's snapshot holds is in the WAL up to its head (writers number their
    // rows at commit): bring the index up to the WAL head, then take its picture (and replay the
    // rebuild to the same point below).
    await this.catchUp(Math.max(built.lsn, await walHead(this.o.db)));
    const mine = await this.serial(() => this.snapshot());
    // Bring the rebuild forward to the picture's LSN with the same redo the index uses.
    if (mine.lsn > built.lsn) {
      const replay = new MerkleIndex(this.o);
      replay.subs = built.subs;
      replay.appliedLsn = built.lsn;
      await replay.redoRange(built.lsn + 1, mine.lsn);
      built.subs = replay.subs;
    }
    const theirs = await this.hashesOf(built.subs);
    const corrupted = new Set<number>(await this.damagedImages());
    for (let sp = 0; sp < SUBPAGES; sp++) if (!theirs[sp].equals(mine.subpageHashes[sp])) corrupted.add(sp);
    return { lsn: mine.lsn, root: rootOf(pageHashes(mine.subpageHashes)), corrupted: [...corrupted].sort((a, b) => a - b) };
  }

  /**
   * Subpages known only by their flushed image (after recovery, until a write loads them) whose
   * stored records do not hash to the hash the index uses for them. Comparing hashes alone
   * cannot see such damage (the stored hash is what the index reports), yet the first write to
   * the subpage would load the damaged records and spread it (test/cluster/merkle-endpoints).
   */
  private async damagedImages(): Promise<number[]> {
    const out: number[] = [];
    const unloaded = this.subs.flatMap((s, sp) => (s.run === null ? [sp] : []));
    for (let i = 0; i < unloaded.length; i += 256) {
      const chunk = unloaded.slice(i, i + 256);
      const loaded = await loadRuns(this.o.db, chunk);
      // Only subpages still unloaded now: no write touched them, so the image read is the one
      // whose hash the index holds.
      const still = chunk.filter((sp) => this.subs[sp].run === null && this.subs[sp].hash !== null);
      if (still.length === 0) continue;
      const want = still.map((sp) => this.subs[sp].hash!);
      const got = await this.o.pool.run('hashRuns', { runs: still.map((sp) => own(loaded.get(sp)?.run ?? EMPTY_RUN)) });
      still.forEach((sp, k) => {
        if (!asBuffer(got[k]).equals(want[k])) out.push(sp);
      });
    }
    return out;
  }

  private async hashesOf(subs: Subpage[]): Promise<Buffer[]> {
    const stale = subs.map((s, i) => (s.hash === null ? i : -1)).filter((i) => i >= 0);
    const out = subs.map((s) => s.hash);
    if (stale.length) {
      const got = await this.o.pool.run('hashRuns', { runs: stale.map((i) => own(subs[i].run!)) });
      stale.forEach((sp, k) => (out[sp] = asBuffer(got[k])));
    }
    return out as Buffer[];
  }
}

export class WalGap extends Error {
  constructor(want: number, got: number | null) {
    super(`WAL position ${want} is not retained (next retained: ${got ?? 'none'})`);
  }
}

/**
 * Piscina tasks for the merkle index: the CPU work that must not run on the event loop
 * (DESIGN.md, "Piscina"). Each export is one task, called by name from src/merkle/pool.ts.
 * Tasks are pure: they get what they need in their argument and return new values; the
 * main thread owns the index and installs results.
 *
 * Buffers arrive as plain Uint8Arrays (structured clone); `buf` re-wraps them without copying.
 */
import {
  hashRun,
  keyHash,
  KEY_BYTES,
  makeRecord,
  records,
  removeKey,
  subpageOf,
  upsertRecord,
} from '../src/merkle/tree';

const buf = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.byteLength);

/** Subpage hashes of runs (flush, rebuild, snapshots). */
export function hashRuns({ runs }: { runs: Uint8Array[] }): Uint8Array[] {
  return runs.map((r) => hashRun(r));
}

export interface RedoRecord {
  /** The subpage Postgres computed for `path` (coffer_key_subpage); checked here. */
  sp: number;
  lsn: number;
  path: string;
  op: 'put' | 'delete';
  valueHash: Uint8Array | null;
}

export interface RedoPage {
  id: number;
  run: Uint8Array;
  pageLsn: number;
}

export interface RedoResult {
  id: number;
  run: Uint8Array;
  hash: Uint8Array;
  pageLsn: number;
  /** LSN of the first record applied to this subpage (its recLSN once dirty). */
  firstLsn: number;
}

/**
 * ARIES redo over a chunk of WAL, in LSN order: a record is applied to its subpage only if
 * its LSN is newer than the subpage's pageLSN, so replaying twice changes nothing.
 */
export function redo({ pages, recs }: { pages: RedoPage[]; recs: RedoRecord[] }): RedoResult[] {
  const state = new Map<number, { run: Buffer; pageLsn: number; firstLsn: number }>();
  for (const p of pages) state.set(p.id, { run: buf(p.run), pageLsn: p.pageLsn, firstLsn: 0 });
  for (const r of recs) {
    const s = state.get(r.sp);
    if (!s) throw new Error(`redo: subpage ${r.sp} not supplied`);
    if (r.lsn <= s.pageLsn) continue;
    const kh = keyHash(r.path);
    if (subpageOf(kh) !== r.sp) throw new Error(`redo: subpage of "${r.path}" is ${subpageOf(kh)} here but ${r.sp} in Postgres (database encoding must be UTF8)`);
    s.run = r.op === 'put' && r.valueHash ? upsertRecord(s.run, makeRecord(kh, r.valueHash)) : removeKey(s.run, kh);
    s.pageLsn = r.lsn;
    if (s.firstLsn === 0) s.firstLsn = r.lsn;
  }
  const out: RedoResult[] = [];
  for (const [id, s] of state) if (s.firstLsn > 0) out.push({ id, run: s.run, hash: hashRun(s.run), pageLsn: s.pageLsn, firstLsn: s.firstLsn });
  return out;
}

export interface PrimaryRow {
  sp: number;
  path: string;
  /** null: a tombstone. */
  valueHash: Uint8Array | null;
}

export interface SyncPlan {
  /** Indexes into `rows` of entries the secondary lacks or holds differently (incl. tombstones of keys it still has). */
  send: number[];
  /** Key hashes the secondary holds that the primary has no row for at all. */
  purge: Uint8Array[];
  /** Records of the secondary that were compared (for accounting). */
  compared: number;
}

/**
 * merkle-sync on the primary: given the secondary's records of some subpages and the primary's
 * rows of the same subpages, what must move.
 */
export function syncPlan({ theirs, rows }: { theirs: { sp: number; run: Uint8Array }[]; rows: PrimaryRow[] }): SyncPlan {
  const theirRecords = new Set<string>();
  const theirKeys = new Map<string, Uint8Array>();
  let compared = 0;
  for (const t of theirs) {
    for (const rec of records(buf(t.run))) {
      compared++;
      theirRecords.add(rec.toString('hex'));
      theirKeys.set(rec.subarray(0, KEY_BYTES).toString('hex'), rec.subarray(0, KEY_BYTES));
    }
  }
  const send: number[] = [];
  const ourKeys = new Set<string>();
  rows.forEach((row, i) => {
    const kh = keyHash(row.path);
    const k = kh.toString('hex');
    ourKeys.add(k);
    if (row.valueHash) {
      if (!theirRecords.has(makeRecord(kh, row.valueHash).toString('hex'))) send.push(i);
    } else if (theirKeys.has(k)) {
      send.push(i); // deleted here, still live there
    }
  });
  const purge = [...theirKeys.entries()].filter(([k]) => !ourKeys.has(k)).map(([, kh]) => kh);
  return { send, purge, compared };
}

/** Key hashes of `paths` (the secondary maps purge key hashes back to its paths). */
export function keyHashes({ paths }: { paths: string[] }): Uint8Array[] {
  return paths.map((p) => keyHash(p));
}

/**
 * The merkle index's fixed shape and its pure operations, shared by the main thread and the
 * Piscina workers (workers/merkle.ts).
 *
 *   root  = H(0x02 ‖ page hash × 64)
 *   page  = H(0x01 ‖ subpage hash × 64)            64 pages
 *   subpage = H(0x00 ‖ records)                     4096 subpages = 64 × 64
 *   record  = keyHash(path)[0..16) ‖ valueHash[0..16)   32 bytes, sorted by key hash
 *
 * A key's subpage is the first 12 bits of SHA-256(path) (db/migrations/0005: the same function
 * in SQL). A subpage holds its keys' records sorted, so its hash — and every hash above it — is
 * a pure function of the set of (key, encrypted value) pairs, whatever order they were written
 * in (DESIGN.md invariant 4). `valueHash` is SHA-256 of the ciphertext, as stored in
 * coffer_entries.value_hash and coffer_wal.value_hash: no secret reaches the index.
 */
import { createHash } from 'node:crypto';

export const PAGES = 64;
export const SUBPAGES_PER_PAGE = 64;
export const SUBPAGES = PAGES * SUBPAGES_PER_PAGE;
export const KEY_BYTES = 16;
export const RECORD_BYTES = 32;
export const HASH_BYTES = 32;

export const EMPTY_RUN: Buffer = Buffer.alloc(0);

export function keyHash(path: string): Buffer {
  return createHash('sha256').update(path, 'utf8').digest().subarray(0, KEY_BYTES);
}

export function subpageOf(kh: Uint8Array): number {
  return (kh[0] << 4) | (kh[1] >> 4);
}

export function pageOf(subpage: number): number {
  return Math.floor(subpage / SUBPAGES_PER_PAGE);
}

export function makeRecord(kh: Uint8Array, valueHash: Uint8Array): Buffer {
  const r = Buffer.allocUnsafe(RECORD_BYTES);
  r.set(kh.subarray(0, KEY_BYTES), 0);
  r.set(valueHash.subarray(0, RECORD_BYTES - KEY_BYTES), KEY_BYTES);
  return r;
}

function compareKey(run: Uint8Array, at: number, kh: Uint8Array): number {
  for (let i = 0; i < KEY_BYTES; i++) {
    const d = run[at + i] - kh[i];
    if (d !== 0) return d;
  }
  return 0;
}

/** Binary search: the record index holding `kh`, or the insertion point as -(index + 1). */
export function findKey(run: Uint8Array, kh: Uint8Array): number {
  let lo = 0;
  let hi = run.length / RECORD_BYTES - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const c = compareKey(run, mid * RECORD_BYTES, kh);
    if (c === 0) return mid;
    if (c < 0) lo = mid + 1;
    else hi = mid - 1;
  }
  return -(lo + 1);
}

/** A new run with `record` set for its key (runs are never mutated: flushes hold references). */
export function upsertRecord(run: Buffer, record: Uint8Array): Buffer {
  const i = findKey(run, record);
  if (i >= 0) {
    const at = i * RECORD_BYTES;
    if (Buffer.compare(run.subarray(at, at + RECORD_BYTES), record) === 0) return run;
    const out = Buffer.from(run);
    out.set(record, at);
    return out;
  }
  const at = -(i + 1) * RECORD_BYTES;
  const out = Buffer.allocUnsafe(run.length + RECORD_BYTES);
  run.copy(out, 0, 0, at);
  out.set(record, at);
  run.copy(out, at + RECORD_BYTES, at);
  return out;
}

/** A new run without `kh`'s record (the same run if it had none). */
export function removeKey(run: Buffer, kh: Uint8Array): Buffer {
  const i = findKey(run, kh);
  if (i < 0) return run;
  const at = i * RECORD_BYTES;
  return Buffer.concat([run.subarray(0, at), run.subarray(at + RECORD_BYTES)]);
}

export function hashRun(run: Uint8Array): Buffer {
  return createHash('sha256').update(Uint8Array.of(0)).update(run).digest();
}

function hashOf(tag: number, children: Uint8Array[]): Buffer {
  const h = createHash('sha256').update(Uint8Array.of(tag));
  for (const c of children) h.update(c);
  return h.digest();
}

/** Page hashes (64) from every subpage hash (4096). */
export function pageHashes(subpageHashes: Uint8Array[]): Buffer[] {
  const out: Buffer[] = [];
  for (let p = 0; p < PAGES; p++) out.push(hashOf(1, subpageHashes.slice(p * SUBPAGES_PER_PAGE, (p + 1) * SUBPAGES_PER_PAGE)));
  return out;
}

export function rootOf(pages: Uint8Array[]): Buffer {
  return hashOf(2, pages);
}

export const EMPTY_RUN_HASH = hashRun(EMPTY_RUN);

/** The records of a run, as 32-byte views. */
export function* records(run: Buffer): Generator<Buffer> {
  for (let at = 0; at < run.length; at += RECORD_BYTES) yield run.subarray(at, at + RECORD_BYTES);
}

/** A run from unsorted records (deduplicated by key: last one wins). */
export function runFromRecords(recs: Uint8Array[]): Buffer {
  const byKey = new Map<string, Uint8Array>();
  for (const r of recs) byKey.set(Buffer.from(r.subarray(0, KEY_BYTES)).toString('hex'), r);
  const sorted = [...byKey.values()].sort((a, b) => Buffer.compare(a.subarray(0, KEY_BYTES), b.subarray(0, KEY_BYTES)));
  return Buffer.concat(sorted);
}

/**
 * The merkle tree's pure operations (src/merkle/tree.ts) and the ARIES redo task
 * (workers/merkle.ts `redo`), property-tested. DESIGN.md invariant 4: the root is a pure
 * function of the set of (storage key, encrypted value) pairs, whatever the history.
 *
 *  1. Two histories (different per-key noise of puts/overwrites/deletes, different
 *     interleavings) that end in the same set give byte-identical subpage runs, and identical
 *     subpage hashes, page hashes and root — equal to a root computed here from the layout
 *     documented in tree.ts (sorted records, 0x00/0x01/0x02 tags) with nothing of tree.ts.
 *  2. upsertRecord / removeKey against a model (Map key → record): runs stay sorted by key hash
 *     and unique, the input run is never mutated (flushes and snapshots hold references), and
 *     the same run object comes back exactly when nothing changed (the index marks a subpage
 *     stale by identity). findKey and runFromRecords agree with the model.
 *  3. keyHash / subpageOf / pageOf match SHA-256 of the UTF-8 path, the first 12 bits.
 *     (Agreement with the SQL function coffer_key_subpage is in
 *     test/integration/merkle-index.test.ts: it needs Postgres.)
 *  4. redo: starting from any flushed image (a prefix of a subpage's history with its pageLSN),
 *     redo over the whole WAL gives the same subpage as applying everything from empty; a second
 *     redo over the result changes nothing (idempotent); firstLsn is the first record after the
 *     image's pageLSN.
 */
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import {
  EMPTY_RUN,
  EMPTY_RUN_HASH,
  findKey,
  hashRun,
  KEY_BYTES,
  keyHash,
  makeRecord,
  pageHashes,
  pageOf,
  PAGES,
  RECORD_BYTES,
  removeKey,
  rootOf,
  runFromRecords,
  SUBPAGES,
  subpageOf,
  upsertRecord,
} from '../../src/merkle/tree';
import { redo, type RedoRecord } from '../../workers/merkle';
import { seededRng } from '../helpers/rng';

const { seed } = seededRng('merkle-tree property');

// ------------------------------------------------------------------ independent reference

const sha = (...parts: Uint8Array[]) => {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest();
};

/** The layout of tree.ts's header, computed without tree.ts: the expected root of a set. */
function referenceTree(set: Map<string, Buffer>): { subpages: Buffer[]; pages: Buffer[]; root: Buffer } {
  const bySp = new Map<number, Buffer[]>();
  for (const [path, vh] of set) {
    const full = sha(Buffer.from(path, 'utf8'));
    const sp = (full[0] << 4) | (full[1] >> 4);
    const recs = bySp.get(sp) ?? [];
    recs.push(Buffer.concat([full.subarray(0, 16), vh.subarray(0, 16)]));
    bySp.set(sp, recs);
  }
  const empty = sha(Uint8Array.of(0));
  const subpages: Buffer[] = [];
  for (let sp = 0; sp < 4096; sp++) {
    const recs = (bySp.get(sp) ?? []).sort((a, b) => Buffer.compare(a.subarray(0, 16), b.subarray(0, 16)));
    subpages.push(recs.length ? sha(Uint8Array.of(0), ...recs) : empty);
  }
  const pages: Buffer[] = [];
  for (let p = 0; p < 64; p++) pages.push(sha(Uint8Array.of(1), ...subpages.slice(p * 64, p * 64 + 64)));
  return { subpages, pages, root: sha(Uint8Array.of(2), ...pages) };
}

// ------------------------------------------------------------------ the index's way, through tree.ts

interface Op {
  path: string;
  /** null: delete. */
  vh: Buffer | null;
}

/** Applies a history the way MerkleIndex.applyOne does, subpage by subpage. */
function runsAfter(history: Op[]): Map<number, Buffer> {
  const runs = new Map<number, Buffer>();
  for (const op of history) {
    const kh = keyHash(op.path);
    const sp = subpageOf(kh);
    const run = runs.get(sp) ?? EMPTY_RUN;
    const next = op.vh ? upsertRecord(run, makeRecord(kh, op.vh)) : removeKey(run, kh);
    if (next.length === 0) runs.delete(sp);
    else runs.set(sp, next);
  }
  return runs;
}

function treeOf(runs: Map<number, Buffer>) {
  const subpages = Array.from({ length: SUBPAGES }, (_, sp) => (runs.has(sp) ? hashRun(runs.get(sp)!) : EMPTY_RUN_HASH));
  const pages = pageHashes(subpages);
  return { subpages, pages, root: rootOf(pages) };
}

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const showRuns = (runs: Map<number, Buffer>) => [...runs.entries()].sort((a, b) => a[0] - b[0]).map(([sp, r]) => `${sp}:${hex(r)}`);

// ------------------------------------------------------------------ arbitraries

/**
 * Paths that share subpages with other paths (found once by scanning k0, k1, …), so sorting
 * inside a run, insertion in the middle and removal from the middle are exercised through the
 * path API and not only at the edges.
 */
const COLLIDING: string[] = (() => {
  const bySp = new Map<number, string[]>();
  for (let i = 0; i < 20_000; i++) {
    const p = `logical/x/k${i}`;
    const sp = subpageOf(keyHash(p));
    bySp.set(sp, [...(bySp.get(sp) ?? []), p]);
  }
  return [...bySp.values()].filter((ps) => ps.length >= 4).slice(0, 12).flatMap((ps) => ps.slice(0, 4));
})();

/** Any path Postgres can hold: full Unicode (no lone surrogates), no NUL. */
const anyPath = fc.oneof(
  fc.constantFrom(...COLLIDING),
  fc.string({ unit: 'binary', minLength: 1, maxLength: 12 }).filter((s) => !s.includes('\u0000')),
  fc.string({ unit: 'grapheme', minLength: 1, maxLength: 6 }).map((s) => `logical/kv/${s}`),
);
const anyValueHash = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((u) => Buffer.from(u));
const maybeValue = fc.option(anyValueHash, { nil: null });

/**
 * A final set over some keys (null: absent at the end), and two histories that each reach it:
 * per key some noise (puts and deletes) and then the key's final op, the keys interleaved by a
 * schedule. The two histories share nothing but the final set.
 */
const scenario = fc.uniqueArray(anyPath, { minLength: 1, maxLength: 40 }).chain((keys) => {
  const perKey = <T>(a: fc.Arbitrary<T>) => fc.array(a, { minLength: keys.length, maxLength: keys.length });
  const history = fc.record({ noise: perKey(fc.array(maybeValue, { maxLength: 5 })), schedule: fc.array(fc.nat(), { maxLength: 300 }) });
  return fc.record({ keys: fc.constant(keys), final: perKey(maybeValue), a: history, b: history });
});

function interleave(keys: string[], final: (Buffer | null)[], h: { noise: (Buffer | null)[][]; schedule: number[] }): Op[] {
  const queues = keys.map((path, i) => [...h.noise[i].map((vh) => ({ path, vh })), { path, vh: final[i] }]);
  const out: Op[] = [];
  let step = 0;
  for (;;) {
    const live = queues.filter((q) => q.length > 0);
    if (live.length === 0) return out;
    const pick = h.schedule.length ? h.schedule[step++ % h.schedule.length] : step++;
    out.push(live[pick % live.length].shift()!);
  }
}

// ------------------------------------------------------------------ 1. order independence

test('property: histories ending in the same set give identical runs, subpage hashes, page hashes and root (= the documented layout)', () => {
  expect(COLLIDING.length).toBeGreaterThanOrEqual(40);
  fc.assert(
    fc.property(scenario, ({ keys, final, a, b }) => {
      const finalSet = new Map<string, Buffer>();
      keys.forEach((k, i) => final[i] && finalSet.set(k, final[i]!));

      const runsA = runsAfter(interleave(keys, final, a));
      const runsB = runsAfter(interleave(keys, final, b));
      // The same set written once, in reverse order, with no noise at all.
      const runsC = runsAfter([...finalSet.entries()].reverse().map(([path, vh]) => ({ path, vh })));
      expect(showRuns(runsA)).toEqual(showRuns(runsB));
      expect(showRuns(runsA)).toEqual(showRuns(runsC));
      // Each run is what runFromRecords makes of the set's records for that subpage.
      for (const [sp, run] of runsA) {
        const recs = [...finalSet].map(([p, vh]) => makeRecord(keyHash(p), vh)).filter((r) => subpageOf(r) === sp);
        expect(hex(run)).toBe(hex(runFromRecords(recs)));
      }

      const tA = treeOf(runsA);
      const tB = treeOf(runsB);
      const ref = referenceTree(finalSet);
      // (Compared as one buffer each: 4096 hashes per level; the differing indexes on failure.)
      const differing = (x: Buffer[], y: Buffer[]) => x.map((h, i) => (h.equals(y[i]) ? -1 : i)).filter((i) => i >= 0);
      expect(differing(tA.subpages, tB.subpages)).toEqual([]);
      expect(differing(tA.pages, tB.pages)).toEqual([]);
      expect(hex(tA.root)).toBe(hex(tB.root));
      expect(differing(tA.subpages, ref.subpages)).toEqual([]);
      expect(differing(tA.pages, ref.pages)).toEqual([]);
      expect(hex(tA.root)).toBe(hex(ref.root));
    }),
    { seed, numRuns: 150 },
  );
});

test('the empty set: every subpage is H(0x00), and its root is the documented one', () => {
  const t = treeOf(new Map());
  const ref = referenceTree(new Map());
  expect(hex(EMPTY_RUN_HASH)).toBe(hex(sha(Uint8Array.of(0))));
  expect(hex(t.root)).toBe(hex(ref.root));
  expect(t.pages).toHaveLength(PAGES);
});

test('the root depends on the values, not only the keys, and on every key', () => {
  const vh = (n: number) => sha(Buffer.from(String(n)));
  const base = new Map([['logical/a', vh(1)], ['logical/b', vh(2)]]);
  const root = (m: Map<string, Buffer>) => hex(treeOf(runsAfter([...m].map(([path, v]) => ({ path, vh: v })))).root);
  expect(root(base)).not.toBe(root(new Map([['logical/a', vh(1)], ['logical/b', vh(3)]])));
  expect(root(base)).not.toBe(root(new Map([['logical/a', vh(1)]])));
  expect(root(base)).not.toBe(root(new Map([...base, ['logical/c', vh(2)]])));
});

// ------------------------------------------------------------------ 2. run operations vs a model

/**
 * A pool of a few key hashes that share long prefixes (a base key with one or two bytes
 * changed, anywhere, often near the end), so ops hit the same keys again (overwrites, removals
 * of present keys) and comparisons must look at every byte.
 */
const anyKhPool = fc
  .record({
    base: fc.uint8Array({ minLength: KEY_BYTES, maxLength: KEY_BYTES }),
    edits: fc.array(fc.array(fc.tuple(fc.integer({ min: 0, max: KEY_BYTES - 1 }), fc.constantFrom(0, 1, 127, 128, 255)), { minLength: 1, maxLength: 2 }), { minLength: 1, maxLength: 7 }),
  })
  .map(({ base, edits }) => {
    const pool = new Map<string, Buffer>([[hex(base), Buffer.from(base)]]);
    for (const e of edits) {
      const k = Buffer.from(base);
      for (const [at, v] of e) k[at] = v;
      pool.set(hex(k), k);
    }
    return [...pool.values()];
  });
const anyOps = anyKhPool.chain((pool) =>
  fc.array(
    fc.oneof(
      fc.record({ kind: fc.constant('upsert' as const), kh: fc.constantFrom(...pool), vh: fc.constantFrom(...[1, 2, 3].map((n) => sha(Buffer.from([n])))) }),
      fc.record({ kind: fc.constant('remove' as const), kh: fc.constantFrom(...pool) }),
    ),
    { maxLength: 60 },
  ),
);

function keysOf(run: Buffer): string[] {
  const out: string[] = [];
  for (let at = 0; at < run.length; at += RECORD_BYTES) out.push(hex(run.subarray(at, at + KEY_BYTES)));
  return out;
}

test('property: upsertRecord/removeKey keep runs sorted and unique, equal to a model, never mutate their input, and return the same run iff nothing changed', () => {
  fc.assert(
    fc.property(anyOps, (ops) => {
      const model = new Map<string, Buffer>(); // key hex → record
      let run: Buffer = EMPTY_RUN;
      for (const op of ops) {
        const before = Buffer.from(run);
        const next = op.kind === 'upsert' ? upsertRecord(run, makeRecord(op.kh, op.vh)) : removeKey(run, op.kh);
        // The input is untouched (a flush may be writing it right now).
        expect(hex(run)).toBe(hex(before));
        if (op.kind === 'upsert') model.set(hex(op.kh), makeRecord(op.kh, op.vh));
        else model.delete(hex(op.kh));
        // Identity iff no change: the index's "stale hash" marking relies on it.
        expect(next === run).toBe(next.equals(run));
        // Sorted, unique, exactly the model.
        const ks = keysOf(next);
        for (let i = 1; i < ks.length; i++) expect(ks[i - 1] < ks[i]).toBe(true);
        const expected = [...model.entries()].sort((x, y) => (x[0] < y[0] ? -1 : 1)).map(([, r]) => hex(r));
        expect(next.length % RECORD_BYTES).toBe(0);
        expect(Array.from({ length: next.length / RECORD_BYTES }, (_, i) => hex(next.subarray(i * RECORD_BYTES, (i + 1) * RECORD_BYTES)))).toEqual(expected);
        // runFromRecords of the same records in any order, with earlier duplicates, agrees.
        expect(hex(runFromRecords([...[...model.values()].map((r) => makeRecord(r.subarray(0, 16), sha(r))), ...[...model.values()].reverse()]))).toBe(hex(next));
        run = next;
      }
      // findKey: present keys at their index, absent ones at their insertion point.
      const ks = keysOf(run);
      for (const op of ops) {
        const i = findKey(run, op.kh);
        const k = hex(op.kh);
        if (model.has(k)) expect(ks[i]).toBe(k);
        else {
          const at = -(i + 1);
          expect(i).toBeLessThan(0);
          expect(at === 0 || ks[at - 1] < k).toBe(true);
          expect(at === ks.length || ks[at] > k).toBe(true);
        }
      }
    }),
    { seed, numRuns: 300 },
  );
});

// ------------------------------------------------------------------ 3. key hashing

test('property: keyHash is SHA-256(UTF-8 path)[0..16), subpageOf its first 12 bits, pageOf the subpage / 64', () => {
  fc.assert(
    fc.property(anyPath, (path) => {
      const full = sha(Buffer.from(path, 'utf8'));
      const kh = keyHash(path);
      expect(hex(kh)).toBe(hex(full.subarray(0, 16)));
      const sp = subpageOf(kh);
      expect(sp).toBe(parseInt(full.toString('hex').slice(0, 3), 16));
      expect(sp).toBeGreaterThanOrEqual(0);
      expect(sp).toBeLessThan(SUBPAGES);
      expect(pageOf(sp)).toBe(Math.floor(sp / 64));
      // A record carries its key's subpage in its first bytes too (flush and sync rely on it).
      expect(subpageOf(makeRecord(kh, full))).toBe(sp);
    }),
    { seed, numRuns: 500 },
  );
});

// ------------------------------------------------------------------ 4. ARIES redo (worker task)

/** A WAL over a few keys of a few subpages: LSN 1..n, puts and deletes. */
const anyWal = fc
  .array(fc.record({ path: fc.constantFrom(...COLLIDING.slice(0, 12)), vh: maybeValue }), { minLength: 1, maxLength: 60 })
  .map((ops): RedoRecord[] =>
    ops.map((o, i) => ({ sp: subpageOf(keyHash(o.path)), lsn: i + 1, path: o.path, op: o.vh ? 'put' : 'delete', valueHash: o.vh })),
  );

test('property: redo from any flushed image (with its pageLSN) over the whole WAL = applying everything; redo twice changes nothing', () => {
  fc.assert(
    fc.property(anyWal, fc.array(fc.nat(), { minLength: 12, maxLength: 12 }), (wal, cuts) => {
      const sps = [...new Set(wal.map((r) => r.sp))];
      const empty = sps.map((id) => ({ id, run: EMPTY_RUN, pageLsn: 0 }));
      const full = new Map(redo({ pages: empty, recs: wal }).map((r) => [r.id, r]));
      // The reference: the same history through tree.ts, subpage by subpage.
      const expectRuns = runsAfter(wal.map((r) => ({ path: r.path, vh: r.valueHash as Buffer | null })));
      for (const id of sps) {
        expect(hex(full.get(id)!.run)).toBe(hex(expectRuns.get(id) ?? EMPTY_RUN));
        expect(hex(full.get(id)!.hash)).toBe(hex(hashRun(expectRuns.get(id) ?? EMPTY_RUN)));
        expect(full.get(id)!.pageLsn).toBe(Math.max(...wal.filter((r) => r.sp === id).map((r) => r.lsn)));
      }

      // Images flushed at arbitrary points: subpage i's image reflects its records up to cut_i.
      const images = sps.map((id, i) => {
        const own = wal.filter((r) => r.sp === id);
        const P = cuts[i] % (wal.length + 1);
        const prefix = own.filter((r) => r.lsn <= P);
        const pageLsn = prefix.length ? prefix[prefix.length - 1].lsn : 0;
        const img = prefix.length ? redo({ pages: [{ id, run: EMPTY_RUN, pageLsn: 0 }], recs: prefix })[0].run : EMPTY_RUN;
        return { id, run: img, pageLsn };
      });
      const again = new Map(redo({ pages: images, recs: wal }).map((r) => [r.id, r]));
      for (const img of images) {
        const after = wal.filter((r) => r.sp === img.id && r.lsn > img.pageLsn);
        const got = again.get(img.id);
        if (after.length === 0) {
          expect(got).toBeUndefined(); // nothing newer than the image: untouched, not re-dirtied
          expect(hex(img.run)).toBe(hex(full.get(img.id)!.run));
        } else {
          expect(hex(got!.run)).toBe(hex(full.get(img.id)!.run));
          expect(got!.pageLsn).toBe(full.get(img.id)!.pageLsn);
          expect(got!.firstLsn).toBe(after[0].lsn);
        }
      }
      // Idempotent: redo over the finished pages applies nothing.
      const finished = [...full.values()].map((r) => ({ id: r.id, run: r.run, pageLsn: r.pageLsn }));
      expect(redo({ pages: finished, recs: wal })).toEqual([]);
    }),
    { seed, numRuns: 300 },
  );
});

/**
 * The pure part of the WAL sequencer (src/storage/wal.ts `orderBatch`): which rows of an
 * eligible batch take positions, and in which order (DESIGN.md invariant 2, the xid trap).
 *
 * A batch arrives in (xid, seq) order. A row is held back while an older version of its key is
 * still unordered outside the batch; inside the batch a key's rows take that key's (xid, seq)
 * slots in version order; rows of other keys keep their slots.
 */
import fc from 'fast-check';
import { orderBatch } from '../../src/storage/wal';
import { seededRng } from '../helpers/rng';

interface Row {
  seq: number;
  path: string;
  key_version: number;
}

const row = (seq: number, path: string, key_version: number): Row => ({ seq, path, key_version });
const show = (rows: Row[]) => rows.map((r) => `${r.path}@${r.key_version}#${r.seq}`);

describe('orderBatch', () => {
  test('an empty batch orders nothing', () => {
    expect(orderBatch([], new Map())).toEqual([]);
    expect(orderBatch([], new Map([['k', 1]]))).toEqual([]);
  });

  test('a batch without repeated keys or blockers is returned in its (xid, seq) order', () => {
    const batch = [row(7, 'c', 3), row(2, 'a', 1), row(9, 'b', 5)];
    expect(show(orderBatch(batch, new Map()))).toEqual(show(batch));
  });

  test('the xid trap: K v2 is held back while K v1 is still unordered outside the batch', () => {
    // T2 took its xid first (so its rows come first by xid) but wrote K after T1; T1's K v1
    // is committed but not in this batch (e.g. beyond the horizon, or beyond the LIMIT).
    const batch = [row(1, 'z', 1), row(3, 'k', 2)];
    const out = orderBatch(batch, new Map([['k', 1]]));
    expect(show(out)).toEqual(['z@1#1']);
  });

  test('every version at or above the blocker is held; versions below it are not', () => {
    const batch = [row(10, 'k', 4), row(11, 'k', 1), row(12, 'k', 3), row(13, 'k', 2)];
    // v3 is unordered outside: v1 and v2 may go, v3 (equal: cannot happen, but must not go) and v4 wait.
    const out = orderBatch(batch, new Map([['k', 3]]));
    expect(out.map((r) => r.key_version)).toEqual([1, 2]);
    // They take the first two of k's slots in the batch's order (the eligible rows' slots).
    expect(out.map((r) => r.seq)).toEqual([11, 13]);
  });

  test('a blocker newer than every batch version holds nothing back', () => {
    const batch = [row(1, 'k', 1), row(2, 'k', 2)];
    expect(show(orderBatch(batch, new Map([['k', 3]])))).toEqual(['k@1#1', 'k@2#2']);
  });

  test('a blocker of one key does not hold back other keys', () => {
    const batch = [row(1, 'a', 5), row(2, 'k', 2), row(3, 'b', 1), row(4, 'k', 3)];
    const out = orderBatch(batch, new Map([['k', 1], ['zz', 1]]));
    expect(show(out)).toEqual(['a@5#1', 'b@1#3']);
  });

  test('inside a batch a key takes its slots in version order; other keys keep their slots', () => {
    // By (xid, seq): k v3, a v1, k v1, b v2, k v2. k owns slots 0, 2, 4.
    const batch = [row(1, 'k', 3), row(2, 'a', 1), row(3, 'k', 1), row(4, 'b', 2), row(5, 'k', 2)];
    const out = orderBatch(batch, new Map());
    expect(show(out)).toEqual(['k@1#3', 'a@1#2', 'k@2#5', 'b@2#4', 'k@3#1']);
  });

  test('held-back rows give up their slots: the remaining rows are packed, keys in slot order', () => {
    const batch = [row(1, 'k', 2), row(2, 'a', 1), row(3, 'j', 2), row(4, 'j', 1), row(5, 'k', 3)];
    const out = orderBatch(batch, new Map([['k', 1]]));
    expect(show(out)).toEqual(['a@1#2', 'j@1#4', 'j@2#3']);
  });

  test('the input batch is not mutated', () => {
    const batch = [row(1, 'k', 3), row(2, 'k', 1), row(3, 'k', 2)];
    const copy = JSON.parse(JSON.stringify(batch));
    orderBatch(batch, new Map([['k', 3]]));
    expect(batch).toEqual(copy);
  });
});

// ------------------------------------------------------------------------------------------
// Properties. fast-check is seeded from the same printed seed as the rest of the suite.

const { seed } = seededRng('wal-order property');

/** Any batch: arbitrary paths from a small alphabet (so keys repeat), distinct (path, version). */
const anyBatch = fc
  .uniqueArray(fc.record({ path: fc.constantFrom('a', 'b', 'c', 'd', 'k'), key_version: fc.integer({ min: 1, max: 12 }) }), {
    selector: (r) => `${r.path}@${r.key_version}`,
    maxLength: 40,
  })
  .chain((rows) => fc.shuffledSubarray(rows, { minLength: rows.length, maxLength: rows.length }))
  .map((rows) => rows.map((r, i) => ({ seq: i + 1, ...r })));
const anyBlockers = fc.dictionary(fc.constantFrom('a', 'b', 'c', 'd', 'k', 'x'), fc.integer({ min: 1, max: 13 }));

test('property: per key the output is version-ascending, nothing at/after a blocker, nothing else lost, slots kept', () => {
  fc.assert(
    fc.property(anyBatch, anyBlockers, (batch, blockersObj) => {
      const blockers = new Map(Object.entries(blockersObj));
      const out = orderBatch(batch, blockers);

      // No row at or above an outside blocker (the brief's "no version > blocker", made exact).
      for (const r of out) {
        const b = blockers.get(r.path);
        if (b !== undefined) expect(r.key_version).toBeLessThan(b);
      }
      // Per key, strictly ascending versions.
      const last = new Map<string, number>();
      for (const r of out) {
        expect(r.key_version).toBeGreaterThan(last.get(r.path) ?? 0);
        last.set(r.path, r.key_version);
      }
      // Exactly the eligible rows, each once (nothing invented, nothing dropped).
      const eligible = batch.filter((r) => !blockers.has(r.path) || r.key_version < blockers.get(r.path)!);
      expect(out.map((r) => r.seq).sort((x, y) => x - y)).toEqual(eligible.map((r) => r.seq).sort((x, y) => x - y));
      // Slots: the sequence of keys is the eligible rows' sequence of keys (their (xid, seq) slots).
      expect(out.map((r) => r.path)).toEqual(eligible.map((r) => r.path));
      // Keys with one eligible row keep exactly their row in its place.
      const count = new Map<string, number>();
      for (const r of eligible) count.set(r.path, (count.get(r.path) ?? 0) + 1);
      eligible.forEach((r, i) => {
        if (count.get(r.path) === 1) expect(out[i]).toBe(r);
      });
    }),
    { seed, numRuns: 500 },
  );
});

/**
 * A model of what the sequencer actually faces: per key a history v1..vn in commit order; a
 * prefix is already ordered, the rest is unordered and each unordered row is either in the
 * batch (eligible by xid) or outside it (not yet past the horizon, or past the LIMIT). The batch
 * is in an arbitrary (xid, seq) order. After ordering the batch, every key's ordered versions
 * must still be exactly 1..m (no gap, no version ahead of an unordered older one).
 */
const anySituation = fc
  .array(
    fc.record({
      n: fc.integer({ min: 1, max: 8 }),
      orderedPrefix: fc.integer({ min: 0, max: 8 }),
      inBatch: fc.array(fc.boolean(), { minLength: 8, maxLength: 8 }),
    }),
    { minLength: 1, maxLength: 6 },
  )
  .chain((keys) => {
    const rows: { path: string; key_version: number }[] = [];
    const outside = new Map<string, number>();
    const ordered = new Map<string, number>();
    keys.forEach((k, i) => {
      const path = `key${i}`;
      const prefix = Math.min(k.orderedPrefix, k.n);
      ordered.set(path, prefix);
      for (let v = prefix + 1; v <= k.n; v++) {
        if (k.inBatch[v - 1]) rows.push({ path, key_version: v });
        else if (!outside.has(path)) outside.set(path, v); // min unordered version outside
      }
    });
    return fc
      .shuffledSubarray(rows, { minLength: rows.length, maxLength: rows.length })
      .map((shuffled) => ({ batch: shuffled.map((r, i) => ({ seq: i + 1, ...r })), outside, ordered }));
  });

test('property (model): after ordering a batch, each key\'s ordered versions are a gap-free 1..m', () => {
  fc.assert(
    fc.property(anySituation, ({ batch, outside, ordered }) => {
      const out = orderBatch(batch, outside);
      const hi = new Map(ordered);
      for (const r of out) {
        // Each emitted row is exactly the next version of its key.
        expect(r.key_version).toBe((hi.get(r.path) ?? 0) + 1);
        hi.set(r.path, r.key_version);
      }
      // And nothing that could have gone was held back: a key stops only at its outside blocker
      // (or at the end of its history in the batch).
      for (const [path, m] of hi) {
        const nextInBatch = batch.some((r) => r.path === path && r.key_version === m + 1);
        expect(nextInBatch).toBe(false);
      }
    }),
    { seed, numRuns: 500 },
  );
});

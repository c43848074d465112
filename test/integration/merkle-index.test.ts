/**
 * The merkle index (src/merkle/index.ts) in this process, against real Postgres: the real
 * storage functions write (putEntry / deleteEntry in transactions that number their WAL rows
 * before COMMIT), a follower reads the new WAL (readNewWal, as the active node does), and a real
 * MerkleIndex with a real Piscina pool (workers/merkle.ts, compiled: run `npx tsc -p
 * tsconfig.json` first) applies it.
 *
 *  a. keyHash / subpageOf (Node) = coffer_key_subpage (SQL) and the generated column
 *     coffer_entries.merkle_subpage, for Unicode paths (property).
 *  b. DESIGN.md invariant 4: two fresh databases given the same final data through different
 *     histories (noise of puts/overwrites/deletes, rolled-back transactions, different orders,
 *     different writer concurrency, different batch boundaries: incremental applies on one, one
 *     big worker-side apply on the other) have equal roots and equal subpage hashes, equal to a
 *     root computed from the entries by SQL (property, a few seeded runs).
 *  c. recover() after flush + checkpoint + more writes is ARIES redo that reads only the WAL
 *     since the redo point, and gives the index a full rebuild gives.
 *  d. recover() with a checkpoint whose redo point's WAL is gone (in part or all of it) falls
 *     back to a rebuild, with the correct root.
 *  e. a torn flush (the first 128-image statement written with newer pageLSNs, the rest not:
 *     fault point merkle.flush.midBatch) recovers to the rebuild's root.
 *  f. a seeded crash model: many "crashes" (a fault point, armed here to throw instead of
 *     SIGKILL, or a random moment with applies, flushes, checkpoints and WAL collection in
 *     flight), each followed by recovery on a new index, which must equal the storage. A crashed
 *     index sends no statement after the crash instant (statements already sent may complete,
 *     as with kill -9).
 *  g. merkle-check (MerkleIndex.check) must not report corruption of a correct index while
 *     writes commit and a slow writer holds a transaction open (see the test).
 *  h. overlapping checkpoints must not leave an older checkpoint stored whose redo point's WAL
 *     the collection already deleted (failed before the fix in MerkleIndex.checkpoint).
 */
jest.mock('../../src/faults', () => ({
  faultPoint: (name: string) => (globalThis as { __merkleFault?: (n: string) => void }).__merkleFault?.(name),
}));

import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import pino from 'pino';
import { MerkleIndex, type IndexRecord } from '../../src/merkle/index';
import { MerklePool } from '../../src/merkle/pool';
import { hashRun, keyHash, makeRecord, pageHashes, rootOf, runFromRecords, SUBPAGES, subpageOf } from '../../src/merkle/tree';
import { openPostgres, type Database } from '../../src/storage/db';
import { deleteEntry, putEntry, walTransaction } from '../../src/storage/entries';
import { collectWal, readCheckpoint, WAL_ROW_OVERHEAD_BYTES } from '../../src/storage/merkle';
import { migrateToLatest } from '../../src/storage/migrate';
import type { DB } from '../../src/storage/schema';
import { readNewWal, walHead } from '../../src/storage/wal';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { seededRng } from '../helpers/rng';
import { closeBounded, rollbackQuietly, TERM, type Queryable } from '../helpers/wal-invariants';

// ------------------------------------------------------------------ resources and cleanup

const silent = pino({ level: 'silent' });
let mpool: MerklePool;
const clients: { end(): Promise<void> }[] = [];
const dbs: TestDatabase[] = [];
const databases: Database[] = [];
const nodes: IndexNode[] = [];

beforeAll(() => {
  mpool = new MerklePool(2);
});

afterAll(async () => {
  (globalThis as { __merkleFault?: unknown }).__merkleFault = undefined;
  for (const n of nodes) await n.kill();
  for (const c of clients) await c.end().catch(() => undefined);
  for (const d of dbs) await d.drop().catch(() => undefined);
  for (const d of databases) await closeBounded(() => d.close());
  await mpool.destroy();
});

interface Fresh {
  tdb: TestDatabase;
  /** The writers' and the follower's connections (never "crash"). */
  db: Kysely<DB>;
  q: Queryable;
  /** The follower's position: every WAL record up to here has been read. */
  followed: number;
}

/** One step of the active node's WAL follower: the records committed since the last step. */
async function follow(f: Fresh): Promise<{ records: IndexRecord[]; head: number }> {
  const r = await readNewWal(f.db, f.followed, 5000);
  if (r.records.length > 0) f.followed = r.records[r.records.length - 1].lsn;
  return { records: r.records, head: r.headLsn };
}

async function fresh(label: string): Promise<Fresh> {
  const tdb = await createTestDatabase(label);
  dbs.push(tdb);
  const database = openPostgres(tdb.url, 6);
  databases.push(database);
  await migrateToLatest(database.db);
  const q = await sqlClient(tdb.url);
  clients.push(q);
  return { tdb, db: database.db, q, followed: 0 };
}

/**
 * A MerkleIndex as one active node holds it, on its own connection pool. `kill()` is kill -9 as
 * far as Postgres can tell: from that instant no new statement leaves (statements already sent
 * may still complete), then its sessions are terminated (an open transaction aborts).
 */
interface IndexNode {
  index: MerkleIndex;
  db: Kysely<DB>;
  dead: boolean;
  kill(): Promise<void>;
}

let nodeCounter = 0;
function openNode(url: string, flushFraction = 0.5, pool: MerklePool = mpool, jitter: () => number = () => 0): IndexNode {
  const name = `merkle-test-node-${process.pid}-${++nodeCounter}`;
  const pgPool = new pg.Pool({ connectionString: url, max: 4, application_name: name });
  pgPool.on('error', () => undefined);
  const node = {} as IndexNode;
  const connect = pgPool.connect.bind(pgPool) as () => Promise<pg.PoolClient>;
  (pgPool as unknown as { connect: () => Promise<pg.PoolClient> }).connect = async () => {
    if (node.dead) throw new Error('crashed (no new connection)');
    const client = await connect();
    const c = client as pg.PoolClient & { __crashable?: boolean };
    if (!c.__crashable) {
      const query = client.query.bind(client) as (...a: unknown[]) => Promise<unknown>;
      (client as unknown as { query: (...a: unknown[]) => Promise<unknown> }).query = (...a: unknown[]) => {
        const send = () => (node.dead ? Promise.reject(new Error('crashed (statement not sent)')) : query(...a));
        const d = jitter();
        return d > 0 ? new Promise((r) => setTimeout(r, d)).then(send) : send();
      };
      c.__crashable = true;
    }
    return client;
  };
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool: pgPool }) });
  let killed: Promise<void> | null = null;
  Object.assign(node, {
    db,
    dead: false,
    index: new MerkleIndex({
      db,
      // Jitter before each worker task too, so hashing, flush writes and applies interleave.
      pool: { run: async (task: string, arg: unknown) => {
        const d = jitter();
        if (d > 0) await new Promise((r) => setTimeout(r, d));
        return pool.run(task as 'hashRuns', arg as { runs: Uint8Array[] });
      } } as unknown as MerklePool,
      log: silent,
      flushIntervalMs: 3_600_000,
      flushFraction,
    }),
    kill() {
      node.dead = true;
      killed ??= (async () => {
        const admin = new pg.Client({ connectionString: url });
        await admin.connect();
        try {
          await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1', [name]);
        } finally {
          await admin.end();
        }
        await closeBounded(() => db.destroy(), 3000);
      })();
      return killed;
    },
  });
  nodes.push(node);
  return node;
}

// ------------------------------------------------------------------ fault points (in process)

/** Thrown at an armed fault point instead of SIGKILL; the node is dead from that instant. */
class Crash extends Error {}

const faults = {
  armed: null as null | { point: string; countdown: number; node: IndexNode },
  hits: new Map<string, number>(),
};
(globalThis as { __merkleFault?: (n: string) => void }).__merkleFault = (name: string) => {
  faults.hits.set(name, (faults.hits.get(name) ?? 0) + 1);
  const a = faults.armed;
  if (a && a.point === name && --a.countdown <= 0) {
    faults.armed = null;
    a.node.dead = true; // nothing more leaves this "process"
    throw new Crash(name);
  }
};

const FAULT_POINTS = ['merkle.flush.beforeHash', 'merkle.flush.midBatch', 'merkle.flush.afterWrite', 'merkle.checkpoint.beforeWrite', 'merkle.checkpoint.afterWrite'];

// ------------------------------------------------------------------ writing, ordering, the truth

type Op = { path: string; value: Buffer | null };

/** One transaction of puts and deletes through the real storage functions; optionally rolled back. */
async function writeTx(db: Kysely<DB>, ops: Op[], rollback = false): Promise<void> {
  class Rollback extends Error {}
  try {
    await walTransaction(db, async (tx) => {
      for (const op of ops) {
        if (op.value) await putEntry(tx, op.path, op.value, TERM);
        else await deleteEntry(tx, op.path);
      }
      if (rollback) throw new Rollback();
    });
  } catch (err) {
    if (!(err instanceof Rollback)) throw err;
  }
}

/** Reads every committed WAL record not read yet, handing each batch to `feed`; returns the head. */
async function sequenceAll(f: Fresh, feed: (recs: IndexRecord[]) => void = () => undefined): Promise<number> {
  for (;;) {
    const r = await follow(f);
    if (r.records.length === 0) return r.head;
    feed(r.records);
  }
}

/** The active node's path: order everything, hand it to the index, and wait until it applied it. */
async function orderAndApply(f: Fresh, node: IndexNode): Promise<number> {
  const head = await sequenceAll(f, (r) => void node.index.apply(r));
  await node.index.catchUp(head); // queued behind the applies
  return head;
}

/**
 * The truth, from SQL alone: the subpage hashes and root of the live entries (computed with
 * tree.ts's layout, which test/unit/merkle-tree.test.ts checks against its documentation), and
 * the WAL head they correspond to. Only meaningful when nothing is unordered (asserted).
 */
async function truth(f: Fresh): Promise<{ head: number; subpages: Buffer[]; root: Buffer; keys: number }> {
  const { rows } = await f.q.query(`
    SELECT (SELECT last_lsn FROM coffer_wal_head WHERE id = 1)::bigint AS head,
           (SELECT count(*)::int FROM coffer_wal WHERE lsn IS NULL) AS unordered,
           (SELECT coalesce(json_agg(json_build_array(path, encode(value_hash, 'hex'))), '[]'::json)
              FROM coffer_entries WHERE value IS NOT NULL) AS entries`);
  expect(rows[0].unordered).toBe(0);
  const bySp = new Map<number, Buffer[]>();
  for (const [path, vh] of rows[0].entries as [string, string][]) {
    const kh = keyHash(path);
    const sp = subpageOf(kh);
    bySp.set(sp, [...(bySp.get(sp) ?? []), makeRecord(kh, Buffer.from(vh, 'hex'))]);
  }
  const subpages = Array.from({ length: SUBPAGES }, (_, sp) => hashRun(runFromRecords(bySp.get(sp) ?? [])));
  return { head: Number(rows[0].head), subpages, root: rootOf(pageHashes(subpages)), keys: (rows[0].entries as unknown[]).length };
}

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');
const differing = (a: Buffer[], b: Buffer[]) => a.map((h, i) => (h.equals(b[i]) ? -1 : i)).filter((i) => i >= 0);

/** The index equals the truth at the WAL head: every subpage hash, the root, and merkle-check agrees. */
async function expectIndexIsTruth(index: MerkleIndex, f: Fresh, what: string): Promise<void> {
  const t = await truth(f);
  const snap = await index.snapshot();
  expect({ what, lsn: snap.lsn }).toEqual({ what, lsn: t.head });
  expect({ what, differing: differing(snap.subpageHashes, t.subpages).slice(0, 20) }).toEqual({ what, differing: [] });
  expect({ what, root: hex((await index.root()).root) }).toEqual({ what, root: hex(t.root) });
  const check = await index.check();
  expect({ what, corrupted: check.corrupted }).toEqual({ what, corrupted: [] });
}

/** A value determined by (path, n): the same bytes in every database and history. */
const valueOf = (path: string, n: number) => {
  const h = createHash('sha256').update(`${path}#${n}`).digest();
  return Buffer.concat([h, Buffer.alloc(n % 48, n & 0xff)]);
};

/** Paths with Unicode in them (what Postgres can store: valid UTF-8, no NUL). */
const anyPath = fc.oneof(
  fc.string({ unit: 'grapheme', minLength: 1, maxLength: 8 }).map((s) => `logical/kv/${s}`),
  fc.string({ unit: 'binary', minLength: 1, maxLength: 10 }).filter((s) => !s.includes('\u0000')),
  fc.nat(400).map((n) => `logical/kv/k${n}`),
);

const { seed } = seededRng('merkle-index');

// ------------------------------------------------------------------ a. Node and SQL agree on the subpage

test('property: keyHash/subpageOf (Node) = coffer_key_subpage (SQL) = coffer_entries.merkle_subpage, for Unicode paths', async () => {
  const f = await fresh('mk_subpage');
  const fixed = ['', 'a', 'é', 'e\u0301', '日本語/キー', '🔑/🗝️', '\u{10FFFF}', '\uFFFF', 'ß', 'ẞ', 'İ', 'ﬁ', 'עברית/מפתח', 'a b\tc\n', '👩‍👩‍👧‍👦', 'Ω', 'Ω'];
  const check = async (paths: string[]) => {
    const { rows } = await f.q.query(`SELECT p, coffer_key_subpage(p) AS sp, encode(sha256(convert_to(p, 'UTF8')), 'hex') AS h FROM unnest($1::text[]) AS p`, [paths]);
    expect(rows).toHaveLength(paths.length);
    for (const r of rows) {
      expect({ p: r.p, sp: r.sp }).toEqual({ p: r.p, sp: subpageOf(keyHash(r.p)) });
      expect(hex(keyHash(r.p))).toBe(r.h.slice(0, 32));
    }
  };
  await check(fixed);
  await fc.assert(fc.asyncProperty(fc.array(anyPath, { minLength: 1, maxLength: 60 }), check), { seed, numRuns: 40 });

  // Through the real write path: the stored generated column and the follower's records agree.
  const paths = [...fixed.filter((p) => p !== ''), ...fc.sample(anyPath, { numRuns: 200, seed })];
  const unique = [...new Set(paths)];
  for (let i = 0; i < unique.length; i += 50) await writeTx(f.db, unique.slice(i, i + 50).map((path, j) => ({ path, value: valueOf(path, j) })));
  const { rows } = await f.q.query('SELECT path, merkle_subpage FROM coffer_entries');
  expect(rows).toHaveLength(unique.length);
  for (const r of rows) expect({ p: r.path, sp: r.merkle_subpage }).toEqual({ p: r.path, sp: subpageOf(keyHash(r.path)) });
  const recs: IndexRecord[] = [];
  await sequenceAll(f, (r) => recs.push(...r));
  for (const r of recs) expect({ p: r.path, sp: r.sp }).toEqual({ p: r.path, sp: subpageOf(keyHash(r.path)) });
  // And an index fed those records (it checks every record's subpage) equals the truth.
  const node = openNode(f.tdb.url);
  await node.index.recover();
  await node.index.apply(recs);
  await expectIndexIsTruth(node.index, f, 'unicode paths');
});

// ------------------------------------------------------------------ b. same data, different histories

/**
 * Per key: noise (puts of value ids, deletes) and then its final op (put of the final value, or
 * a delete); keys interleaved by a schedule; split among 1-3 concurrent writers (a key belongs
 * to one writer, so its own order holds); grouped into transactions; some transactions repeated
 * first as a rolled-back one.
 */
const history = (n: number) =>
  fc.record({
    noise: fc.array(fc.array(fc.option(fc.nat(1000), { nil: null }), { maxLength: 4 }), { minLength: n, maxLength: n }),
    schedule: fc.array(fc.nat(), { minLength: 1, maxLength: 100 }),
    txSizes: fc.array(fc.integer({ min: 1, max: 6 }), { minLength: 1, maxLength: 10 }),
    writers: fc.integer({ min: 1, max: 3 }),
    rollbackEvery: fc.integer({ min: 0, max: 4 }),
  });
const sameDataScenario = fc.uniqueArray(anyPath, { minLength: 10, maxLength: 80 }).chain((keys) =>
  fc.record({
    keys: fc.constant(keys),
    final: fc.array(fc.option(fc.nat(1000), { nil: null }), { minLength: keys.length, maxLength: keys.length }),
    a: history(keys.length),
    b: history(keys.length),
  }),
);
type History = { noise: (number | null)[][]; schedule: number[]; txSizes: number[]; writers: number; rollbackEvery: number };

/** The transactions each writer runs, in order. */
function plan(keys: string[], final: (number | null)[], h: History): { ops: Op[]; rollbackFirst: boolean }[][] {
  const asOp = (path: string, n: number | null): Op => ({ path, value: n === null ? null : valueOf(path, n) });
  return Array.from({ length: h.writers }, (_, w) => {
    const mine = keys.map((k, i) => i).filter((i) => i % h.writers === w);
    const queues = mine.map((i) => [...h.noise[i].map((n) => asOp(keys[i], n)), asOp(keys[i], final[i])]);
    const ops: Op[] = [];
    for (let step = 0; ; step++) {
      const live = queues.filter((q) => q.length > 0);
      if (live.length === 0) break;
      ops.push(live[h.schedule[step % h.schedule.length] % live.length].shift()!);
    }
    // Transactions of a few ops each (a key may repeat inside one: its versions still ascend).
    const txs: { ops: Op[]; rollbackFirst: boolean }[] = [];
    let cur: Op[] = [];
    let size = h.txSizes[0];
    for (const op of ops) {
      if (cur.length >= size) {
        txs.push({ ops: cur, rollbackFirst: h.rollbackEvery > 0 && txs.length % h.rollbackEvery === 0 });
        cur = [];
        size = h.txSizes[txs.length % h.txSizes.length];
      }
      cur.push(op);
    }
    if (cur.length) txs.push({ ops: cur, rollbackFirst: false });
    return txs;
  });
}

test('property: two databases given the same final data through different histories have the same subpage hashes and root (= the truth from SQL)', async () => {
  let run = 0;
  await fc.assert(
    fc.asyncProperty(sameDataScenario, async ({ keys, final, a, b }) => {
      run++;
      const results: { subpages: Buffer[]; root: string }[] = [];
      for (const [label, h] of [['a', a], ['b', b]] as const) {
        const f = await fresh(`mk_same_${label}`);
        const node = openNode(f.tdb.url);
        await node.index.recover(); // as the active node does: an empty database, a rebuild
        const writers = plan(keys, final, h);
        const all: IndexRecord[] = [];
        if (label === 'a') {
          // The active node's way: the follower runs while writers write and feeds every batch
          // at once (small batches: applied on the event loop); flushes and checkpoints meanwhile.
          let writing = true;
          const applies: Promise<void>[] = [];
          const follower = (async () => {
            let i = 0;
            while (writing) {
              const r = await follow(f);
              if (r.records.length > 0) applies.push(node.index.apply(r.records));
              if (++i % 3 === 0) applies.push(node.index.flush());
              if (i % 7 === 0) applies.push(node.index.checkpoint());
              await new Promise((res) => setTimeout(res, r.records.length > 0 ? 0 : 2));
            }
          })();
          await Promise.all(writers.map(async (txs) => {
            for (const tx of txs) {
              if (tx.rollbackFirst) await writeTx(f.db, tx.ops, true);
              await writeTx(f.db, tx.ops);
            }
          }));
          writing = false;
          await follower;
          await sequenceAll(f, (r) => applies.push(node.index.apply(r)));
          await Promise.all(applies);
        } else {
          // All writes first, then the whole ordered WAL in one apply (> 256 records: a worker).
          await Promise.all(writers.map(async (txs) => {
            for (const tx of txs) {
              if (tx.rollbackFirst) await writeTx(f.db, tx.ops, true);
              await writeTx(f.db, tx.ops);
            }
          }));
          await sequenceAll(f, (r) => all.push(...r));
          await node.index.apply(all);
        }
        await expectIndexIsTruth(node.index, f, `run ${run} history ${label}`);
        const snap = await node.index.snapshot();
        results.push({ subpages: snap.subpageHashes, root: hex((await node.index.root()).root) });
        // A rebuild from storage agrees too.
        const built = await node.index.buildFromStorage();
        expect(differing(built.subs.map((s) => s.hash!), snap.subpageHashes)).toEqual([]);
        await node.kill();
      }
      expect(differing(results[0].subpages, results[1].subpages)).toEqual([]);
      expect(results[0].root).toBe(results[1].root);
    }),
    { seed, numRuns: 5 },
  );
}, 120_000);

// ------------------------------------------------------------------ c. recovery = rebuild

/** A seeded batch of ops over a key pool: puts of new keys, overwrites, deletes. */
function randomOps(rng: ReturnType<typeof seededRng>, pool: string[], n: number, stamp: number): Op[] {
  return Array.from({ length: n }, (_, i) => {
    const path = pool[rng.int(0, pool.length - 1)];
    return { path, value: rng.next() < 0.25 ? null : valueOf(path, stamp * 1000 + i) };
  });
}

async function writeMany(f: Fresh, ops: Op[], perTx = 8): Promise<void> {
  for (let i = 0; i < ops.length; i += perTx) await writeTx(f.db, ops.slice(i, i + perTx));
}

/**
 * The keys the tests write: 240 packed ten to a subpage (so one subpage collects several keys'
 * changes between flushes, and a lost change is not hidden by a later write of the same key),
 * and 300 spread out (some Unicode), so a flush can hold more than 128 subpages.
 */
const POOL: string[] = (() => {
  const bySp = new Map<number, string[]>();
  for (let i = 0; i < 60_000; i++) {
    const p = `logical/kv/c${i}`;
    const sp = subpageOf(keyHash(p));
    bySp.set(sp, [...(bySp.get(sp) ?? []), p]);
  }
  const dense = [...bySp.values()].filter((ps) => ps.length >= 10).slice(0, 24).flatMap((ps) => ps.slice(0, 10));
  const sparse = Array.from({ length: 300 }, (_, i) => (i % 10 === 0 ? `logical/kv/ключ-${i}/🔑` : `logical/kv/s${i}`));
  return [...dense, ...sparse];
})();
/** Spread-out keys only: about one subpage each. */
const SPREAD = Array.from({ length: 700 }, (_, i) => (i % 10 === 0 ? `logical/kv/ключ-${i}/🗝️` : `logical/kv/t${i}`));

test('recover() after flush + checkpoint + more writes is redo from the redo point only, and equals a full rebuild', async () => {
  const rng = seededRng('merkle-index recover', seed);
  const f = await fresh('mk_recover');
  const n1 = openNode(f.tdb.url);
  expect((await n1.index.recover()).mode).toBe('rebuild'); // no checkpoint yet
  /** Writes, orders and lets the index apply them (catchUp queues behind the applies). */
  const phase = async (node: IndexNode, ops: Op[]) => {
    await writeMany(f, ops);
    return orderAndApply(f, node);
  };

  await phase(n1, randomOps(rng, POOL, 600, 1));
  await n1.index.flush(); // half of the dirty subpages, oldest first
  await n1.index.checkpoint();
  const cp = (await readCheckpoint(f.db))!;
  expect(cp.dirty.size).toBeGreaterThan(0); // a fuzzy checkpoint with dirty pages
  await phase(n1, randomOps(rng, POOL, 300, 2));
  await n1.index.flush(); // some pages now newer than the checkpoint
  const head = await phase(n1, randomOps(rng, POOL, 200, 3));
  const before = hex((await n1.index.root()).root);
  await n1.kill();

  const n2 = openNode(f.tdb.url);
  const report = await n2.index.recover();
  expect(report).toMatchObject({ mode: 'redo', redoFromLsn: cp.redoLsn, recoveredToLsn: head });
  // Time proportional to the WAL since the checkpoint: it read exactly [redoLsn, head].
  expect(report.recordsScanned).toBe(head - cp.redoLsn + 1);
  expect(hex((await n2.index.root()).root)).toBe(before);
  await expectIndexIsTruth(n2.index, f, 'after redo');
  const built = await n2.index.buildFromStorage();
  expect(differing(built.subs.map((s) => s.hash!), (await n2.index.snapshot()).subpageHashes)).toEqual([]);

  // The recovered index carries on: more writes, flush, checkpoint, a second crash, redo again.
  await phase(n2, randomOps(rng, POOL, 200, 4));
  await n2.index.flush(true);
  await n2.index.checkpoint();
  await phase(n2, randomOps(rng, POOL, 50, 5));
  await n2.kill();
  const n3 = openNode(f.tdb.url);
  expect((await n3.index.recover()).mode).toBe('redo');
  await expectIndexIsTruth(n3.index, f, 'after the second redo');
});

// ------------------------------------------------------------------ d. the redo point's WAL is gone

test('recover() whose redo point\'s WAL was deleted (part of it, or all) falls back to a rebuild with the correct root', async () => {
  const rng = seededRng('merkle-index wal-gone', seed);
  for (const how of ['prefix', 'all'] as const) {
    const f = await fresh(`mk_walgone_${how}`);
    const n1 = openNode(f.tdb.url);
    await n1.index.recover();
    await writeMany(f, randomOps(rng, POOL, 300, 1));
    await orderAndApply(f, n1);
    await n1.index.checkpoint(); // dirty pages, redo point at their oldest recLSN
    const cp = (await readCheckpoint(f.db))!;
    expect(cp.dirty.size).toBeGreaterThan(0);
    await writeMany(f, randomOps(rng, POOL, 100, 2));
    await orderAndApply(f, n1);
    await n1.kill();
    // WAL the recovery needs disappears (collection ignoring the redo point, or an operator).
    if (how === 'prefix') await f.q.query('DELETE FROM coffer_wal WHERE lsn <= $1', [cp.redoLsn + 5]);
    else await f.q.query('DELETE FROM coffer_wal');

    const n2 = openNode(f.tdb.url);
    const report = await n2.index.recover();
    expect(report.mode).toBe('rebuild');
    expect(report.reason).toMatch(/is gone/);
    await expectIndexIsTruth(n2.index, f, `rebuilt (${how} of the WAL gone)`);
    // The rebuild wrote a checkpoint: the next recovery is redo again, and correct.
    await writeMany(f, randomOps(rng, POOL, 50, 3));
    await orderAndApply(f, n2);
    await n2.kill();
    const n3 = openNode(f.tdb.url);
    expect((await n3.index.recover()).mode).toBe('redo');
    await expectIndexIsTruth(n3.index, f, `redo after the rebuild (${how})`);
  }
});

// ------------------------------------------------------------------ e. torn flush

test('a torn flush (first 128 images written with newer pageLSNs, the rest stale) recovers to the rebuild\'s root', async () => {
  const rng = seededRng('merkle-index torn', seed);
  const f = await fresh('mk_torn');
  const n1 = openNode(f.tdb.url);
  await n1.index.recover();
  // Enough distinct keys that more than 128 (and more than 256) subpages are dirty.
  await writeMany(f, SPREAD.map((path, i) => ({ path, value: valueOf(path, i) })), 20);
  await orderAndApply(f, n1);
  await n1.index.flush(true);
  await n1.index.checkpoint();
  // Overwrite and delete most keys: now > 256 subpages are dirty with images older than memory.
  await writeMany(f, randomOps(rng, SPREAD, 900, 2), 20);
  await orderAndApply(f, n1);
  expect(n1.index.dirtyPages).toBeGreaterThan(256);
  const dirtyBefore = n1.index.dirtyPages;
  await n1.index.checkpoint(); // a checkpoint naming every dirty page
  const cp = (await readCheckpoint(f.db))!;

  // flush(all) writes 128 images per statement; the process dies after the first statement.
  faults.armed = { point: 'merkle.flush.midBatch', countdown: 1, node: n1 };
  await expect(n1.index.flush(true)).rejects.toBeInstanceOf(Crash);
  await n1.kill();
  // Torn indeed: of the subpages the checkpoint calls dirty (images older than its redo point),
  // exactly the first statement's 128 now have an image at or after the redo point.
  const { rows } = await f.q.query('SELECT count(*) FILTER (WHERE page_lsn >= $2)::int AS newer, count(*)::int AS total FROM coffer_merkle_pages WHERE subpage = ANY($1::int[])', [
    [...cp.dirty.keys()],
    cp.redoLsn,
  ]);
  expect(rows[0]).toEqual({ newer: 128, total: dirtyBefore });

  const n2 = openNode(f.tdb.url);
  const report = await n2.index.recover();
  expect(report.mode).toBe('redo');
  // Only the stale subpages needed redo.
  expect(report.subpagesRedone).toBe(dirtyBefore - 128);
  await expectIndexIsTruth(n2.index, f, 'after the torn flush');
});

// ------------------------------------------------------------------ f. the crash model

/**
 * Seeded: cycles of { new node → recover (with the follower reading what the dead one left,
 * meanwhile) → check against the truth → a random stream of overlapping operations:
 * writes by concurrent transactions (some rolled back), following the WAL with applies not awaited (as
 * the active node feeds the index), partial and full flushes, checkpoints (sometimes right
 * after a full flush, when nothing may be dirty), WAL collection at a small bound (keeping the
 * index's redo point) → a crash: at an armed fault point (its k-th hit), or at a random moment
 * (a timer) }. Every statement and worker task of the node is delayed by a random 0-4 ms now
 * and then, so flushes, checkpoints and applies interleave in many ways.
 */
test('crash model: at fault points and random moments under load, every recovery equals the storage; all but the first are redo', async () => {
  const rng = seededRng('merkle-index crash model', seed);
  const f = await fresh('mk_model');
  const CYCLES = 60;
  const modes: string[] = [];
  const crashes = new Map<string, number>();
  const unexpected: string[] = [];
  let stamp = 0;
  const jitter = () => (rng.next() < 0.3 ? rng.int(0, 4) : 0);
  const sleep = (ms: number) => new Promise((res) => setTimeout(res, ms));
  for (let cycle = 0; cycle < CYCLES; cycle++) {
    const node = openNode(f.tdb.url, [0.1, 0.5, 1][rng.int(0, 2)], mpool, jitter);
    const applies: Promise<unknown>[] = [];
    const recovered = node.index.recover();
    await sequenceAll(f, (r) => applies.push(node.index.apply(r)));
    const report = await recovered;
    await Promise.all(applies);
    modes.push(report.mode === 'redo' ? 'redo' : `rebuild (${report.reason})`);
    await expectIndexIsTruth(node.index, f, `cycle ${cycle} after ${[...crashes.entries()].map(([k, v]) => `${k}=${v}`).join(',')} (recovery ${JSON.stringify(report)})`);

    const point = rng.next() < 0.7 ? FAULT_POINTS[rng.int(0, FAULT_POINTS.length - 1)] : null;
    let killer: NodeJS.Timeout | undefined;
    if (point) faults.armed = { point, countdown: rng.int(1, 3), node };
    else killer = setTimeout(() => (node.dead = true), rng.int(5, 150));
    const pending: Promise<unknown>[] = [];
    const writes: Promise<unknown>[] = [];
    for (let s = 0; s < 60 && !node.dead; s++) {
      const r = rng.next();
      if (r < 0.3) {
        // Concurrent writers; each transaction takes its rows in path order (no deadlocks).
        const ops = randomOps(rng, POOL, rng.int(1, 25), ++stamp).sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
        writes.push(writeTx(f.db, ops, rng.next() < 0.1));
        if (writes.length >= 3) await Promise.all(writes.splice(0));
      } else if (r < 0.5) {
        const q = await follow(f);
        if (q.records.length > 0) pending.push(node.index.apply(q.records));
      } else if (r < 0.65) {
        pending.push(node.index.flush(rng.next() < 0.3));
      } else if (r < 0.7) {
        pending.push(node.index.checkpoint());
      } else if (r < 0.84) {
        // A flush (often of everything) and, while it runs or right after it, a checkpoint: it
        // must count the subpages being written as dirty until they are.
        pending.push(node.index.flush(rng.next() < 0.6));
        if (rng.next() < 0.5) await sleep(rng.int(0, 3));
        pending.push(node.index.checkpoint());
      } else if (r < 0.92) {
        // What the active node does after each checkpoint.
        pending.push(collectWal(node.db, { maxRows: 40, maxBytes: 1 << 30 }, node.index.redoPoint));
      } else {
        await Promise.allSettled(pending);
      }
      if (rng.next() < 0.4) await sleep(rng.int(0, 3));
    }
    // A fault armed but not reached in 60 steps: die now, with whatever is in flight.
    const why = point && faults.armed === null ? `fault ${point}` : 'random moment';
    node.dead = true;
    clearTimeout(killer);
    faults.armed = null;
    await Promise.all(writes);
    for (const s of await Promise.allSettled(pending)) {
      if (s.status === 'rejected') {
        const err = s.reason as Error;
        if (!(err instanceof Crash) && !/crashed/.test(err.message)) unexpected.push(`cycle ${cycle}: ${err.message}`);
      }
    }
    crashes.set(why, (crashes.get(why) ?? 0) + 1);
    await node.kill();
  }
  // The last crash's recovery, checked too.
  const last = openNode(f.tdb.url);
  const recovered = last.index.recover();
  await sequenceAll(f, (r) => void last.index.apply(r));
  modes.push((await recovered).mode);
  await last.index.catchUp(await walHead(f.db));
  await expectIndexIsTruth(last.index, f, 'after the last crash');

  const t = await truth(f);
  const oldest = await f.q.query('SELECT min(lsn)::bigint AS lo FROM coffer_wal WHERE lsn IS NOT NULL');
  // eslint-disable-next-line no-console
  console.log(
    `[merkle-index crash model] ${CYCLES} crashes: ${[...crashes.entries()].map(([k, v]) => `${k}: ${v}`).join(', ')}; ` +
      `recoveries: ${modes.filter((m) => m === 'redo').length} redo, ${modes.filter((m) => m !== 'redo').length} other (${[...new Set(modes.filter((m) => m !== 'redo'))].join('; ')}); ` +
      `head ${t.head}, ${t.keys} live keys, oldest retained WAL ${oldest.rows[0].lo}; fault hits ${JSON.stringify(Object.fromEntries(faults.hits))}`,
  );
  expect(unexpected).toEqual([]);
  // Every fault point was reached and killed the node at least once.
  expect(FAULT_POINTS.filter((p) => !crashes.has(`fault ${p}`))).toEqual([]);
  // The WAL really was collected (recovery worked with a bounded WAL) ...
  expect(Number(oldest.rows[0].lo)).toBeGreaterThan(1);
  // ... and only the very first recovery (no checkpoint yet) was a rebuild.
  expect(modes[0]).toMatch(/^rebuild \(no checkpoint\)/);
  expect(modes.slice(1).filter((m) => m !== 'redo')).toEqual([]);
}, 180_000);

// ------------------------------------------------------------------ g. merkle-check while writes commit

/**
 * merkle-check (`MerkleIndex.check`, sys/replication/merkle-check) rebuilds from one REPEATABLE
 * READ snapshot of coffer_entries and compares with the live index brought to the snapshot's
 * WAL head. Under the former design (a sequencer numbered rows after commit, behind the xmin
 * horizon) a committed write could be in the snapshot but not under its head, and check()
 * reported the correct index as corrupted (found by this test, fixed in aca554c). Writers now
 * number their rows before COMMIT, so the head in a snapshot covers every entry in it; this
 * test keeps the old scenario: a slow writer holds a transaction with an xid open while another
 * write commits and the follower feeds the index, and the check must find nothing wrong.
 */
test('merkle-check does not report a correct index as corrupted while a slow writer holds a transaction open', async () => {
  const f = await fresh('mk_check');
  const node = openNode(f.tdb.url);
  await node.index.recover();
  await writeMany(f, POOL.slice(0, 50).map((path, i) => ({ path, value: valueOf(path, i) })));
  const head = await orderAndApply(f, node);
  await expectIndexIsTruth(node.index, f, 'before');

  // The active node's follower, running all along and feeding the index.
  let running = true;
  const follower = (async () => {
    while (running) {
      const r = await follow(f);
      if (r.records.length > 0) void node.index.apply(r.records);
      await new Promise((res) => setTimeout(res, 5));
    }
  })();
  const slow = await f.db.startTransaction().execute();
  try {
    await putEntry(slow, 'logical/kv/slow-writer', valueOf('slow', 1), TERM); // takes an xid and stays open
    await writeTx(f.db, [{ path: 'logical/kv/just-committed', value: valueOf('x', 1) }]);
    // Numbered at commit, whatever the slow writer does.
    expect(await walHead(f.db)).toBe(head + 1);
    const checking = node.index.check();
    // The slow writer gives up a little later (its own write never happens).
    const giveUp = setTimeout(() => void rollbackQuietly(slow), 300);
    const check = await checking;
    clearTimeout(giveUp);
    expect(check.corrupted).toEqual([]);
    expect(check.lsn).toBe(head + 1); // the committed write, in the index
  } finally {
    await rollbackQuietly(slow);
    running = false;
    await follower;
  }
  await expectIndexIsTruth(node.index, f, 'after');
});

// ------------------------------------------------------------------ h. overlapping checkpoints

/**
 * The active node's housekeeping timer (setInterval, checkpoint_interval) does not wait for the
 * previous checkpoint, and `checkpoint()` does not serialise itself (flush does). Two
 * checkpoints can overlap: A captures its dirty-page table (redo point rA), then hashes stale
 * subpages in a worker; B starts later, captures a cleaner table (rB > rA), finishes first and
 * moves `redoPoint` to rB; the WAL collection after B deletes WAL below rB; then A's write lands
 * and the stored checkpoint is A's again, whose redo point's WAL is gone. The next recovery
 * cannot redo and rebuilds from storage (correct, but O(keys) instead of O(WAL since the
 * checkpoint)). Made deterministic here by holding A's hashing task until B and the collection
 * are done.
 */
test('overlapping checkpoints: an older checkpoint never replaces a newer one whose redo point the WAL collection already used', async () => {
  const rng = seededRng('merkle-index overlap', seed);
  const f = await fresh('mk_overlap');
  let hold: { reached: () => void; release: Promise<void> } | null = null;
  const gated = {
    run: async (name: string, arg: unknown) => {
      const h = hold;
      if (h && name === 'hashRuns') {
        hold = null;
        h.reached();
        await h.release;
      }
      return mpool.run(name as 'hashRuns', arg as { runs: Uint8Array[] });
    },
  } as unknown as MerklePool;
  const n1 = openNode(f.tdb.url, 0.5, gated);
  await n1.index.recover();
  await writeMany(f, randomOps(rng, POOL, 300, 1));
  await orderAndApply(f, n1);
  await n1.index.flush(true);
  await n1.index.checkpoint();
  // New changes: dirty subpages whose hashes are stale.
  await writeMany(f, randomOps(rng, POOL, 100, 2));
  await orderAndApply(f, n1);
  await writeMany(f, randomOps(rng, POOL, 100, 3));
  await orderAndApply(f, n1);

  // Checkpoint A: captures the dirty-page table, then waits in its hashing task.
  let release!: () => void;
  const reached = new Promise<void>((r) => (hold = { reached: r, release: new Promise<void>((rr) => (release = rr)) }));
  const a = n1.index.checkpoint();
  await reached;
  // Meanwhile the next housekeeping run: a full flush, checkpoint B (nothing dirty: its redo
  // point would be head + 1), then the collection the active node runs after a checkpoint.
  await n1.index.flush(true);
  const b = n1.index.checkpoint();
  // B either runs on its own (and then finishes within milliseconds: it has nothing to hash)
  // or waits for A; give it that chance, bounded, rather than deadlock on the held A.
  if (b !== a) await Promise.race([b, new Promise((r) => setTimeout(r, 2000))]);
  await collectWal(n1.db, { maxRows: 10, maxBytes: 1 << 30 }, n1.index.redoPoint);
  // A finishes.
  release();
  await a;
  await b;
  const stored = (await readCheckpoint(f.db))!;
  const oldest = Number((await f.q.query('SELECT min(lsn)::bigint AS lo FROM coffer_wal WHERE lsn IS NOT NULL')).rows[0].lo);
  // What is stored is what the collection respected, and its redo point's WAL is retained.
  expect({ storedRedo: stored.redoLsn, indexRedoPoint: n1.index.redoPoint }).toEqual({ storedRedo: n1.index.redoPoint, indexRedoPoint: n1.index.redoPoint });
  expect({ storedRedo: stored.redoLsn, oldest, retained: oldest <= stored.redoLsn }).toEqual({ storedRedo: stored.redoLsn, oldest, retained: true });
  await n1.kill();
  const n2 = openNode(f.tdb.url);
  const report = await n2.index.recover();
  await expectIndexIsTruth(n2.index, f, 'after overlapping checkpoints');
  expect({ mode: report.mode, reason: report.reason }).toEqual({ mode: 'redo', reason: 'checkpoint' });
});

// ------------------------------------------------------------------ i. ARIES bookkeeping, made deterministic

/**
 * Two windows the crash model hits only sometimes, each pinned down:
 *  1. a subpage changed twice keeps the recLSN of its FIRST change (else the checkpoint's redo
 *     point skips that change: lost unless a later write of the same key hides it);
 *  2. a checkpoint taken while a flush is writing counts the subpages being written as dirty
 *     (else, dying after the checkpoint and before the flush's write, their changes are lost).
 */
test('ARIES bookkeeping: a twice-changed subpage keeps its first recLSN; a checkpoint during a flush counts the in-flight subpages', async () => {
  const f = await fresh('mk_aries');
  // Two keys of one subpage (POOL packs ten to a subpage).
  const [k1, k2] = POOL.slice(0, 2);
  expect(subpageOf(keyHash(k1))).toBe(subpageOf(keyHash(k2)));
  const sp = subpageOf(keyHash(k1));

  // 1. Everything clean; then k1 (LSN a) and k2 (LSN b) change the same subpage.
  const n1 = openNode(f.tdb.url);
  await n1.index.recover();
  await writeMany(f, POOL.map((path, i) => ({ path, value: valueOf(path, i) })), 20);
  await orderAndApply(f, n1);
  await n1.index.flush(true);
  await writeTx(f.db, [{ path: k1, value: valueOf(k1, 1001) }]);
  const a = await orderAndApply(f, n1);
  await writeTx(f.db, [{ path: k2, value: valueOf(k2, 1002) }]);
  await orderAndApply(f, n1);
  await n1.index.checkpoint();
  const cp1 = (await readCheckpoint(f.db))!;
  expect([...cp1.dirty.entries()]).toEqual([[sp, a]]);
  expect(cp1.redoLsn).toBe(a);
  await n1.kill();
  const n2 = openNode(f.tdb.url);
  await n2.index.recover();
  await expectIndexIsTruth(n2.index, f, 'after a crash with a twice-changed subpage');

  // 2. A flush of k1's and k2's subpage (and others) is held in its hashing task; a checkpoint
  // is taken and written meanwhile; the process dies before the flush writes anything.
  await n2.kill();
  let release!: () => void;
  let holdNext = false;
  let reached!: () => void;
  const atHash = new Promise<void>((r) => (reached = r));
  const gated = {
    run: async (name: string, arg: unknown) => {
      if (holdNext && name === 'hashRuns') {
        holdNext = false;
        reached();
        await new Promise<void>((r) => (release = r));
      }
      return mpool.run(name as 'hashRuns', arg as { runs: Uint8Array[] });
    },
  } as unknown as MerklePool;
  const n3 = openNode(f.tdb.url, 0.5, gated);
  await n3.index.recover();
  await n3.index.flush(true);
  await n3.index.checkpoint();
  await writeMany(f, POOL.slice(0, 40).map((path, i) => ({ path, value: valueOf(path, 2000 + i) })), 5);
  await orderAndApply(f, n3);
  holdNext = true;
  const flushing = n3.index.flush(true);
  await atHash;
  // The checkpoint hashes nothing itself here (no other stale subpage), so it is not held.
  await n3.index.checkpoint();
  const cp2 = (await readCheckpoint(f.db))!;
  expect(cp2.dirty.size).toBeGreaterThan(0); // the in-flight subpages, with their recLSNs
  await n3.kill(); // dies before the flush's write
  release();
  await flushing.catch(() => undefined);
  const n4 = openNode(f.tdb.url);
  expect((await n4.index.recover()).mode).toBe('redo');
  await expectIndexIsTruth(n4.index, f, 'after a crash between a checkpoint and the flush it overlapped');
});

// ------------------------------------------------------------------ j. housekeeping when idle, and the WAL's byte bound

test('an idle checkpoint writes nothing; the first one after a change does', async () => {
  const f = await fresh('merkle-idle-checkpoint');
  const n1 = openNode(f.tdb.url);
  await n1.index.recover();
  await writeMany(f, POOL.slice(0, 40).map((path, i) => ({ path, value: valueOf(path, i) })));
  await orderAndApply(f, n1);
  await n1.index.flush(true);
  await n1.index.checkpoint();
  // xmin names the transaction that wrote the row version: the same one means no write at all.
  const version = async () => (await f.q.query('SELECT xmin::text AS x, checkpoint_lsn::bigint AS lsn FROM coffer_merkle_checkpoint')).rows;
  const clean = await version();
  expect(clean).toHaveLength(1);
  await n1.index.checkpoint();
  await n1.index.checkpoint();
  expect(await version()).toEqual(clean);
  // A change: the next checkpoint records it (dirty, then clean once flushed).
  await writeTx(f.db, [{ path: POOL[0], value: valueOf(POOL[0], 999) }]);
  const head = await orderAndApply(f, n1);
  await n1.index.checkpoint();
  const dirty = await version();
  expect(dirty).not.toEqual(clean);
  expect(Number(dirty[0].lsn)).toBe(head);
  expect((await readCheckpoint(f.db))!.dirty.size).toBe(1);
  await n1.index.flush(true);
  await n1.index.checkpoint();
  expect((await readCheckpoint(f.db))!.dirty.size).toBe(0);
  await n1.kill();
  const n2 = openNode(f.tdb.url);
  expect((await n2.index.recover()).mode).toBe('redo');
  await expectIndexIsTruth(n2.index, f, 'after idle checkpoints');
});

test("WAL collection keeps the newest rows within the byte bound, as well as the row bound", async () => {
  const f = await fresh('merkle-wal-bytes');
  // 60 ordered rows whose values are 100 … 690 bytes.
  for (let i = 0; i < 60; i++) await writeTx(f.db, [{ path: `bytes/${i}`, value: Buffer.alloc(100 + 10 * i, i) }]);
  const head = await sequenceAll(f);
  const rows = async () =>
    (await f.q.query('SELECT lsn::int AS lsn, value_size::int AS size FROM coffer_wal WHERE lsn IS NOT NULL ORDER BY lsn DESC')).rows as { lsn: number; size: number }[];
  const all = await rows();
  expect(all).toHaveLength(60);
  // What the bound keeps: the newest rows while their bytes (value + per-row overhead) fit.
  const keepWithin = (maxBytes: number) => {
    let bytes = 0;
    return all.filter((r) => (bytes += r.size + WAL_ROW_OVERHEAD_BYTES) <= maxBytes).map((r) => r.lsn);
  };
  // Bytes bind first.
  const maxBytes = 10_000;
  const expected = keepWithin(maxBytes);
  expect(expected.length).toBeLessThan(50);
  const r = await collectWal(f.db, { maxRows: 50, maxBytes }, Number.MAX_SAFE_INTEGER);
  expect((await rows()).map((x) => x.lsn)).toEqual(expected);
  expect(r).toEqual({ deleted: 60 - expected.length, cutoff: head - expected.length, wanted: head - expected.length });
  // Rows bind first: the bytes of the newest 5 fit easily.
  expect(await collectWal(f.db, { maxRows: 5, maxBytes }, Number.MAX_SAFE_INTEGER)).toMatchObject({ deleted: expected.length - 5 });
  expect((await rows()).map((x) => x.lsn)).toEqual([head, head - 1, head - 2, head - 3, head - 4]);
});

/**
 * Storage-level WAL tests, in this process, on real Postgres (a fresh database per test). WAL
 * rows get their positions from the transaction that writes them, as its last statement, under
 * the head row's lock held to commit (src/storage/entries.ts; DESIGN.md invariant 2):
 *
 *  a. commit order is position order whatever the xids (the xid trap's interleaving, built
 *     deterministically with three transactions), a slow transaction delays nobody, a writer
 *     waiting for the head gets a dense position when the one before it rolls back, and rows a
 *     transaction did not number are numbered inside its COMMIT (waiting for the head there);
 *  b. invariant 1 (atomic WAL) after a seeded random mix of puts, deletes, multi-key
 *     transactions and rollbacks from 8 concurrent writers;
 *  c. both numbering paths at once (one-statement batched writes, multi-statement
 *     transactions) from two pools: positions dense and unique, a tailer never sees a gap;
 *  d. rows left unnumbered by the previous version (its sequencer numbered them after commit)
 *     are numbered by coffer_order_stragglers in per-key version order; a WAL reset restarts at 1.
 *
 * Interleaving control (a): kysely's `startTransaction()` returns a ControlledTransaction — a
 * `Transaction<DB>` pinned to one pooled connection that stays open until we commit it — so the
 * real `putEntry` and `stampWal` run inside each transaction and the test decides when each
 * statement runs and when each transaction commits. No SQL of the code under test is copied here.
 */
import { createHash, randomBytes } from 'node:crypto';
import { sql, type ControlledTransaction, type Kysely, type Transaction } from 'kysely';
import { openPostgres, type Database } from '../../src/storage/db';
import { casWriteBatch, deleteEntry, getEntry, putEntry, stampWal, walTransaction, type WrittenRow } from '../../src/storage/entries';
import { migrateToLatest } from '../../src/storage/migrate';
import type { DB } from '../../src/storage/schema';
import { orderStragglers, readNewWal, readWal, walHead } from '../../src/storage/wal';
import { wipeReplicated } from '../../src/storage/replication';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';
import { atomicWalViolations, closeBounded, rollbackQuietly, TERM, unorderedCount, walOrderViolations, WalTailer, type Queryable } from '../helpers/wal-invariants';

// Cleanup order: plain clients, then the databases (DROP ... WITH (FORCE) ends this file's own
// sessions on them, so nothing a failed test left open keeps a transaction open), then the
// pools — bounded, as a pool waits for connections still checked out.
const clients: { end(): Promise<void> }[] = [];
const dbs: TestDatabase[] = [];
const pools: Database[] = [];
afterAll(async () => {
  for (const c of clients) await c.end().catch(() => undefined);
  for (const d of dbs) await d.drop().catch(() => undefined);
  for (const p of pools) await closeBounded(() => p.close());
});

/** A fresh, migrated database and a pool on it; dropped in afterAll. */
async function fresh(label: string, poolSize = 12): Promise<{ tdb: TestDatabase; database: Database; q: Queryable }> {
  const tdb = await createTestDatabase(label);
  dbs.push(tdb);
  const database = openPostgres(tdb.url, poolSize);
  pools.push(database);
  await migrateToLatest(database.db);
  const q = await sqlClient(tdb.url);
  clients.push(q);
  return { tdb, database, q };
}

/** `p`, or a rejection after `ms` naming what did not happen. */
async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const xidOf = async (tx: Transaction<DB>) =>
  BigInt((await sql<{ xid: string }>`SELECT pg_current_xact_id()::text AS xid`.execute(tx)).rows[0].xid);
const pidOf = async (tx: Transaction<DB>) => (await sql<{ pid: number }>`SELECT pg_backend_pid() AS pid`.execute(tx)).rows[0].pid;
const waitsOnLock = (db: Kysely<DB>, pid: number) =>
  waitFor(`backend ${pid} to wait on a lock`, async () => {
    const { rows } = await sql<{ w: string | null }>`SELECT wait_event_type AS w FROM pg_stat_activity WHERE pid = ${pid}`.execute(db);
    return rows[0]?.w === 'Lock';
  });
const log = async (db: Kysely<DB>) => (await readWal(db, 0, 1000)).map((r) => `${r.lsn}:${r.path}@${r.keyVersion}`);
/** A controlled transaction (registered in `open` for cleanup) that has written `path`. */
async function writing(db: Kysely<DB>, open: ControlledTransaction<DB>[], path: string): Promise<ControlledTransaction<DB>> {
  const t = await db.startTransaction().execute();
  open.push(t);
  await putEntry(t, path, Buffer.from(path), TERM);
  return t;
}

// ------------------------------------------------------------------------------------------ a

test('the xid trap: a later write to K that took its xid first gets a later position; a slow transaction delays nobody', async () => {
  const { database, q } = await fresh('wal_trap');
  const { db } = database;
  const open: ControlledTransaction<DB>[] = [];
  try {
    // T2 begins and takes an xid first by writing Z.
    const t2 = await db.startTransaction().execute();
    open.push(t2);
    await putEntry(t2, 'trap/z', Buffer.from('z1'), TERM);
    const t2Xid = await xidOf(t2);
    const t2Pid = await pidOf(t2);

    // T3 begins, takes an xid and stays open: a slow writer of an unrelated key.
    const t3 = await db.startTransaction().execute();
    open.push(t3);
    await putEntry(t3, 'trap/u', Buffer.from('u1'), TERM);
    const t3Xid = await xidOf(t3);

    // T1 begins, takes an xid, writes K: version 1.
    const t1 = await db.startTransaction().execute();
    open.push(t1);
    const k1 = await putEntry(t1, 'trap/k', Buffer.from('k1'), TERM);
    const t1Xid = await xidOf(t1);
    expect(k1.keyVersion).toBe(1);
    // The scenario really is the trap: by xid, T2 < T3 < T1.
    expect(t2Xid < t3Xid && t3Xid < t1Xid).toBe(true);

    // T2 writes K: it must wait for T1 (uncommitted insert of the same key).
    const k2Promise = putEntry(t2, 'trap/k', Buffer.from('k2'), TERM);
    let k2Done = false;
    void k2Promise.then(() => (k2Done = true), () => undefined);
    await waitsOnLock(db, t2Pid);
    expect(k2Done).toBe(false);

    // T1 numbers its row and commits, with T2 and T3 still open: K v1 is position 1 at once.
    expect(await stampWal(t1)).toBe(1);
    await t1.commit().execute();
    expect(await log(db)).toEqual(['1:trap/k@1']);

    const k2 = await k2Promise;
    expect(k2.keyVersion).toBe(2);
    // T2's rows, in the order it wrote them (Z, then K v2), after T1's.
    expect(await stampWal(t2)).toBe(3);
    await t2.commit().execute();
    expect(await log(db)).toEqual(['1:trap/k@1', '2:trap/z@1', '3:trap/k@2']);
    expect(await walHead(db)).toBe(3);

    // T3, the oldest running transaction all along, held nobody back; it comes last.
    expect(await stampWal(t3)).toBe(4);
    await t3.commit().execute();
    open.length = 0;
    const shape = await walOrderViolations(q);
    expect(shape.violations).toEqual([]);
    expect(shape).toMatchObject({ rows: 4, ordered: 4, head: 4 });
    expect(await atomicWalViolations(q)).toEqual([]);
  } finally {
    // Concurrently: rolling back T2 while its K write waits on T1 would wait for T1's rollback.
    await Promise.all(open.map(rollbackQuietly));
  }
});

test('a writer numbering its rows waits for the one before it to commit, and a rollback leaves no gap', async () => {
  const { database, q } = await fresh('wal_head_lock', 4);
  const { db } = database;
  const open: ControlledTransaction<DB>[] = [];
  try {
    const t1 = await writing(db, open, 'hl/a');
    expect(await stampWal(t1)).toBe(1); // holds the head until it ends

    const t2 = await writing(db, open, 'hl/b');
    const t2Pid = await pidOf(t2);
    const stamped = stampWal(t2);
    let got: number | null = null;
    void stamped.then((n) => (got = n), () => undefined);
    await waitsOnLock(db, t2Pid);
    expect(got).toBeNull();

    // T1 gives up: its position 1 was never committed, so T2 takes it (dense).
    await t1.rollback().execute();
    expect(await within(stamped, 10_000, "T2's numbering")).toBe(1);
    await t2.commit().execute();
    open.length = 0;
    expect(await log(db)).toEqual(['1:hl/b@1']);
    expect(await walOrderViolations(q)).toMatchObject({ violations: [], rows: 1, ordered: 1, head: 1 });
  } finally {
    await Promise.all(open.map(rollbackQuietly));
  }
});

test('rows a transaction wrote without positions are numbered inside its COMMIT, in the order written', async () => {
  const { database, q } = await fresh('wal_at_commit', 4);
  const { db } = database;
  // A bare kysely transaction that never numbers its rows: the deferred trigger does, at COMMIT.
  await db.transaction().execute(async (tx) => {
    await putEntry(tx, 'ac/a', Buffer.from('a1'), TERM);
    await putEntry(tx, 'ac/b', Buffer.from('b1'), TERM);
    await putEntry(tx, 'ac/a', Buffer.from('a2'), TERM);
    // Not yet: no position, and the head untouched (no lock on it while the transaction runs).
    expect((await sql<{ n: number }>`SELECT count(*)::int AS n FROM coffer_wal WHERE lsn IS NOT NULL`.execute(tx)).rows[0].n).toBe(0);
  });
  expect(await log(db)).toEqual(['1:ac/a@1', '2:ac/b@1', '3:ac/a@2']);
  expect(await unorderedCount(q)).toBe(0);
  // A transaction that wrote no WAL row numbers nothing and locks nothing.
  expect((await walTransaction(db, async () => 'nothing')).lastLsn).toBe(0);
  // walTransaction reads its positions back after the commit.
  expect((await walTransaction(db, (tx) => putEntry(tx, 'ac/c', Buffer.from('c'), TERM))).lastLsn).toBe(4);
  // Numbering before COMMIT (stampWal) and at COMMIT do not number twice.
  await db.transaction().execute(async (tx) => {
    await putEntry(tx, 'ac/d', Buffer.from('d'), TERM);
    expect(await stampWal(tx)).toBe(5);
    await putEntry(tx, 'ac/e', Buffer.from('e'), TERM); // after the stamp: numbered at COMMIT
  });
  expect(await walOrderViolations(q)).toMatchObject({ violations: [], rows: 6, ordered: 6, head: 6 });
  expect(await atomicWalViolations(q)).toEqual([]);
});

test('a transaction numbering at COMMIT waits for the head like any writer, and never holds it before', async () => {
  const { database, q } = await fresh('wal_commit_wait', 4);
  const { db } = database;
  const open: ControlledTransaction<DB>[] = [];
  try {
    // T1 holds the head (numbered, not committed). T2 wrote a row without taking the head (it
    // got this far while T1 held it) and commits: its COMMIT (the trigger) waits for the head.
    const t1 = await writing(db, open, 'cw/a');
    expect(await stampWal(t1)).toBe(1);
    const t2 = await writing(db, open, 'cw/b');
    const t2Pid = await pidOf(t2);
    let committed = false;
    const commit2 = t2.commit().execute().then(() => (committed = true));
    await waitsOnLock(db, t2Pid);
    expect(committed).toBe(false);
    await t1.commit().execute();
    await within(commit2, 10_000, "T2's commit");
    open.length = 0;
    expect(await log(db)).toEqual(['1:cw/a@1', '2:cw/b@1']);
    expect(await walOrderViolations(q)).toMatchObject({ violations: [], rows: 2, ordered: 2, head: 2 });
  } finally {
    await Promise.all(open.map(rollbackQuietly));
  }
});

// ------------------------------------------------------------------------------------------ b

test('invariant 1: after a random mix from 8 concurrent writers, each entry has WAL rows for exactly versions 1..version', async () => {
  const { database, q } = await fresh('wal_atomic', 12);
  const { db } = database;
  const rng = seededRng('wal atomic mix');
  const PATHS = Array.from({ length: 10 }, (_, i) => `mix/p${i}`);
  const WRITERS = 8;
  const TXS_PER_WRITER = 40;

  // Deleting what was never written writes nothing and creates nothing.
  await walTransaction(db, async (tx) => expect(await deleteEntry(tx, 'mix/never')).toBeNull());

  // The client's log: every row returned by a transaction that committed.
  const committed: { path: string; op: 'put' | 'delete'; value: Buffer | null; row: WrittenRow }[] = [];
  let rolledBack = 0;
  let deadlocks = 0;
  let noopDeletes = 0;

  // Draw the whole plan up front from the seeded RNG, so the plan (not the interleaving) replays.
  type Op = { kind: 'put'; path: string; value: Buffer } | { kind: 'delete'; path: string };
  const plans: { ops: Op[]; rollback: boolean }[][] = Array.from({ length: WRITERS }, () =>
    Array.from({ length: TXS_PER_WRITER }, () => {
      const n = rng.next() < 0.7 ? 1 : rng.int(2, 3);
      const ops: Op[] = Array.from({ length: n }, () => {
        const path = PATHS[rng.int(0, PATHS.length - 1)];
        if (rng.next() < 0.6) {
          const value = Buffer.alloc(rng.int(1, 64));
          for (let i = 0; i < value.length; i++) value[i] = rng.int(0, 255);
          return { kind: 'put', path, value };
        }
        return { kind: 'delete', path };
      });
      return { ops, rollback: rng.next() < 0.1 };
    }),
  );

  class PlannedRollback extends Error {}
  await Promise.all(
    plans.map(async (plan) => {
      for (const { ops, rollback } of plan) {
        const mine: typeof committed = [];
        try {
          await walTransaction(db, async (tx) => {
            for (const op of ops) {
              if (op.kind === 'put') {
                mine.push({ path: op.path, op: 'put', value: op.value, row: await putEntry(tx, op.path, op.value, TERM) });
              } else {
                const row = await deleteEntry(tx, op.path);
                if (row) mine.push({ path: op.path, op: 'delete', value: null, row });
                else noopDeletes++;
              }
            }
            if (rollback) throw new PlannedRollback();
          });
          committed.push(...mine);
        } catch (err) {
          if (err instanceof PlannedRollback) rolledBack++;
          // Multi-key transactions in random order can deadlock; Postgres aborts one of them.
          else if ((err as { code?: string }).code === '40P01') deadlocks++;
          else throw err;
        }
      }
    }),
  );
  // eslint-disable-next-line no-console
  console.log(`[wal atomic mix] committed rows=${committed.length} rolledBack=${rolledBack} deadlocks=${deadlocks} noopDeletes=${noopDeletes}`);
  expect(committed.length).toBeGreaterThan(100);
  expect(rolledBack).toBeGreaterThan(0);

  // The SQL view of invariant 1.
  expect(await atomicWalViolations(q)).toEqual([]);

  // The client's view: the WAL holds exactly the rows that committed transactions reported —
  // nothing from rolled-back or deadlocked ones — with the same seq and version.
  const wal = await db.selectFrom('coffer_wal').select(['seq', 'path', 'op', 'key_version', 'value_hash']).orderBy('seq').execute();
  const fromClient = committed.map((c) => `${c.row.seq} ${c.path}@${c.row.keyVersion} ${c.op}`).sort();
  expect(wal.map((w) => `${w.seq} ${w.path}@${w.key_version} ${w.op}`).sort()).toEqual(fromClient);
  for (const c of committed) {
    if (c.op !== 'put') continue;
    const w = wal.find((x) => x.seq === c.row.seq)!;
    expect(w.value_hash!.equals(createHash('sha256').update(c.value!).digest())).toBe(true);
  }

  // Per path: versions are 1..version, and the entry holds what the highest version wrote.
  const entries = await db.selectFrom('coffer_entries').select(['path', 'version', 'value']).execute();
  expect(entries.map((e) => e.path).sort()).toEqual([...new Set(committed.map((c) => c.path))].sort());
  for (const e of entries) {
    const mine = committed.filter((c) => c.path === e.path).sort((x, y) => x.row.keyVersion - y.row.keyVersion);
    expect(mine.map((c) => c.row.keyVersion)).toEqual(Array.from({ length: e.version }, (_, i) => i + 1));
    const lastOp = mine[mine.length - 1];
    if (lastOp.op === 'put') expect(e.value!.equals(lastOp.value!)).toBe(true);
    else expect(e.value).toBeNull();
    expect(await getEntry(db, e.path)).toEqual(e.value);
  }

  // Deleting a tombstone (or a missing key) neither bumps the version nor writes a WAL row.
  const tomb = entries.find((e) => e.value === null) ?? (await (async () => {
    await walTransaction(db, async (tx) => deleteEntry(tx, PATHS[0]));
    return db.selectFrom('coffer_entries').select(['path', 'version', 'value']).where('path', '=', PATHS[0]).executeTakeFirstOrThrow();
  })());
  const walBefore = (await q.query('SELECT count(*)::int AS n FROM coffer_wal')).rows[0].n;
  await walTransaction(db, async (tx) => expect(await deleteEntry(tx, tomb.path)).toBeNull());
  expect((await q.query('SELECT count(*)::int AS n FROM coffer_wal')).rows[0].n).toBe(walBefore);
  const after = await db.selectFrom('coffer_entries').select(['version', 'value']).where('path', '=', tomb.path).executeTakeFirstOrThrow();
  expect(after).toEqual({ version: tomb.version, value: null });
  expect(await db.selectFrom('coffer_entries').select('path').where('path', '=', 'mix/never').executeTakeFirst()).toBeUndefined();
  // Re-creating a tombstoned key continues its version line (never goes backwards).
  const { result: recreated } = await walTransaction(db, (tx) => putEntry(tx, tomb.path, Buffer.from('again'), TERM));
  const tombVersion = (await db.selectFrom('coffer_wal').select(({ fn }) => fn.max('key_version').as('m')).where('path', '=', tomb.path).where('seq', '<>', recreated.seq).executeTakeFirstOrThrow()).m;
  expect(recreated.keyVersion).toBe(Number(tombVersion) + 1);
  expect(await atomicWalViolations(q)).toEqual([]);

  // And every committed row has its position: dense, per key in version order.
  expect((await walOrderViolations(q)).violations).toEqual([]);
});

// ------------------------------------------------------------------------------------------ c

test('both numbering paths at once from two pools: positions dense and unique, head = count, tailer sees no gap', async () => {
  const { tdb, database, q } = await fresh('wal_race', 12);
  const { db } = database;
  // A second "node": its own pool on the same database.
  const other = openPostgres(tdb.url, 4);
  pools.push(other);
  const rng = seededRng('wal numbering race');
  const HOT = ['race/hot0', 'race/hot1', 'race/hot2'];
  const WRITERS = 8;
  const WRITES_PER_WRITER = 60;

  const tailer = new WalTailer(db, 37);
  tailer.start(1);
  // Even writers: multi-statement transactions (stampWal as their last statement), some on hot
  // keys. Odd writers: one-statement batches of optimistic writes (numbered in the statement),
  // each write a new anchor and one more entry.
  let casRows = 0;
  const plans = Array.from({ length: WRITERS }, (_, w) =>
    Array.from({ length: WRITES_PER_WRITER }, (_, i) => (rng.next() < 0.4 ? HOT[rng.int(0, HOT.length - 1)] : `race/w${w}/k${i}`)),
  );
  await within(
    Promise.all(
      plans.map(async (paths, w) => {
        const pool = w % 4 < 2 ? db : other.db;
        if (w % 2 === 0) {
          for (const p of paths) await walTransaction(pool, (tx) => putEntry(tx, p, randomBytes(16), TERM));
          return;
        }
        for (let i = 0; i < paths.length; i += 3) {
          const batch = paths.slice(i, i + 3).map((_, j) => ({
            anchor: { path: `race/cas/w${w}/a${i + j}`, version: 0, value: randomBytes(16) },
            puts: [[`race/cas/w${w}/b${i + j}`, randomBytes(16)] as [string, Buffer]],
            deletes: [],
          }));
          const { outcomes } = await casWriteBatch(pool, batch, TERM);
          expect(outcomes.every((lsn) => lsn !== null && lsn > 0)).toBe(true);
          casRows += 2 * batch.length;
        }
      }),
    ),
    60_000,
    'the writers',
  );

  const head = await walHead(db);
  await waitFor('the tailer to reach the head', async () => tailer.last === head, { timeoutMs: 10_000 });
  await tailer.stop();

  const total = (WRITERS / 2) * WRITES_PER_WRITER + casRows;
  const shape = await walOrderViolations(q);
  expect(shape.violations).toEqual([]);
  expect(shape).toMatchObject({ rows: total, ordered: total, head: total });
  expect(tailer.anomalies).toEqual([]);
  expect(tailer.seen.size).toBe(total);
  expect(await atomicWalViolations(q)).toEqual([]);
});

// ------------------------------------------------------------------------------------------ d

test('rows the previous version left without positions are numbered in per-key version order; a WAL reset restarts at 1', async () => {
  const { database, q } = await fresh('wal_stragglers', 6);
  const { db } = database;
  await walTransaction(db, (tx) => putEntry(tx, 'old/before', Buffer.from('x'), TERM)); // position 1
  // The previous version committed rows without positions and numbered them afterwards. Write
  // such rows (the trigger off, as that version had none) in the xid trap's shape at scale: T2
  // takes its xid first, T1 (later xid) creates M keys and commits, T2 then writes version 2 of
  // the same keys and commits. By (xid, seq) T2's rows come first.
  const M = 50;
  const paths = Array.from({ length: M }, (_, i) => `old/k${String(i).padStart(3, '0')}`);
  await sql`ALTER TABLE coffer_wal DISABLE TRIGGER coffer_wal_number_at_commit`.execute(db);
  try {
    const t2 = await db.startTransaction().execute();
    try {
      await putEntry(t2, 'old/first', Buffer.from('a'), TERM);
      await db.transaction().execute(async (t1) => {
        for (const p of paths) await putEntry(t1, p, Buffer.from('v1'), TERM);
      });
      for (const p of paths) expect((await putEntry(t2, p, Buffer.from('v2'), TERM)).keyVersion).toBe(2);
      await t2.commit().execute();
    } catch (err) {
      await rollbackQuietly(t2);
      throw err;
    }
  } finally {
    await sql`ALTER TABLE coffer_wal ENABLE TRIGGER coffer_wal_number_at_commit`.execute(db);
  }
  expect(await unorderedCount(q)).toBe(2 * M + 1);
  expect(await orderStragglers(db)).toBe(2 * M + 1);
  expect(await orderStragglers(db)).toBe(0); // idempotent: nothing left
  const shape = await walOrderViolations(q);
  expect(shape.violations).toEqual([]); // dense, and per key version 1 before version 2
  expect(shape).toMatchObject({ rows: 2 * M + 2, ordered: 2 * M + 2, head: 2 * M + 2 });
  expect(await atomicWalViolations(q)).toEqual([]);
  // New writes continue after them.
  expect((await walTransaction(db, (tx) => putEntry(tx, 'old/after', Buffer.from('y'), TERM))).lastLsn).toBe(2 * M + 3);

  // A WAL reset (secondary enable wipes the replicated data): positions start again at 1, and
  // the reset is counted so a follower of the WAL notices it.
  const before = await readNewWal(db, 0, 1);
  await wipeReplicated(db);
  expect((await walTransaction(db, (tx) => putEntry(tx, 'new/a', Buffer.from('a'), TERM))).lastLsn).toBe(1);
  const after = await readNewWal(db, 0, 10);
  expect(after.resets).toBe(before.resets + 1);
  expect(after).toMatchObject({ headLsn: 1 });
  expect(after.records.map((r) => `${r.lsn}:${r.path}`)).toEqual(['1:new/a']);
});

/**
 * Storage-level WAL tests, in this process, on real Postgres (a fresh database per test):
 *
 *  a. the xid-horizon trap of DESIGN.md invariant 2, built deterministically with three
 *     transactions whose interleaving the test controls, and (regression) the same trap at the
 *     scale of a whole sequencer batch;
 *  b. invariant 1 (atomic WAL) after a seeded random mix of puts, deletes, multi-key
 *     transactions and rollbacks from 8 concurrent writers;
 *  c. two sequencers (two "nodes", two pools) racing while writers write: positions stay dense
 *     and unique and a tailer never sees a gap.
 *
 * Interleaving control (a): kysely's `startTransaction()` returns a ControlledTransaction — a
 * `Transaction<DB>` pinned to one pooled connection that stays open until we commit it — so the
 * real `putEntry` runs inside each transaction and the test decides when each statement runs and
 * when each transaction commits. No SQL of the code under test is copied here.
 *
 * The xmin horizon is server-wide: other test files running at the same time on the same
 * Postgres can hold it back for a while, so wherever ordering must *eventually* happen the test
 * waits for it (bounded) instead of expecting one sequencer call to do it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { sql, type ControlledTransaction, type Kysely, type Transaction } from 'kysely';
import { openPostgres, type Database } from '../../src/storage/db';
import { deleteEntry, getEntry, putEntry, type WrittenRow } from '../../src/storage/entries';
import { migrateToLatest } from '../../src/storage/migrate';
import type { DB } from '../../src/storage/schema';
import { lsnOfSeq, planSequence, readWal, sequenceWal, walHead, writeSequence } from '../../src/storage/wal';
import { wipeReplicated } from '../../src/storage/replication';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';
import { atomicWalViolations, closeBounded, rollbackQuietly, TERM, unorderedCount, walOrderViolations, WalTailer, type Queryable } from '../helpers/wal-invariants';

// Cleanup order: plain clients, then the databases (DROP ... WITH (FORCE) ends this file's own
// sessions on them, so nothing a failed test left open keeps holding the xmin horizon), then
// the pools — bounded, as a pool waits for connections still checked out.
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

/** Runs the sequencer until every committed WAL row has a position (bounded). */
async function sequenceUntilAllOrdered(db: Kysely<DB>, q: Queryable, timeoutMs = 20_000): Promise<void> {
  await waitFor(
    'every WAL row to get a position',
    async () => {
      while ((await sequenceWal(db)).assigned > 0);
      return (await unorderedCount(q)) === 0;
    },
    { timeoutMs, intervalMs: 20 },
  );
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

// ------------------------------------------------------------------------------------------ a

test('xid-horizon trap: a later write to K that took its xid first is not ordered before K v1', async () => {
  const { database, q } = await fresh('wal_trap');
  const { db } = database;
  const open: ControlledTransaction<DB>[] = [];
  try {
    // T2 begins and takes an xid first by writing Z.
    const t2 = await db.startTransaction().execute();
    open.push(t2);
    const z = await putEntry(t2, 'trap/z', Buffer.from('z1'), TERM);
    const t2Xid = await xidOf(t2);
    const t2Pid = await pidOf(t2);

    // T3 begins and takes an xid, then stays open (a slow writer of an unrelated key): it holds
    // the horizon between T2 and T1.
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
    await waitFor('T2 to block on T1', async () => {
      const { rows } = await sql<{ w: string | null }>`SELECT wait_event_type AS w FROM pg_stat_activity WHERE pid = ${t2Pid}`.execute(db);
      return rows[0]?.w === 'Lock';
    });
    expect(k2Done).toBe(false);

    await t1.commit().execute();
    const k2 = await k2Promise;
    expect(k2.keyVersion).toBe(2);
    await t2.commit().execute();

    // T3 still open: the horizon lets T2's rows (Z v1, K v2) through but not T1's (K v1).
    // Wait until Z is ordered: from then on K v2 has been eligible by xid (same transaction as
    // Z) in at least one sequencer run — and must still have been held back.
    const zLsn = await waitFor('Z (T2, below the horizon) to be ordered', async () => {
      await sequenceWal(db);
      return lsnOfSeq(db, z.seq);
    });
    expect(zLsn).toBe(1);
    // A few more runs change nothing while T3 holds the horizon.
    for (let i = 0; i < 5; i++) expect((await sequenceWal(db)).assigned).toBe(0);
    // The invariant: K v2 never has a position unless K v1 has a smaller one.
    const early1 = await lsnOfSeq(db, k1.seq);
    const early2 = await lsnOfSeq(db, k2.seq);
    if (early2 !== null) expect(early1 !== null && early1 < early2).toBe(true);
    // The design's mechanism (DESIGN.md, wal.ts): K v1 is above the horizon (T1's xid > T3's),
    // and K v2 — below it — is held back behind K v1 rather than ordered first.
    expect(early1).toBeNull();
    expect(early2).toBeNull();
    expect(await walHead(db)).toBe(1);
    expect((await readWal(db, 0, 100)).map((r) => `${r.lsn}:${r.path}@${r.keyVersion}`)).toEqual(['1:trap/z@1']);

    // T3 commits: everything can be ordered now, K v1 before K v2.
    await t3.commit().execute();
    open.length = 0;
    await sequenceUntilAllOrdered(db, q);
    const l1 = (await lsnOfSeq(db, k1.seq))!;
    const l2 = (await lsnOfSeq(db, k2.seq))!;
    expect(l1).toBeLessThan(l2);
    const shape = await walOrderViolations(q);
    expect(shape.violations).toEqual([]);
    expect(shape).toMatchObject({ rows: 4, ordered: 4, head: 4 });
    const log = (await readWal(db, 0, 100)).map((r) => `${r.path}@${r.keyVersion}`);
    expect(log[0]).toBe('trap/z@1');
    expect(log.indexOf('trap/k@1')).toBeLessThan(log.indexOf('trap/k@2'));
    expect(await atomicWalViolations(q)).toEqual([]);
  } finally {
    // Concurrently: rolling back T2 while its K write waits on T1 would wait for T1's rollback.
    await Promise.all(open.map(rollbackQuietly));
  }
});

/**
 * Regression (livelock found by this file, fixed in ac470b8). sequenceWal's batch is the first
 * `maxRows` eligible rows by (xid, seq), and a row whose older version is still unordered is
 * held back. Before the fix the older versions lying *beyond the LIMIT* only counted as blockers:
 * when every row of the batch was held back by them, a run assigned nothing and so did every
 * later run (the same batch each time). The WAL stalled for good although every row was
 * committed and below the horizon. Observed then: assigned per run 4, 0, 0, 0, … with 10000 rows
 * never ordered at the default maxRows (5000), and 0, 0, 0, … for the two-row trap with
 * maxRows = 1. Now a key's older versions beyond the LIMIT join the batch.
 *
 * The xid trap at scale: T2 takes its xid first; T1 (later xid) creates M keys and commits; T2
 * then updates the same M keys (version 2) and commits — a bulk job that began before the keys
 * were created. By (xid, seq) T2's rows come first and fill the batch; each key's version 1 sits
 * in T1, beyond the LIMIT.
 *
 * Run with maxRows = M = 200 (sequenceWal's own parameter; same code path as the default) to
 * keep T2 open only briefly: an open transaction holds the server-wide horizon for every other
 * test on this Postgres.
 */
test('regression (sequencer livelock): a batch full of rows held back by older versions beyond the LIMIT still progresses', async () => {
  const { database, q } = await fresh('wal_livelock', 4);
  const { db } = database;

  /** Runs the trap at scale M and sequences with maxRows; returns rows still unordered. */
  const trapAtScale = async (prefix: string, M: number, maxRows: number) => {
    const paths = Array.from({ length: M }, (_, i) => `${prefix}/k${String(i).padStart(4, '0')}`);
    const t2 = await db.startTransaction().execute();
    try {
      await putEntry(t2, `${prefix}/first`, Buffer.from('a'), TERM); // T2 takes its xid first
      await db.transaction().execute(async (t1) => {
        for (const p of paths) await putEntry(t1, p, Buffer.from('v1'), TERM);
      });
      for (const p of paths) expect((await putEntry(t2, p, Buffer.from('v2'), TERM)).keyVersion).toBe(2);
      await t2.commit().execute();
    } catch (err) {
      await rollbackQuietly(t2);
      throw err;
    }
    // Wait (bounded) until every row's transaction is below the horizon: from here on no run
    // has a reason to assign nothing while rows remain.
    await waitFor('all WAL rows below the xmin horizon', async () => {
      const { rows } = await q.query(`SELECT count(*)::int AS n FROM coffer_wal WHERE lsn IS NULL AND xid >= pg_snapshot_xmin(pg_current_snapshot())`);
      return rows[0].n === 0;
    });
    const assigned: number[] = [];
    // Enough runs for any correct batching (each run must assign at least one row).
    for (let run = 0; run < 2 * M + 2 && (await unorderedCount(q)) > 0; run++) {
      const r = (await sequenceWal(db, maxRows)).assigned;
      assigned.push(r);
      if (r === 0) break; // nothing assigned with every row eligible: stalled
    }
    const left = await unorderedCount(q);
    // eslint-disable-next-line no-console
    console.log(`[wal livelock] M=${M} maxRows=${maxRows} assigned per run: ${assigned.slice(0, 10).join(', ')}${assigned.length > 10 ? ', …' : ''}; still unordered: ${left}`);
    return left;
  };

  expect(await trapAtScale('pair', 1, 1)).toBe(0); // the plain two-row trap, batch of one
  expect(await trapAtScale('bulk', 200, 200)).toBe(0);
  expect((await walOrderViolations(q)).violations).toEqual([]);
  expect(await atomicWalViolations(q)).toEqual([]);
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
  await db.transaction().execute(async (tx) => expect(await deleteEntry(tx, 'mix/never')).toBeNull());

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
          await db.transaction().execute(async (tx) => {
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
    await db.transaction().execute(async (tx) => deleteEntry(tx, PATHS[0]));
    return db.selectFrom('coffer_entries').select(['path', 'version', 'value']).where('path', '=', PATHS[0]).executeTakeFirstOrThrow();
  })());
  const walBefore = (await q.query('SELECT count(*)::int AS n FROM coffer_wal')).rows[0].n;
  await db.transaction().execute(async (tx) => expect(await deleteEntry(tx, tomb.path)).toBeNull());
  expect((await q.query('SELECT count(*)::int AS n FROM coffer_wal')).rows[0].n).toBe(walBefore);
  const after = await db.selectFrom('coffer_entries').select(['version', 'value']).where('path', '=', tomb.path).executeTakeFirstOrThrow();
  expect(after).toEqual({ version: tomb.version, value: null });
  expect(await db.selectFrom('coffer_entries').select('path').where('path', '=', 'mix/never').executeTakeFirst()).toBeUndefined();
  // Re-creating a tombstoned key continues its version line (never goes backwards).
  const recreated = await db.transaction().execute((tx) => putEntry(tx, tomb.path, Buffer.from('again'), TERM));
  const tombVersion = (await db.selectFrom('coffer_wal').select(({ fn }) => fn.max('key_version').as('m')).where('path', '=', tomb.path).where('seq', '<>', recreated.seq).executeTakeFirstOrThrow()).m;
  expect(recreated.keyVersion).toBe(Number(tombVersion) + 1);
  expect(await atomicWalViolations(q)).toEqual([]);

  // And once sequenced, per key LSN order is version order.
  await sequenceUntilAllOrdered(db, q);
  expect((await walOrderViolations(q)).violations).toEqual([]);
});

// ------------------------------------------------------------------------------------------ c

test('two sequencers racing while 8 writers write: positions dense and unique, head = count, tailer sees no gap', async () => {
  const { tdb, database, q } = await fresh('wal_race', 12);
  const { db } = database;
  // A second "node": its own pool on the same database.
  const other = openPostgres(tdb.url, 3);
  pools.push(other);
  const rng = seededRng('wal sequencer race');
  const HOT = ['race/hot0', 'race/hot1', 'race/hot2'];
  const WRITERS = 8;
  const WRITES_PER_WRITER = 75;

  // Both sequencers loop until the writers are done AND every row has a position, so they race
  // over the backlog even when another test's open transaction holds the (server-wide) horizon
  // for the whole writing phase.
  let writing = true;
  const runs = { a: 0, b: 0 };
  const assigned = { a: 0, b: 0 };
  const sequencer = (node: Kysely<DB>, name: 'a' | 'b') =>
    (async () => {
      for (;;) {
        const r = await sequenceWal(node, 50);
        runs[name]++;
        assigned[name] += r.assigned;
        if (r.assigned > 0) continue;
        if (!writing && (await unorderedCount(q)) === 0) return;
        await new Promise((res) => setTimeout(res, 1));
      }
    })();
  const tailer = new WalTailer(db, 37);
  tailer.start(1);
  const seqA = sequencer(db, 'a');
  const seqB = sequencer(other.db, 'b');

  const plans = Array.from({ length: WRITERS }, (_, w) =>
    Array.from({ length: WRITES_PER_WRITER }, (_, i) => (rng.next() < 0.4 ? HOT[rng.int(0, HOT.length - 1)] : `race/w${w}/k${i}`)),
  );
  await Promise.all(
    plans.map(async (paths) => {
      for (const p of paths) await db.transaction().execute((tx) => putEntry(tx, p, randomBytes(16), TERM));
    }),
  );
  writing = false;
  // Bounded; rejects at once if a sequencer run threw (e.g. on a duplicate position).
  await within(Promise.all([seqA, seqB]), 30_000, 'both sequencers to finish the backlog');
  // eslint-disable-next-line no-console
  console.log(`[wal sequencer race] runs a=${runs.a} b=${runs.b}; rows assigned by a=${assigned.a} b=${assigned.b}`);
  expect(runs.a).toBeGreaterThan(0);
  expect(runs.b).toBeGreaterThan(0);

  await waitFor('the tailer to reach the head', async () => tailer.last === (await walHead(db)));
  await tailer.stop();

  const total = WRITERS * WRITES_PER_WRITER;
  const shape = await walOrderViolations(q);
  expect(shape.violations).toEqual([]);
  expect(shape).toMatchObject({ rows: total, ordered: total, head: total });
  expect(tailer.anomalies).toEqual([]);
  expect(tailer.seen.size).toBe(total);
  expect(await atomicWalViolations(q)).toEqual([]);
});

test('optimistic sequencer: a plan overtaken by another sequencer, or by a WAL reset, writes nothing', async () => {
  const { database, q } = await fresh('wal_overtaken', 4);
  const { db } = database;
  for (let i = 0; i < 6; i++) await db.transaction().execute((tx) => putEntry(tx, `ov/k${i}`, randomBytes(8), TERM));
  await waitFor('the six rows below the horizon', async () => (await planSequence(db)).ordered.length === 6);

  // Overtaken: another sequencer orders the same rows between this plan's read and its write.
  const stale = await planSequence(db);
  expect((await sequenceWal(db)).assigned).toBe(6);
  expect(await writeSequence(db, stale)).toEqual({ assigned: 0, headLsn: stale.headLsn });
  expect(await walOrderViolations(q)).toMatchObject({ violations: [], rows: 6, ordered: 6, head: 6 });

  // A WAL reset (secondary enable) between read and write, and new rows reusing the seqs the
  // plan holds, at the same head (0): the plan must not give them positions, and must leave
  // the head alone (it aborts itself rather than commit a head no row backs).
  await wipeReplicated(db);
  for (let i = 0; i < 3; i++) await db.transaction().execute((tx) => putEntry(tx, `ov/before${i}`, randomBytes(8), TERM));
  await waitFor('three rows below the horizon', async () => (await planSequence(db)).ordered.length === 3);
  const beforeReset = await planSequence(db);
  await wipeReplicated(db);
  for (let i = 0; i < 3; i++) await db.transaction().execute((tx) => putEntry(tx, `ov/after${i}`, randomBytes(8), TERM));
  await expect(writeSequence(db, beforeReset)).rejects.toThrow(/planned rows were still unordered/);
  expect(await walHead(db)).toBe(0);
  expect(await unorderedCount(q)).toBe(3);
  // The next step orders the new rows normally.
  await sequenceUntilAllOrdered(db, q);
  expect(await walOrderViolations(q)).toMatchObject({ violations: [], rows: 3, ordered: 3, head: 3 });
});

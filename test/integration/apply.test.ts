/**
 * Invariant 3 at the storage level: a secondary applies a batch only if it starts right after
 * its applied position, in one transaction with the new position; redelivery, reordering and
 * duplicates change nothing; per key the newer version wins.
 */
import { sql } from 'kysely';
import { openPostgres, type Database } from '../../src/storage/db';
import { migrateToLatest } from '../../src/storage/migrate';
import { casWriteBatch, deleteEntry, putEntries, putEntry, ReplicaReadOnly, walTransaction } from '../../src/storage/entries';
import { applyBatch, readReplication, updateReplication, type Batch } from '../../src/storage/replication';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';

let tdb: TestDatabase;
let database: Database;

beforeAll(async () => {
  tdb = await createTestDatabase('apply');
  database = openPostgres(tdb.url, 4);
  await migrateToLatest(database.db);
  await updateReplication(database.db, { mode: 'secondary', state: 'stream-wals', applied_lsn: 0 });
});

afterAll(async () => {
  await database?.close();
  await tdb?.drop();
});

const v = (s: string) => Buffer.from(s);
const batch = (fromLsn: number, toLsn: number, entries: [string, number, string | null][]): Batch => ({
  fromLsn,
  toLsn,
  entries: entries.map(([path, version, value]) => ({ path, version, value: value === null ? null : v(value) })),
});

async function rows() {
  const { rows } = await sql<{ path: string; version: number; value: Buffer | null }>`SELECT path, version, value FROM coffer_entries ORDER BY path`.execute(database.db);
  return rows.map((r) => [r.path, Number(r.version), r.value?.toString() ?? null]);
}

async function walCount(): Promise<number> {
  const { rows } = await sql<{ n: number }>`SELECT count(*)::int AS n FROM coffer_wal`.execute(database.db);
  return rows[0].n;
}

test('in order, exactly once: duplicates, gaps and reordering are refused and change nothing', async () => {
  const b1 = batch(1, 3, [['a', 1, 'a1'], ['b', 1, 'b1']]);
  const b2 = batch(4, 5, [['a', 2, 'a2']]);
  const b3 = batch(6, 6, [['b', 2, null]]);

  expect(await applyBatch(database.db, b2)).toMatchObject({ applied: false, appliedLsn: 0 }); // reordered: too early
  expect(await applyBatch(database.db, b1)).toMatchObject({ applied: true, appliedLsn: 3 });
  const afterB1 = [await rows(), await walCount()];
  expect(await applyBatch(database.db, b1)).toMatchObject({ applied: false, appliedLsn: 3 }); // redelivered
  expect([await rows(), await walCount()]).toEqual(afterB1);
  expect(await applyBatch(database.db, b3)).toMatchObject({ applied: false, appliedLsn: 3 }); // gap
  expect(await applyBatch(database.db, b2)).toMatchObject({ applied: true, appliedLsn: 5 });
  expect(await applyBatch(database.db, b3)).toMatchObject({ applied: true, appliedLsn: 6 });

  expect(await rows()).toEqual([
    ['a', 2, 'a2'],
    ['b', 2, null],
  ]);
  expect((await readReplication(database.db)).appliedLsn).toBe(6);
  // The secondary's own WAL: one row per change it made (a1, b1, a2, b2-delete).
  const { rows: wal } = await sql<{ path: string; op: string; key_version: number }>`SELECT path, op, key_version FROM coffer_wal ORDER BY seq`.execute(database.db);
  expect(wal.map((w) => [w.path, w.op, Number(w.key_version)])).toEqual([
    ['a', 'put', 1],
    ['b', 'put', 1],
    ['a', 'put', 2],
    ['b', 'delete', 2],
  ]);
});

test('per key the newer version wins, whatever order the values arrive in; older ones write no WAL row', async () => {
  const before = await walCount();
  const applied = (await readReplication(database.db)).appliedLsn;
  // One batch carrying the same key twice (newest kept), and an older version of 'a'.
  expect(await applyBatch(database.db, batch(applied + 1, applied + 2, [['c', 3, 'c3'], ['c', 2, 'c2'], ['a', 1, 'stale']]))).toMatchObject({ applied: true });
  expect((await rows()).find((r) => r[0] === 'c')).toEqual(['c', 3, 'c3']);
  expect((await rows()).find((r) => r[0] === 'a')).toEqual(['a', 2, 'a2']);
  expect(await walCount()).toBe(before + 1);
});

test('a cluster that is not a secondary, or is still bootstrapping, applies nothing', async () => {
  const applied = (await readReplication(database.db)).appliedLsn;
  await updateReplication(database.db, { state: 'bootstrapping' });
  expect(await applyBatch(database.db, batch(applied + 1, applied + 1, [['d', 1, 'd1']]))).toMatchObject({ applied: false, reason: 'secondary is bootstrapping' });
  await updateReplication(database.db, { mode: 'primary', state: 'running' });
  expect(await applyBatch(database.db, batch(applied + 1, applied + 1, [['d', 1, 'd1']]))).toMatchObject({ applied: false, reason: 'not a secondary' });
  expect((await rows()).some((r) => r[0] === 'd')).toBe(false);
});

test('one batch delivered twice at once (two processes, two pools): applied once, the other refused', async () => {
  await updateReplication(database.db, { mode: 'secondary', state: 'stream-wals' });
  const other = openPostgres(tdb.url, 2);
  try {
    for (let round = 0; round < 20; round++) {
      const { appliedLsn } = await readReplication(database.db);
      const b = batch(appliedLsn + 1, appliedLsn + 2, [[`dup/${round}`, 1, 'x'], [`dup/${round}/b`, 1, 'y']]);
      const before = await walCount();
      const out = await Promise.all([applyBatch(database.db, b, 7), applyBatch(other.db, b, 7)]);
      expect(out.filter((o) => o.applied)).toHaveLength(1);
      expect(out.find((o) => !o.applied)).toMatchObject({ reason: expect.stringMatching(/^batch starts at/) });
      expect(await walCount()).toBe(before + 2);
      expect((await readReplication(database.db)).appliedLsn).toBe(appliedLsn + 2);
    }
    // The sender's epoch was learnt by the same statement.
    expect((await readReplication(database.db)).epoch).toBe(7);
  } finally {
    await other.close();
  }
});

test('a refused batch still teaches the sender epoch; a lower one changes nothing', async () => {
  const { appliedLsn } = await readReplication(database.db);
  expect(await applyBatch(database.db, batch(appliedLsn + 5, appliedLsn + 5, [['late', 1, 'x']]), 9)).toMatchObject({ applied: false });
  expect((await readReplication(database.db)).epoch).toBe(9);
  await applyBatch(database.db, batch(appliedLsn + 1, appliedLsn + 1, [['early', 1, 'x']]), 3);
  expect((await readReplication(database.db)).epoch).toBe(9);
});

test('a batch from an epoch older than the one this secondary follows is refused and writes nothing', async () => {
  const { appliedLsn, epoch } = await readReplication(database.db);
  expect(epoch).toBe(9);
  const before = [await rows(), await walCount()];
  const out = await applyBatch(database.db, batch(appliedLsn + 1, appliedLsn + 1, [['stale-primary', 1, 'x']]), 8);
  expect(out).toMatchObject({ applied: false, appliedLsn, reason: expect.stringMatching(/^superseded/) });
  expect([await rows(), await walCount()]).toEqual(before);
  // The same batch from the current epoch applies.
  expect(await applyBatch(database.db, batch(appliedLsn + 1, appliedLsn + 1, [['stale-primary', 1, 'x']]), 9)).toMatchObject({ applied: true });
});

test('a change of role NOTIFYs coffer_replication; the applied position, heartbeats and progress do not', async () => {
  const listener = await sqlClient(tdb.url);
  try {
    const heard: string[] = [];
    let hear: () => void = () => undefined;
    listener.on('notification', (m) => {
      heard.push(`${m.channel}: ${m.payload}`);
      hear();
    });
    await listener.query('LISTEN coffer_replication');
    const next = () => new Promise<void>((resolve) => (hear = resolve));
    // Busy columns first: had they notified, those would be heard before the role change.
    const { appliedLsn } = await readReplication(database.db);
    await updateReplication(database.db, { applied_lsn: appliedLsn, last_heartbeat: new Date(), primary_head_lsn: appliedLsn, sync_progress: 1 });
    await applyBatch(database.db, batch(appliedLsn + 1, appliedLsn + 1, [['notify-probe', 1, 'x']]), 9);
    let heardOne = next();
    await updateReplication(database.db, { state: 'idle' });
    await heardOne;
    expect(heard).toEqual(['coffer_replication: secondary idle']);
    heardOne = next();
    await updateReplication(database.db, { state: 'stream-wals' });
    await heardOne;
    expect(heard).toEqual(['coffer_replication: secondary idle', 'coffer_replication: secondary stream-wals']);
  } finally {
    await listener.end();
  }
});

test("a secondary's storage refuses client writes of replicated data (role guard); apply still writes", async () => {
  expect((await readReplication(database.db)).mode).toBe('secondary');
  const before = [await rows(), await walCount()];
  const existing = (await rows()).find((r) => r[2] !== null)![0] as string;
  // The optimistic batch (KV v2 and most writes), a put and a delete in a transaction: all refused, nothing written.
  await expect(casWriteBatch(database.db, [{ anchor: { path: 'guard/a', version: 0, value: v('x') }, puts: [['guard/b', v('y')]], deletes: [] }], 1)).rejects.toBeInstanceOf(ReplicaReadOnly);
  await expect(walTransaction(database.db, (tx) => putEntry(tx, 'guard/c', v('z'), 1))).rejects.toBeInstanceOf(ReplicaReadOnly);
  await expect(walTransaction(database.db, (tx) => putEntries(tx, [['guard/d', v('z')]], 1))).rejects.toBeInstanceOf(ReplicaReadOnly);
  await expect(walTransaction(database.db, (tx) => deleteEntry(tx, existing))).rejects.toBeInstanceOf(ReplicaReadOnly);
  expect([await rows(), await walCount()]).toEqual(before);
  // Deleting a key that is not there is still "nothing to delete" on a primary, and refused here.
  await expect(walTransaction(database.db, (tx) => deleteEntry(tx, 'guard/absent'))).rejects.toBeInstanceOf(ReplicaReadOnly);
  // The batch from the primary applies.
  const { appliedLsn, epoch } = await readReplication(database.db);
  expect(await applyBatch(database.db, batch(appliedLsn + 1, appliedLsn + 1, [['guard/applied', 1, 'from the primary']]), epoch)).toMatchObject({ applied: true });
  // The same writes go through once the cluster is not a secondary.
  await updateReplication(database.db, { mode: 'primary' });
  try {
    const { outcomes } = await casWriteBatch(database.db, [{ anchor: { path: 'guard/a', version: 0, value: v('x') }, puts: [], deletes: [] }], 1);
    expect(outcomes[0]).toBeGreaterThan(0);
    expect((await walTransaction(database.db, (tx) => deleteEntry(tx, 'guard/absent'))).result).toBeNull();
  } finally {
    await updateReplication(database.db, { mode: 'secondary' });
  }
});

test('a change of role waits for client writes in flight, and writes after it see it; a superseded primary refuses too', async () => {
  const ROLE_LOCK_WAITING = `SELECT count(*)::int AS n FROM pg_locks WHERE locktype = 'advisory' AND classid = 1668245094 AND objid = 1919904869 AND NOT granted`;
  const probe = await sqlClient(tdb.url);
  try {
    await updateReplication(database.db, { mode: 'primary', superseded_by_epoch: null });
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    let wrote!: () => void;
    const inside = new Promise<void>((r) => (wrote = r));
    // A write transaction that has written (through the guard) and has not committed yet.
    const tx = walTransaction(database.db, async (t) => {
      await putEntry(t, 'role-lock/in-flight', v('before the change'), 1);
      wrote();
      await held;
    });
    await inside;
    let changed = false;
    const change = updateReplication(database.db, { mode: 'secondary' }).then(() => (changed = true));
    // The change waits for the role guard's lock (seen in pg_locks, not guessed with a sleep).
    for (let i = 0; (await probe.query(ROLE_LOCK_WAITING)).rows[0].n === 0; i++) {
      if (i > 5000) throw new Error('the change of role never waited for the write in flight');
      await new Promise((r) => setImmediate(r));
    }
    expect(changed).toBe(false);
    release();
    await tx;
    await change;
    expect((await rows()).find((r) => r[0] === 'role-lock/in-flight')?.[2]).toBe('before the change');
    await expect(walTransaction(database.db, (t) => putEntry(t, 'role-lock/after', v('x'), 1))).rejects.toBeInstanceOf(ReplicaReadOnly);
    // A primary superseded by a promoted one takes no client writes either.
    await updateReplication(database.db, { mode: 'primary', superseded_by_epoch: 12 });
    await expect(casWriteBatch(database.db, [{ anchor: { path: 'role-lock/superseded', version: -1, value: v('x') }, puts: [], deletes: [] }], 1)).rejects.toBeInstanceOf(ReplicaReadOnly);
  } finally {
    await probe.end();
    await updateReplication(database.db, { mode: 'secondary', superseded_by_epoch: null });
  }
});

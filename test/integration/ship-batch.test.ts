/**
 * What the primary reads for one shipping step, on real Postgres: `readBatch` (the next WAL
 * rows after a cursor, cut by rows and by bytes — the first row always goes — with each named
 * key's current entry), and `shipStep` (the previous batch's acknowledgement; the cursor, retained
 * WAL bounds, head and role; and the next batch, in one statement).
 */
import { openPostgres, type Database } from '../../src/storage/db';
import { putEntry, walTransaction } from '../../src/storage/entries';
import { migrateToLatest } from '../../src/storage/migrate';
import { readBatch, secondaries, shipStep } from '../../src/storage/replication';
import { walHead } from '../../src/storage/wal';
import { createTestDatabase, type TestDatabase } from '../helpers/pg';
import { closeBounded, TERM } from '../helpers/wal-invariants';

let tdb: TestDatabase;
let database: Database;

beforeAll(async () => {
  tdb = await createTestDatabase('ship_batch');
  database = openPostgres(tdb.url, 4);
  await migrateToLatest(database.db);
});

afterAll(async () => {
  await tdb?.drop().catch(() => undefined);
  if (database) await closeBounded(() => database.close());
});

const put = (path: string, bytes: number) => walTransaction(database.db, (tx) => putEntry(tx, path, Buffer.alloc(bytes, 1), TERM));

/** Writers number their rows at commit: the head is already there. */
async function orderAll(expectedHead: number): Promise<void> {
  expect(await walHead(database.db)).toBe(expectedHead);
}

test('readBatch cuts by rows and bytes, always ships the first row, and sends each key once with its current entry', async () => {
  const { db } = database;
  // LSN 1..5: a, b, c (100 B each), d (500 B), then a again (its version 2, 300 B).
  await put('sb/a', 100);
  await put('sb/b', 100);
  await put('sb/c', 100);
  await put('sb/d', 500);
  await put('sb/a', 300);
  await orderAll(5);

  const byBytes = await readBatch(db, 0, 100, 250);
  expect(byBytes).toMatchObject({ fromLsn: 1, toLsn: 2 });
  expect(byBytes!.entries.map((e) => [e.path, e.version, e.value?.length]).sort()).toEqual([
    ['sb/a', 2, 300],
    ['sb/b', 1, 100],
  ]);

  // A first row larger than the byte bound still goes, alone.
  const oversized = await readBatch(db, 3, 100, 10);
  expect(oversized).toMatchObject({ fromLsn: 4, toLsn: 4 });
  expect(oversized!.entries.map((e) => e.path)).toEqual(['sb/d']);

  const byRows = await readBatch(db, 0, 3, 1_000_000);
  expect(byRows).toMatchObject({ fromLsn: 1, toLsn: 3 });
  expect(byRows!.entries.map((e) => e.path).sort()).toEqual(['sb/a', 'sb/b', 'sb/c']);

  // The key written twice in range comes once, at its current version.
  const all = await readBatch(db, 0, 100, 1_000_000);
  expect(all).toMatchObject({ fromLsn: 1, toLsn: 5 });
  expect(all!.entries.map((e) => `${e.path}@${e.version}`).sort()).toEqual(['sb/a@2', 'sb/b@1', 'sb/c@1', 'sb/d@1']);

  expect(await readBatch(db, 5, 100, 1_000_000)).toBeNull();
});

test('shipStep’s state: the secondary (or null), the retained WAL bounds, the head and this cluster’s role, in one read', async () => {
  const { db } = database;
  // Recording nothing and reading no batch: the state alone.
  const shipState = async (id: string) => (await shipStep(db, id, null, 0, 0)).state;
  const head = await walHead(db);
  expect(await shipState('nobody')).toEqual({ secondary: null, oldestLsn: 1, headLsn: head, mode: 'disabled', epoch: 0, supersededByEpoch: null });

  await secondaries.upsert(db, 'sec-1', Buffer.from('hmac'));
  await secondaries.ack(db, 'sec-1', 3);
  const st = await shipState('sec-1');
  expect(st.secondary).toEqual(await secondaries.get(db, 'sec-1'));
  expect(st.secondary).toMatchObject({ secondaryId: 'sec-1', ackedLsn: 3, status: 'pending' });
  expect(st).toMatchObject({ oldestLsn: 1, headLsn: head, mode: 'disabled' });
});

test('shipStep records the last batch (never moving the cursor back) and reads the next batch after it, in one statement', async () => {
  const { db } = database;
  await secondaries.upsert(db, 'sec-2', Buffer.from('hmac'));
  // Nothing to record: the batch after the stored cursor (0).
  const first = await shipStep(db, 'sec-2', null, 2, 1_000_000);
  expect(first.state.secondary).toMatchObject({ ackedLsn: 0 });
  expect(first.batch).toMatchObject({ fromLsn: 1, toLsn: 2 });
  // Recording 2 moves the cursor and the batch read in the same statement starts after it.
  const second = await shipStep(db, 'sec-2', 2, 2, 1_000_000);
  expect(second.state.secondary).toMatchObject({ ackedLsn: 2 });
  expect(second.batch).toMatchObject({ fromLsn: 3, toLsn: 4 });
  // The entries come as the wire's JSON, built by Postgres: what readBatch reads, base64-encoded
  // (no line breaks), with its count and ciphertext bytes.
  const same = (await readBatch(db, 2, 2, 1_000_000))!;
  const wire = same.entries.map((e) => ({ path: e.path, version: e.version, value: e.value === null ? null : e.value.toString('base64') }));
  const byPath = (a: { path: string }, b: { path: string }) => (a.path < b.path ? -1 : 1);
  expect((JSON.parse(second.batch!.entriesJson) as typeof wire).sort(byPath)).toEqual(wire.sort(byPath));
  expect(second.batch!.entriesJson).not.toContain('\\n');
  expect(second.batch!.count).toBe(same.entries.length);
  expect(second.batch!.bytes).toBe(same.entries.reduce((n, e) => n + (e.value?.length ?? 0), 0));
  expect((await secondaries.get(db, 'sec-2'))!.ackedLsn).toBe(2);
  // An older acknowledgement (a late duplicate) does not move it back.
  expect((await shipStep(db, 'sec-2', 1, 2, 1_000_000)).state.secondary).toMatchObject({ ackedLsn: 2 });
  // At the head: nothing more to send.
  const head = await walHead(db);
  expect((await shipStep(db, 'sec-2', head, 100, 1_000_000)).batch).toBeNull();
  expect((await secondaries.get(db, 'sec-2'))!.ackedLsn).toBe(head);
  // No such secondary: no state, no batch, nothing written.
  expect(await shipStep(db, 'nobody', 5, 100, 1_000_000)).toMatchObject({ state: { secondary: null }, batch: null });
});

/**
 * KV v2 writes are optimistic read-modify-writes of the key's metadata (Barrier.modify over
 * Store.casWrite): no lock is held across round trips, concurrent writes share one statement,
 * and a writer whose metadata moved under it writes nothing and computes again. These tests
 * race real writers — two Cores on one database, as two server processes, each with its own
 * pool and batcher — and check what Vault promises: distinct versions, exact check-and-set,
 * pruning beyond max_versions, and (invariant 1) a WAL row for every stored change.
 */
import { createHash } from 'node:crypto';
import { CasMismatch, NotFound } from '../../src/core/errors';
import { Core } from '../../src/core/core';
import type { LogicalResponse, Operation } from '../../src/core/request';
import { openPostgres, type Database } from '../../src/storage/db';
import { casWriteBatch, getVersionedMany } from '../../src/storage/entries';
import { migrateToLatest } from '../../src/storage/migrate';
import { pgStore } from '../../src/storage/pg-store';
import { ManualClock } from '../helpers/core';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { seededRng } from '../helpers/rng';
import { atomicWalViolations, TERM } from '../helpers/wal-invariants';

let tdb: TestDatabase;
let q: Awaited<ReturnType<typeof sqlClient>>;
const databases: Database[] = [];
const clock = new ManualClock();
let a: Core;
let b: Core;
let root: string;

function call(c: Core, operation: Operation, path: string, data: Record<string, unknown> = {}, query: Record<string, string> = {}): Promise<LogicalResponse> {
  return c.handle({ operation, path, data, query, token: root, headers: {} });
}

async function core(): Promise<Core> {
  const database = openPostgres(tdb.url, 6);
  databases.push(database);
  return new Core({ store: pgStore(database.db), clock, version: 'test' });
}

beforeAll(async () => {
  tdb = await createTestDatabase('kvmodify');
  const migrating = openPostgres(tdb.url, 1);
  databases.push(migrating);
  await migrateToLatest(migrating.db);
  q = await sqlClient(tdb.url);
  a = await core();
  b = await core();
  const init = await a.initialize(1, 1);
  await a.unseal(init.keys[0]);
  await b.unseal(init.keys[0]);
  root = init.rootToken;
  await call(a, 'update', 'sys/mounts/secret', { type: 'kv', options: { version: '2' } });
  await call(a, 'update', 'sys/mounts/local-kv', { type: 'kv', options: { version: '2' }, local: true });
});

afterAll(async () => {
  await q?.end();
  for (const d of databases) await d.close();
  await tdb?.drop();
});

const version = (r: LogicalResponse) => (r.data as { version: number }).version;
const meta = async (c: Core, key: string) => (await call(c, 'read', `secret/metadata/${key}`)).data as { current_version: number; oldest_version: number; versions: Record<string, unknown> };

test('concurrent writers of one key on two processes get distinct versions 1..n; the newest 10 are kept', async () => {
  const n = 40;
  const results = await Promise.all(Array.from({ length: n }, (_, i) => call(i % 2 ? a : b, 'update', 'secret/data/race', { data: { i } })));
  expect(results.map(version).sort((x, y) => x - y)).toEqual(Array.from({ length: n }, (_, i) => i + 1));
  const m = await meta(a, 'race');
  expect(m.current_version).toBe(n);
  expect(m.oldest_version).toBe(n - 9);
  expect(Object.keys(m.versions).map(Number).sort((x, y) => x - y)).toEqual(Array.from({ length: 10 }, (_, i) => n - 9 + i));
  // Each kept version holds the data of the write that was told that version.
  for (const r of results.filter((r) => version(r) > n - 10)) {
    const i = results.indexOf(r);
    expect((await call(b, 'read', 'secret/data/race', {}, { version: String(version(r)) })).data).toMatchObject({ data: { i } });
  }
  // Pruned versions are gone from storage, each by a delete with its WAL row.
  const rows = await q.query(`SELECT count(*) FILTER (WHERE value IS NOT NULL)::int AS live, count(*)::int AS n FROM coffer_entries WHERE path LIKE $1`, [
    `%/versions/${createHash('sha256').update('race').digest('hex')}/%`,
  ]);
  expect(rows.rows[0]).toEqual({ live: 10, n: 40 });
  expect(await atomicWalViolations(q)).toEqual([]);
});

test('check-and-set is exact under a race: of 16 writers with cas=0 on a new key, one wins', async () => {
  const outcomes = await Promise.allSettled(Array.from({ length: 16 }, (_, i) => call(i % 2 ? a : b, 'update', 'secret/data/cas-race', { data: { i }, options: { cas: 0 } })));
  const won = outcomes.filter((o) => o.status === 'fulfilled');
  expect(won).toHaveLength(1);
  for (const o of outcomes) if (o.status === 'rejected') expect(o.reason).toBeInstanceOf(CasMismatch);
  expect((await meta(b, 'cas-race')).current_version).toBe(1);
  // Then cas=1 from both processes at once: again exactly one.
  const second = await Promise.allSettled([a, b, a, b].map((c, i) => call(c, 'update', 'secret/data/cas-race', { data: { i }, options: { cas: 1 } })));
  expect(second.filter((o) => o.status === 'fulfilled')).toHaveLength(1);
});

test('a seeded random mix of writes, patches, deletes, undeletes, destroys and metadata changes from two processes keeps every invariant', async () => {
  const { next: rng } = seededRng('kv-modify mix');
  const keys = ['m/a', 'm/b', 'm/c'];
  const ops = Array.from({ length: 150 }, () => {
    const key = keys[Math.floor(rng() * keys.length)];
    const c = rng() < 0.5 ? a : b;
    const r = rng();
    if (r < 0.45) return () => call(c, 'update', `secret/data/${key}`, { data: { v: Math.floor(rng() * 1000) } });
    if (r < 0.55) return () => c.handle({ operation: 'patch', path: `secret/data/${key}`, data: { data: { p: 1 } }, query: {}, token: root, headers: { 'content-type': 'application/merge-patch+json' } });
    if (r < 0.65) return () => call(c, 'delete', `secret/data/${key}`);
    if (r < 0.72) return () => call(c, 'update', `secret/undelete/${key}`, { versions: [1, 2, 3] });
    if (r < 0.79) return () => call(c, 'update', `secret/destroy/${key}`, { versions: [2] });
    if (r < 0.9) return () => call(c, 'update', `secret/metadata/${key}`, { max_versions: 1 + Math.floor(rng() * 4), custom_metadata: { at: String(r) } });
    return () => call(c, 'delete', `secret/metadata/${key}`);
  });
  // Eight at a time, so operations on one key really overlap.
  // Only the answers Vault gives for such races may come back (404 for a gone key or version,
  // 400 for a patch of nothing): never a conflict or a storage error.
  for (let i = 0; i < ops.length; i += 8) {
    for (const o of await Promise.allSettled(ops.slice(i, i + 8).map((op) => op()))) {
      if (o.status === 'rejected') expect(`${o.reason.constructor.name}: ${o.reason.message}`).toMatch(/^(NotFound|InvalidRequest):/);
    }
  }
  for (const key of keys) {
    const m = await call(a, 'read', `secret/metadata/${key}`).catch(() => null);
    if (!m) continue;
    const md = m.data as { current_version: number; oldest_version: number; max_versions: number; versions: Record<string, { destroyed: boolean }> };
    // The kept versions run from oldest_version to current_version without a gap (a lower
    // max_versions prunes at the next data write, so their number is not checked here); a key
    // created by a metadata write alone has none (current_version 0).
    const kept = Object.keys(md.versions).map(Number).sort((x, y) => x - y);
    const expected = md.current_version === 0 ? [] : Array.from({ length: md.current_version - md.oldest_version + 1 }, (_, i) => md.oldest_version + i);
    expect(kept).toEqual(expected);
  }
  expect(await atomicWalViolations(q)).toEqual([]);
});

test('a local mount (never replicated) runs the same read-modify-write under a lock; no WAL rows', async () => {
  const before = (await q.query(`SELECT count(*)::int AS n FROM coffer_wal`)).rows[0].n;
  const results = await Promise.all(Array.from({ length: 12 }, (_, i) => call(i % 2 ? a : b, 'update', 'local-kv/data/k', { data: { i } })));
  expect(results.map(version).sort((x, y) => x - y)).toEqual(Array.from({ length: 12 }, (_, i) => i + 1));
  expect((await q.query(`SELECT count(*)::int AS n FROM coffer_wal`)).rows[0].n).toBe(before);
});

test('KV v1 puts and deletes are blind (last writer wins): 60 concurrent writes of one key from two processes all succeed, each a version', async () => {
  await call(a, 'update', 'sys/mounts/v1', { type: 'kv', options: { version: '1' } });
  const results = await Promise.all(
    Array.from({ length: 60 }, (_, i) => (i % 10 === 9 ? call(i % 2 ? a : b, 'delete', 'v1/hot') : call(i % 2 ? a : b, 'update', 'v1/hot', { i }))),
  );
  expect(results.every((r) => r.status === 204)).toBe(true);
  // Every put bumped the version (a delete of a live value too; of nothing, nothing).
  const row = (await q.query(`SELECT version::int AS v FROM coffer_entries WHERE path LIKE '%/hot'`)).rows[0];
  const walRows = (await q.query(`SELECT count(*)::int AS n FROM coffer_wal WHERE path LIKE '%/hot'`)).rows[0].n;
  expect(row.v).toBe(walRows);
  expect(walRows).toBeGreaterThanOrEqual(54);
  expect(await atomicWalViolations(q)).toEqual([]);
});

describe('the batched statement itself', () => {
  const databaseOf = () => databases[1].db;

  test('a write whose anchor moved writes nothing (no entry, no WAL row); the others of its batch commit', async () => {
    const v = Buffer.from([0, 0, 0, TERM, 1, 2, 3]);
    const first = await casWriteBatch(databaseOf(), [{ anchor: { path: 'cas/anchor', version: 0, value: v }, puts: [], deletes: [] }], TERM);
    expect(first.outcomes[0]).not.toBeNull();
    // The statement reports what it committed, as the WAL table holds it (the active node feeds
    // its merkle index from this without reading the WAL back).
    const wal1 = (await q.query(`SELECT lsn::int AS lsn, path, op, value_hash FROM coffer_wal WHERE path = 'cas/anchor'`)).rows[0];
    expect(first.committed!.records).toEqual([{ lsn: wal1.lsn, path: 'cas/anchor', op: 'put', valueHash: wal1.value_hash, sp: expect.any(Number) }]);
    expect(first.outcomes[0]).toBe(wal1.lsn);
    const walBefore = (await q.query(`SELECT count(*)::int AS n FROM coffer_wal`)).rows[0].n;
    const { outcomes: out, committed } = await casWriteBatch(
      databaseOf(),
      [
        // Stale: the anchor is at version 1 now.
        { anchor: { path: 'cas/anchor', version: 0, value: v }, puts: [['cas/side-a', v]], deletes: [] },
        { anchor: { path: 'cas/other', version: 0, value: v }, puts: [['cas/side-b', v]], deletes: [] },
      ],
      TERM,
    );
    expect(out[0]).toBeNull();
    expect(out[1]).toBeGreaterThan(0);
    // Only the winner's rows, in position order, ending at its outcome.
    expect(committed!.records.map((r) => r.path).sort()).toEqual(['cas/other', 'cas/side-b']);
    expect(committed!.records.map((r) => r.lsn)).toEqual([out[1]! - 1, out[1]]);
    const [anchor, sideA, sideB] = await getVersionedMany(databaseOf(), ['cas/anchor', 'cas/side-a', 'cas/side-b']);
    expect(anchor.version).toBe(1);
    expect(sideA).toEqual({ value: null, version: 0 });
    expect(sideB.version).toBe(1);
    expect((await q.query(`SELECT count(*)::int AS n FROM coffer_wal`)).rows[0].n).toBe(walBefore + 2);
    // A delete of the anchor is guarded the same way, and keeps a tombstone (version bumped).
    expect((await casWriteBatch(databaseOf(), [{ anchor: { path: 'cas/anchor', version: 0, value: null }, puts: [], deletes: [] }], TERM)).committed).toBeNull();
    expect((await casWriteBatch(databaseOf(), [{ anchor: { path: 'cas/anchor', version: 1, value: null }, puts: [], deletes: [] }], TERM)).outcomes[0]).toBeGreaterThan(0);
    expect((await getVersionedMany(databaseOf(), ['cas/anchor']))[0]).toEqual({ value: null, version: 2 });
    // A blind write (-1) writes whatever the version; a blind delete of a tombstone writes nothing.
    const blind = await casWriteBatch(databaseOf(), [{ anchor: { path: 'cas/anchor', version: -1, value: v }, puts: [], deletes: [] }], TERM);
    expect(blind.outcomes[0]).toBeGreaterThan(0);
    expect((await getVersionedMany(databaseOf(), ['cas/anchor']))[0]).toEqual({ value: v, version: 3 });
    expect((await casWriteBatch(databaseOf(), [{ anchor: { path: 'cas/anchor', version: -1, value: null }, puts: [], deletes: [] }], TERM)).outcomes[0]).toBeGreaterThan(0);
    expect((await casWriteBatch(databaseOf(), [{ anchor: { path: 'cas/anchor', version: -1, value: null }, puts: [], deletes: [] }], TERM)).outcomes[0]).toBeNull();
    expect((await getVersionedMany(databaseOf(), ['cas/anchor']))[0]).toEqual({ value: null, version: 4 });
    // "Absent" (0) does not match a tombstone.
    expect((await casWriteBatch(databaseOf(), [{ anchor: { path: 'cas/anchor', version: 0, value: v }, puts: [], deletes: [] }], TERM)).outcomes[0]).toBeNull();
    expect(await atomicWalViolations(q)).toEqual([]);
  });

  test('two statements racing on one anchor from two pools: exactly one wins, whatever their snapshots', async () => {
    const v = Buffer.from([0, 0, 0, TERM, 9]);
    for (let round = 0; round < 20; round++) {
      const path = `cas/race/${round}`;
      const out = await Promise.all(
        [databases[1].db, databases[2].db].map((db) => casWriteBatch(db, [{ anchor: { path, version: 0, value: v }, puts: [[`${path}/data`, v]], deletes: [] }], TERM)),
      );
      expect(out.filter((r) => r.outcomes[0] !== null)).toHaveLength(1);
      expect((await getVersionedMany(databaseOf(), [path, `${path}/data`])).map((r) => r.version)).toEqual([1, 1]);
    }
  });

  test('two processes writing the same anchors in opposite orders never deadlock', async () => {
    const v = Buffer.from([0, 0, 0, TERM, 7]);
    for (let round = 0; round < 150; round++) {
      const paths = Array.from({ length: 8 }, (_, i) => `dl/${round}/${i}`);
      await casWriteBatch(databaseOf(), paths.map((path) => ({ anchor: { path, version: 0, value: v }, puts: [], deletes: [] })), TERM);
      // The same anchors, one process in order and one in reverse, some puts and some deletes:
      // without an order between the statements each would lock rows the other needs next.
      const writes = (order: string[]) => order.map((path, i) => ({ anchor: { path, version: 1, value: i % 3 === 2 ? null : v }, puts: [], deletes: [] }));
      const out = await Promise.all([casWriteBatch(databases[1].db, writes(paths), TERM), casWriteBatch(databases[2].db, writes([...paths].reverse()), TERM)]);
      // Each anchor was changed by exactly one of them.
      expect(out.flatMap((r) => r.outcomes).filter((o) => o !== null)).toHaveLength(paths.length);
    }
    expect(await atomicWalViolations(q)).toEqual([]);
  });
});

test('a metadata delete (which encrypts nothing) commits; the key then starts again at version 1', async () => {
  for (const v of [1, 2]) await call(a, 'update', 'secret/data/gone', { data: { v } });
  const del = await call(b, 'delete', 'secret/metadata/gone');
  expect(del.walLsn).toBeGreaterThan(0);
  await expect(call(a, 'read', 'secret/metadata/gone')).rejects.toBeInstanceOf(NotFound);
  expect(version(await call(a, 'update', 'secret/data/gone', { data: { v: 3 } }))).toBe(1);
  // Soft delete of the latest version (also nothing encrypted but the metadata) and back.
  expect((await call(b, 'delete', 'secret/data/gone')).walLsn).toBeGreaterThan(0);
  expect((await call(a, 'update', 'secret/undelete/gone', { versions: [1] })).walLsn).toBeGreaterThan(0);
  expect(await atomicWalViolations(q)).toEqual([]);
});

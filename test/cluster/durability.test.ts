/**
 * DESIGN.md invariant 6 (no acknowledged write is lost) and invariant 1 (atomic WAL) across a
 * `kill -9` in the middle of a write burst: 24 concurrent writers on KV v2 with unique keys; once
 * ~300 writes are acknowledged the process is killed. Requests in flight fail (fine: only
 * 2xx-acknowledged writes count). A new process on the same database, unsealed with the same
 * key, must serve every acknowledged key with exactly the value written; in SQL every entry has
 * WAL rows for versions 1..version, no WAL row lacks its entry, and the WAL orders densely again.
 */
import { createHash } from 'node:crypto';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, unseal, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { seededRng } from '../helpers/rng';
import { waitFor } from '../helpers/wait';
import { atomicWalViolations, unorderedCount, walOrderViolations } from '../helpers/wal-invariants';

let tdb: TestDatabase | undefined;
let q: Awaited<ReturnType<typeof sqlClient>> | undefined;
afterAll(async () => {
  await stopAllCoffers();
  await q?.end().catch(() => undefined);
  await tdb?.drop();
});

const WRITERS = 24;
const KILL_AFTER_ACKS = 300;

test('kill -9 mid-burst: every acknowledged write survives a restart, byte for byte, with its WAL rows', async () => {
  const rng = seededRng('durability');
  tdb = await createTestDatabase('durable');
  const first = await startCoffer({ dbUrl: tdb.url, logLevel: 'warn' });
  const { rootToken, keys } = await initAndUnseal([first]);
  await mountKv2(first.addr, rootToken);

  // Keys are unique per (writer, i); values are a function of (seed, writer, i), so a seed replays
  // them whatever the interleaving. Lengths vary so values are not all one size.
  const valueFor = (w: number, i: number) => {
    const h = createHash('sha256').update(`${rng.seed}/${w}/${i}`).digest();
    return { w, i, secret: h.toString('base64url').repeat(1 + (h[0] % 8)) };
  };
  const acked = new Map<string, Record<string, unknown>>();
  const attempted = new Map<string, Record<string, unknown>>();
  const errors: string[] = [];
  let inFlight = 0;
  let inFlightAtKill = -1;
  let killing: Promise<number | null> | null = null;

  const writer = async (w: number) => {
    for (let i = 0; ; i++) {
      if (killing) return; // this writer's next request would only hit a dead process
      const key = `burst/w${w}/k${i}`;
      const data = valueFor(w, i);
      attempted.set(key, data);
      inFlight++;
      try {
        const r = await vault(first.addr, 'POST', `secret/data/${key}`, { token: rootToken, body: { data } });
        if (r.status >= 200 && r.status < 300) {
          acked.set(key, data);
          if (acked.size === KILL_AFTER_ACKS && !killing) {
            inFlightAtKill = inFlight - 1;
            killing = first.kill('SIGKILL');
          }
        } else errors.push(`${key}: ${r.status}`);
      } catch (err) {
        errors.push(`${key}: ${(err as Error).message}`);
        if (!killing) throw err;
        return;
      } finally {
        inFlight--;
      }
    }
  };
  await Promise.all(Array.from({ length: WRITERS }, (_, w) => writer(w)));
  expect(killing).not.toBeNull();
  await killing;
  // eslint-disable-next-line no-console
  console.log(`[durability] acked=${acked.size} attempted=${attempted.size} in flight at kill=${inFlightAtKill} failed=${errors.length}`);
  // The kill really happened mid-burst: requests were in flight and some of them failed.
  expect(inFlightAtKill).toBeGreaterThan(0);
  expect(errors.length).toBeGreaterThan(0);
  expect(errors.every((e) => !/: \d{3}$/.test(e))).toBe(true); // no non-2xx answers before the kill
  expect(acked.size).toBeGreaterThanOrEqual(KILL_AFTER_ACKS);

  // A new process on the same database, unsealed with the same key.
  const second: CofferProcess = await startCoffer({ dbUrl: tdb.url, logLevel: 'warn' });
  await unseal(second, keys);

  // Every acknowledged key reads back exactly; an unacknowledged one is all there or not at all.
  const lost: string[] = [];
  const wrong: string[] = [];
  const entries = [...attempted.entries()];
  for (let i = 0; i < entries.length; i += 32) {
    await Promise.all(
      entries.slice(i, i + 32).map(async ([key, data]) => {
        const r = await vault(second.addr, 'GET', `secret/data/${key}`, { token: rootToken });
        if (acked.has(key)) {
          if (r.status !== 200) lost.push(`${key}: ${r.status}`);
          else if (JSON.stringify(r.body.data.data) !== JSON.stringify(data) || r.body.data.metadata.version !== 1) wrong.push(key);
        } else if (r.status === 200) {
          if (JSON.stringify(r.body.data.data) !== JSON.stringify(data)) wrong.push(`${key} (unacknowledged, committed with another value)`);
        } else if (r.status !== 404) wrong.push(`${key} (unacknowledged): ${r.status}`);
      }),
    );
  }
  expect(lost).toEqual([]);
  expect(wrong).toEqual([]);

  // In SQL: every entry has WAL rows for versions 1..version and no WAL row lacks its entry.
  q = await sqlClient(tdb.url);
  expect(await atomicWalViolations(q)).toEqual([]);
  // The new process takes the active lease and orders what the dead one left unordered.
  await waitFor('the WAL to be fully ordered after the restart', async () => (await unorderedCount(q!)) === 0, { timeoutMs: 20_000 });
  const shape = await walOrderViolations(q);
  expect(shape.violations).toEqual([]);
  // Each acknowledged KV write is in the ordered WAL (its metadata path has a position).
  const { rows } = await q.query(`SELECT count(*)::int AS n FROM coffer_wal WHERE path LIKE 'logical/%/metadata/burst/%' AND lsn IS NOT NULL`);
  expect(rows[0].n).toBeGreaterThanOrEqual(acked.size);
});

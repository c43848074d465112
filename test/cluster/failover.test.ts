/**
 * Failover (issue #6): promote a secondary while the primary is down, and bring the old
 * primary back into the set.
 *
 *   1. dc1 (primary) replicates to dc2 and dc3; W1 reaches both.
 *   2. dc2 and dc3 go down; dc1 acknowledges one more write (kv/unshipped = "old") that no
 *      secondary ever gets; then dc1 goes down too.
 *   3. dc2 comes back and is promoted (epoch 2): its response reports what it knew of the gap;
 *      it takes writes (W3, and kv/unshipped = "new").
 *   4. dc3 comes back and is re-pointed at dc2 with update-primary: no wipe, merkle diff.
 *   5. dc1 comes back still believing it is primary. Shipping to dc2 or dc3 is refused with a
 *      higher epoch: dc1 marks itself superseded and refuses writes (503). Nothing it accepts
 *      is applied anywhere.
 *   6. dc1 is demoted and re-pointed at dc2: it converges to dc2's data. Its unshipped write
 *      is overwritten, and listed in its divergence report (path, versions, hash; no value).
 *
 * At the end all three clusters hold identical replicated rows and equal merkle roots, with
 * every write dc2 had applied or accepted.
 */
import { vault } from '../helpers/http';
import type { TestDatabase } from '../helpers/pg';
import {
  activationToken,
  diffRows,
  enablePrimary,
  enableSecondary,
  liveRows,
  perfStatus,
  releaseClusters,
  waitForStream,
  type Cluster,
} from '../helpers/replication';
import { waitFor } from '../helpers/wait';
import { mountKv1, restart, startClusterWith, writeAll } from './merkle-support';

jest.setTimeout(180_000);

const dbs: TestDatabase[] = [];
afterAll(() => releaseClusters(undefined, [], dbs));

const HCL = `merkle {\n  checkpoint_interval = "200ms"\n  flush_interval = "50ms"\n}\n`;
const read = async (c: Cluster, key: string) => (await vault(c.addr, 'GET', `kv/${key}`, { token: c.token })).body?.data?.v;

test('promote while the primary is down; the old primary is fenced, demoted, re-pointed, and converges', async () => {
  const [dc1, dc2, dc3] = await Promise.all([
    startClusterWith('fo_dc1', dbs, { extraHcl: HCL }),
    startClusterWith('fo_dc2', dbs, { extraHcl: HCL }),
    startClusterWith('fo_dc3', dbs, { extraHcl: HCL }),
  ]);
  await mountKv1(dc1.addr, dc1.token);
  await enablePrimary(dc1);
  await enableSecondary(dc2, await activationToken(dc1, 'dc2'));
  await enableSecondary(dc3, await activationToken(dc1, 'dc3'));
  await waitForStream(dc2.addr, 'dc2 streams', { timeoutMs: 30_000 });
  await waitForStream(dc3.addr, 'dc3 streams', { timeoutMs: 30_000 });
  expect((await perfStatus(dc1.addr)).epoch).toBe(1);

  // 1. W1 everywhere.
  const w1 = Array.from({ length: 40 }, (_, i) => `w1/${i}`);
  await writeAll(dc1.addr, dc1.token, w1.map((k) => `kv/${k}`), (p) => ({ v: `one:${p}` }));
  for (const c of [dc2, dc3]) await waitFor(`W1 on ${c.addr}`, async () => (await read(c, 'w1/39')) === 'one:kv/w1/39', { timeoutMs: 20_000 });

  // 2. The secondaries go down; the primary acknowledges a write nobody receives; it goes down.
  await dc2.p.kill('SIGKILL');
  await dc3.p.kill('SIGKILL');
  expect((await vault(dc1.addr, 'POST', 'kv/unshipped', { token: dc1.token, body: { v: 'old' } })).status).toBe(204);
  await dc1.p.kill('SIGKILL');

  // 3. dc2 is promoted.
  await restart(dc2);
  const promoted = await vault(dc2.addr, 'POST', 'sys/replication/performance/secondary/promote', { token: dc2.token, body: {} });
  expect(promoted.status).toBe(200);
  console.log(`[failover] promote: ${JSON.stringify(promoted.body.data)}; ${promoted.body.warnings[0]}`);
  expect(promoted.body.data).toMatchObject({ epoch: 2 });
  expect(typeof promoted.body.data.wal_behind_at_last_contact).toBe('number');
  const st2 = await perfStatus(dc2.addr);
  expect([st2.mode, st2.epoch, st2.superseded]).toEqual(['primary', 2, false]);
  // It has everything it had applied, and takes writes.
  expect(await read(dc2, 'w1/0')).toBe('one:kv/w1/0');
  expect(await read(dc2, 'unshipped')).toBeUndefined();
  const w3 = Array.from({ length: 20 }, (_, i) => `w3/${i}`);
  await writeAll(dc2.addr, dc2.token, w3.map((k) => `kv/${k}`), (p) => ({ v: `three:${p}` }));
  expect((await vault(dc2.addr, 'POST', 'kv/unshipped', { token: dc2.token, body: { v: 'new' } })).status).toBe(204);

  // 4. dc3 re-points at dc2 without a wipe.
  await restart(dc3);
  const repoint3 = await vault(dc3.addr, 'POST', 'sys/replication/performance/secondary/update-primary', {
    token: dc3.token,
    body: { token: await activationToken(dc2, 'dc3') },
  });
  expect([repoint3.status, repoint3.body.errors]).toEqual([200, undefined]);
  await waitFor('dc3 follows dc2', async () => (await read(dc3, 'unshipped')) === 'new' && (await read(dc3, 'w3/19')) === 'three:kv/w3/19', { timeoutMs: 30_000 });
  expect((await perfStatus(dc3.addr)).epoch).toBe(2);

  // 5. dc1 returns believing it is primary; shipping meets epoch 2 and fences it.
  await restart(dc1);
  await waitFor('dc1 superseded', async () => (await perfStatus(dc1.addr)).superseded === true, { timeoutMs: 30_000 });
  const st1 = await perfStatus(dc1.addr);
  expect([st1.mode, st1.epoch, st1.superseded_by_epoch]).toEqual(['primary', 1, 2]);
  const refused = await vault(dc1.addr, 'POST', 'kv/after-fence', { token: dc1.token, body: { v: 'must not land' } });
  expect(refused.status).toBe(503);
  expect(refused.body.errors.join(' ')).toMatch(/superseded/);
  // Reads still work there (stale).
  expect(await read(dc1, 'unshipped')).toBe('old');

  // 6. Demote dc1 and re-point it at dc2.
  expect((await vault(dc1.addr, 'POST', 'sys/replication/performance/primary/demote', { token: dc1.token, body: {} })).status).toBe(200);
  expect((await perfStatus(dc1.addr)).mode).toBe('secondary');
  const repoint1 = await vault(dc1.addr, 'POST', 'sys/replication/performance/secondary/update-primary', {
    token: dc1.token,
    body: { token: await activationToken(dc2, 'dc1') },
  });
  expect([repoint1.status, repoint1.body.errors]).toEqual([200, undefined]);
  await waitForStream(dc1.addr, 'dc1 streams from dc2', { timeoutMs: 30_000 });
  await waitFor('dc1 has dc2 data', async () => (await read(dc1, 'unshipped')) === 'new', { timeoutMs: 30_000 });

  // One more write on the new primary reaches both followers.
  expect((await vault(dc2.addr, 'POST', 'kv/final', { token: dc2.token, body: { v: 'fin' } })).status).toBe(204);
  for (const c of [dc1, dc3]) await waitFor(`final on ${c.addr}`, async () => (await read(c, 'final')) === 'fin', { timeoutMs: 20_000 });

  // Identical rows and roots everywhere; nothing dc1 accepted after the fence exists anywhere.
  const rows2 = await liveRows(dc2.db.url);
  for (const c of [dc1, dc3]) expect(diffRows(rows2, await liveRows(c.db.url))).toEqual({ onlyOnPrimary: 0, onlySecondary: 0, differing: 0, examples: [] });
  for (const c of [dc1, dc2, dc3]) expect(await read(c, 'after-fence')).toBeUndefined();
  await waitFor('equal roots', async () => {
    const roots = await Promise.all([dc1, dc2, dc3].map(async (c) => (await perfStatus(c.addr)).merkle_root));
    return roots[0] !== '' && roots.every((r) => r === roots[0]) ? roots[0] : null;
  }, { timeoutMs: 20_000 });

  // The divergence report keeps the unshipped write: path, versions, ciphertext hash only.
  const report = await vault(dc1.addr, 'GET', 'sys/replication/performance/divergence', { token: dc1.token });
  expect(report.status).toBe(200);
  const mine = report.body.data.keys.filter((k: { path: string }) => k.path.endsWith('/unshipped'));
  expect(mine).toEqual([expect.objectContaining({ action: 'overwritten', local_version: 1, primary_version: 1, epoch: 2 })]);
  expect(mine[0].local_value_sha256).toMatch(/^[0-9a-f]{64}$/);
  expect(JSON.stringify(report.body)).not.toContain('old');
  // dc2 and dc3 never held anything dc2 lacked.
  expect((await vault(dc3.addr, 'GET', 'sys/replication/performance/divergence', { token: dc3.token })).body.data.keys).toEqual([]);
});

/**
 * Split brain: the primary is only partitioned (alive, taking writes) when the secondary is
 * promoted. Fencing resolves it: once the link heals, the old primary's first shipment meets
 * the higher epoch; it marks itself superseded and refuses writes; nothing it accepted during
 * the partition is applied on the new primary; after demote + update-primary it converges
 * and its partition-time writes are in its divergence report.
 */
test('split brain: promote while the primary is only partitioned; fencing resolves it', async () => {
  const { FaultProxy } = await import('../harness/fault-proxy');
  const { startCoffer, initAndUnseal } = await import('../helpers/coffer-process');
  const { createTestDatabase } = await import('../helpers/pg');
  const { freePort } = await import('../helpers/replication');
  const rng = { next: Math.random };

  const dc1 = await startClusterWith('fo_sb1', dbs, { extraHcl: HCL });
  // dc2 announces itself behind proxy B (the primary's pushes cross it) and reaches dc1 through
  // proxy A: cutting both partitions the two clusters while the test still talks to each.
  const port2 = await freePort();
  const toDc1 = FaultProxy.forUrls([dc1.addr], rng, 'to-dc1');
  const toDc2 = FaultProxy.forUrls([`http://127.0.0.1:${port2}`], rng, 'to-dc2');
  await toDc1.listen();
  await toDc2.listen();
  const db2 = await createTestDatabase('fo_sb2');
  dbs.push(db2);
  const p2 = await startCoffer({ dbUrl: db2.url, port: port2, logLevel: 'warn', extraHcl: `api_addr = "${toDc2.url}"\n${HCL}` });
  const direct2 = `http://127.0.0.1:${port2}`;
  const init2 = await initAndUnseal([{ ...p2, addr: direct2 }]);
  const dc2: Cluster = { p: p2, opts: { dbUrl: db2.url }, token: init2.rootToken, keys: init2.keys, db: db2, addr: direct2 };
  try {
    await mountKv1(dc1.addr, dc1.token);
    await enablePrimary(dc1);
    const en = await vault(dc2.addr, 'POST', 'sys/replication/performance/secondary/enable', {
      token: dc2.token,
      body: { token: await activationToken(dc1, 'dc2'), primary_api_addr: toDc1.url },
    });
    expect([en.status, en.body.errors]).toEqual([200, undefined]);
    await waitForStream(dc2.addr, 'dc2 streams', { timeoutMs: 30_000 });
    await writeAll(dc1.addr, dc1.token, ['kv/sb/w1'], () => ({ v: 'one' }));
    await waitFor('W1 on dc2', async () => (await read(dc2, 'sb/w1')) === 'one', { timeoutMs: 20_000 });

    // Partition. dc1 is alive and still acknowledges writes.
    await toDc1.cut();
    await toDc2.cut();
    const partitionWrites = Array.from({ length: 5 }, (_, i) => `sb/p${i}`);
    await writeAll(dc1.addr, dc1.token, partitionWrites.map((k) => `kv/${k}`), (p) => ({ v: `partitioned:${p}` }));
    await waitFor('dc2 sees the primary unreachable', async () => (await perfStatus(dc2.addr)).state === 'idle', { timeoutMs: 20_000 });

    // dc2 is promoted and takes writes.
    const promoted = await vault(dc2.addr, 'POST', 'sys/replication/performance/secondary/promote', { token: dc2.token, body: {} });
    expect(promoted.status).toBe(200);
    expect(promoted.body.data.epoch).toBe(2);
    await writeAll(dc2.addr, dc2.token, ['kv/sb/w3', 'kv/sb/p0'], (p) => ({ v: `new:${p}` }));

    // Heal: dc1's next shipment meets epoch 2.
    await toDc1.heal();
    await toDc2.heal();
    await waitFor('dc1 superseded', async () => (await perfStatus(dc1.addr)).superseded === true, { timeoutMs: 30_000 });
    expect((await vault(dc1.addr, 'POST', 'kv/sb/after', { token: dc1.token, body: { v: 'x' } })).status).toBe(503);
    // Nothing dc1 accepted in the partition reached the new primary.
    for (const k of partitionWrites.slice(1)) expect(await read(dc2, k)).toBeUndefined();
    expect(await read(dc2, 'sb/p0')).toBe('new:kv/sb/p0');

    // Demote + re-point: dc1 converges on dc2's data; its partition writes are reported.
    expect((await vault(dc1.addr, 'POST', 'sys/replication/performance/primary/demote', { token: dc1.token, body: {} })).status).toBe(200);
    const rp = await vault(dc1.addr, 'POST', 'sys/replication/performance/secondary/update-primary', {
      token: dc1.token,
      body: { token: await activationToken(dc2, 'dc1'), primary_api_addr: direct2 },
    });
    expect([rp.status, rp.body.errors]).toEqual([200, undefined]);
    await waitForStream(dc1.addr, 'dc1 streams from dc2', { timeoutMs: 30_000 });
    await waitFor('dc1 converged', async () => (await read(dc1, 'sb/w3')) === 'new:kv/sb/w3' && (await read(dc1, 'sb/p1')) === undefined, { timeoutMs: 30_000 });
    expect(diffRows(await liveRows(dc2.db.url), await liveRows(dc1.db.url))).toEqual({ onlyOnPrimary: 0, onlySecondary: 0, differing: 0, examples: [] });
    const report = (await vault(dc1.addr, 'GET', 'sys/replication/performance/divergence', { token: dc1.token })).body.data.keys as { path: string; action: string }[];
    const reported = new Map(report.map((k) => [k.path.split('/').slice(-2).join('/'), k.action]));
    expect(Object.fromEntries(partitionWrites.map((k) => [k, reported.get(k)]))).toEqual({
      'sb/p0': 'overwritten',
      'sb/p1': 'purged',
      'sb/p2': 'purged',
      'sb/p3': 'purged',
      'sb/p4': 'purged',
    });
  } finally {
    await toDc1.shutdown();
    await toDc2.shutdown();
  }
});

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

/**
 * Several server processes on one database: each serves reads and writes, one is active.
 * Killing the active one (kill -9) hands the lease to a standby within seconds.
 */
import { createTestDatabase, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { waitFor } from '../helpers/wait';
import { replicatePair, startCluster } from '../helpers/replication';

let db: TestDatabase;
afterAll(async () => {
  await stopAllCoffers();
  await db?.drop();
});

async function healthCode(p: CofferProcess): Promise<number> {
  return (await fetch(`${p.addr}/v1/sys/health`, { method: 'HEAD' })).status;
}

test('kill -9 of the active process: a standby takes over and sys/health says so', async () => {
  db = await createTestDatabase('lease');
  const a = await startCoffer({ dbUrl: db.url });
  const b = await startCoffer({ dbUrl: db.url });
  const { rootToken } = await initAndUnseal([a, b]);
  await mountKv2(a.addr, rootToken);

  const active = await waitFor('one active node', async () => {
    const codes = await Promise.all([a, b].map(healthCode));
    return codes.includes(200) && codes.includes(429) ? (codes[0] === 200 ? a : b) : null;
  });
  const standby = active === a ? b : a;

  // Both serve writes and reads.
  for (const [i, p] of [a, b].entries()) {
    const w = await vault(p.addr, 'POST', `secret/data/k${i}`, { token: rootToken, body: { data: { i } } });
    expect(w.status).toBe(200);
  }
  const leader = await vault(standby.addr, 'GET', 'sys/leader');
  expect(leader.body).toMatchObject({ ha_enabled: true, is_self: false, leader_address: active.addr });
  const standbyHealth = await vault(standby.addr, 'GET', 'sys/health?standbyok=true');
  expect(standbyHealth.status).toBe(200);
  expect(standbyHealth.body.standby).toBe(true);

  await active.kill('SIGKILL');
  await waitFor('standby to become active', async () => (await healthCode(standby)) === 200, { timeoutMs: 15_000 });
  const h = await vault(standby.addr, 'GET', 'sys/health');
  expect(h.body).toMatchObject({ standby: false, sealed: false, initialized: true });
  const l = await vault(standby.addr, 'GET', 'sys/leader');
  expect(l.body).toMatchObject({ is_self: true, leader_address: standby.addr });

  // The new active node orders WAL: a write after takeover gets a dense position.
  const w = await vault(standby.addr, 'POST', 'secret/data/after', { token: rootToken, body: { data: { x: 1 } } });
  expect(w.status).toBe(200);
  const r = await vault(standby.addr, 'GET', 'secret/data/k0', { token: rootToken });
  expect(r.body.data.data).toEqual({ i: 0 });
});

test("a standby's writes reach the active node's WAL follower by NOTIFY, not by its safety poll", async () => {
  const d = await createTestDatabase('lease-notify');
  try {
    // The follower polls every 10 minutes (the hook fixes its wait instead of backing off up to
    // it): only the notification can bring the standby's writes in time.
    const env = { COFFER_WAL_POLL_MS: '600000' };
    const a = await startCoffer({ dbUrl: d.url, env });
    const b = await startCoffer({ dbUrl: d.url, env });
    const { rootToken } = await initAndUnseal([a, b]);
    const active = await waitFor('one active node', async () => {
      const codes = await Promise.all([a, b].map(healthCode));
      return codes.includes(200) && codes.includes(429) ? (codes[0] === 200 ? a : b) : null;
    });
    const standby = active === a ? b : a;
    await mountKv2(active.addr, rootToken);
    const appliedOnActive = async () => {
      const text = await (await fetch(`${active.addr}/v1/sys/metrics?format=prometheus`, { headers: { 'X-Vault-Token': rootToken } })).text();
      return Number(/^coffer_merkle_applied_lsn (\d+)/m.exec(text)?.[1] ?? -1);
    };
    for (let i = 0; i < 5; i++) {
      const w = await vault(standby.addr, 'POST', `secret/data/from-standby/${i}`, { token: rootToken, body: { data: { i } } });
      expect(w.status).toBe(200);
      const index = Number(w.headers.get('x-vault-index'));
      expect(index).toBeGreaterThan(0);
      await waitFor(`the active node's index to reach the standby's write at ${index}`, async () => (await appliedOnActive()) >= index, { timeoutMs: 20_000 });
    }
  } finally {
    await stopAllCoffers();
    await d.drop();
  }
});

/**
 * A secondary cluster of two processes whose replication tick is 10 minutes (the hook): its
 * standby learns that the cluster became a secondary by NOTIFY, or — deaf to it (the other
 * hook) — when storage's role guard refuses its write. Either way a write sent to the standby
 * is forwarded to the primary, never written on the secondary.
 */
async function standbyForwardsAfterSecondaryEnable(label: string, standbyEnv: Record<string, string>): Promise<void> {
  const dbs: TestDatabase[] = [];
  try {
    const pri = await startCluster(`${label}-pri`, dbs);
    const d = await createTestDatabase(`${label}-sec`);
    dbs.push(d);
    const env = { COFFER_REPLICATION_TICK_MS: '600000' };
    // The first process takes the lease (the second starts once it has): it is the active one.
    const s1 = await startCoffer({ dbUrl: d.url, env });
    const { rootToken, keys } = await initAndUnseal([s1]);
    await waitFor('s1 active', async () => (await healthCode(s1)) === 200);
    const s2 = await startCoffer({ dbUrl: d.url, env: { ...env, ...standbyEnv } });
    for (const key of keys) await vault(s2.addr, 'PUT', 'sys/unseal', { body: { key } });
    expect(await healthCode(s2)).toBe(429);
    await replicatePair(pri, { addr: s1.addr, token: rootToken }, label);
    const w = await vault(s2.addr, 'POST', 'secret/data/via-standby', { token: rootToken, body: { data: { x: 1 } } });
    expect([w.status, w.body.errors]).toEqual([200, undefined]);
    const onPrimary = await vault(pri.addr, 'GET', 'secret/data/via-standby', { token: pri.token });
    expect(onPrimary.body.data?.data).toEqual({ x: 1 });
    // And it reached the secondary the way everything does: shipped and applied.
    await waitFor('the write applied on the secondary', async () => (await vault(s1.addr, 'GET', 'secret/data/via-standby', { token: rootToken })).status === 200, { timeoutMs: 20_000 });
  } finally {
    await stopAllCoffers();
    for (const d of dbs) await d.drop();
  }
}

test("a standby follows a change of its cluster's replication role by NOTIFY, not by its tick", () => standbyForwardsAfterSecondaryEnable('role-notify', {}));

test('a standby that has not heard of the change yet: storage refuses its write, and it is forwarded', () =>
  standbyForwardsAfterSecondaryEnable('role-guard', { COFFER_TEST_IGNORE_ROLE_NOTIFY: '1' }));

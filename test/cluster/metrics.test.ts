/** sys/metrics: Prometheus text with Vault's names, behind a token unless configured otherwise. */
import { createTestDatabase, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { waitFor } from '../helpers/wait';

let db: TestDatabase;
afterAll(async () => {
  await stopAllCoffers();
  await db?.drop();
});

test('prometheus metrics report requests and the WAL head; no token → 403', async () => {
  db = await createTestDatabase('metrics');
  const p = await startCoffer({ dbUrl: db.url });
  const { rootToken } = await initAndUnseal([p]);
  await mountKv2(p.addr, rootToken);
  for (let i = 0; i < 3; i++) await vault(p.addr, 'POST', `secret/data/m${i}`, { token: rootToken, body: { data: { i } } });

  expect((await vault(p.addr, 'GET', 'sys/metrics?format=prometheus')).status).toBe(403);
  const text = await waitFor('the WAL head to be reported', async () => {
    const r = await fetch(`${p.addr}/v1/sys/metrics?format=prometheus`, { headers: { 'X-Vault-Token': rootToken } });
    const body = await r.text();
    const head = Number(/^vault_replication_wal_last_wal (\d+)/m.exec(body)?.[1] ?? 0);
    return head >= 6 ? body : null; // 3 KV writes = 6 entries (version + metadata), plus the mount
  });
  expect(text).toMatch(/^vault_core_handle_request\{quantile="0.5",method="POST"\} [\d.]+$/m);
  expect(text).toMatch(/^coffer_wal_unordered_rows \d+/m);
  expect(text).toMatch(/^vault_replication_fsm_last_remote_wal 0$/m);
  const json = await vault(p.addr, 'GET', 'sys/metrics', { token: rootToken });
  expect(Array.isArray(json.body)).toBe(true);
});

/**
 * Performance replication set up through the API alone: a primary, an activation token, a
 * secondary that bootstraps, streams WAL, forwards writes and reads its own writes.
 */
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { APPLY_PATH, activationToken, enablePrimary, enableSecondary, perfStatus, replicatePair, startCluster, waitForStream } from '../helpers/replication';
import { waitFor } from '../helpers/wait';

const dbs: TestDatabase[] = [];
afterAll(async () => {
  await stopAllCoffers();
  for (const d of dbs) await d.drop();
});

const cluster = (label: string) => startCluster(label, dbs);

test('enable primary, make a token, enable a secondary: data flows, writes forward, reads see own writes', async () => {
  const pri = await cluster('rprimary');
  const sec = await cluster('rsecondary');
  await mountKv2(pri.p.addr, pri.token);
  for (let i = 0; i < 50; i++) {
    expect((await vault(pri.p.addr, 'POST', `secret/data/before/${i}`, { token: pri.token, body: { data: { i } } })).status).toBe(200);
  }
  await enablePrimary(pri);
  const activation = await activationToken(pri, 'dc2');

  await enableSecondary(sec, activation);
  // Replay of the activation token is refused.
  const again = await vault(sec.p.addr, 'POST', 'sys/replication/performance/secondary/enable', { token: sec.token, body: { token: activation } });
  expect(again.status).toBe(400);

  await waitForStream(sec.p.addr, 'secondary to stream');
  const r0 = await waitFor('bootstrapped data', async () => {
    const r = await vault(sec.p.addr, 'GET', 'secret/data/before/49', { token: sec.token });
    return r.status === 200 ? r : null;
  });
  expect(r0.body.data.data).toEqual({ i: 49 });

  for (let i = 0; i < 50; i++) await vault(pri.p.addr, 'POST', `secret/data/after/${i}`, { token: pri.token, body: { data: { i } } });
  await waitFor('streamed data', async () => (await vault(sec.p.addr, 'GET', 'secret/data/after/49', { token: sec.token })).status === 200);

  // A write on the secondary is forwarded, and the secondary reads it right after.
  const w = await vault(sec.p.addr, 'POST', 'secret/data/from-secondary', { token: sec.token, body: { data: { x: 1 } } });
  expect(w.status).toBe(200);
  expect(w.body.warnings ?? []).toEqual([]);
  expect(Number(w.headers.get('x-vault-index'))).toBeGreaterThan(0);
  const rr = await vault(sec.p.addr, 'GET', 'secret/data/from-secondary', { token: sec.token });
  expect(rr.body.data.data).toEqual({ x: 1 });
  expect((await vault(pri.p.addr, 'GET', 'secret/data/from-secondary', { token: pri.token })).body.data.data).toEqual({ x: 1 });

  // The secondary's own WAL never got a client write: only the apply path writes there.
  const c = await sqlClient(sec.db.url);
  try {
    const pstatus = await vault(pri.p.addr, 'GET', 'sys/replication/performance/status');
    await waitFor('last_remote_wal to reach last_wal', async () => {
      const s = await perfStatus(sec.p.addr);
      const p = await perfStatus(pri.p.addr);
      return s.last_remote_wal === p.last_wal;
    });
    expect(pstatus.body.data.known_secondaries).toEqual(['dc2']);
    const diff = await c.query(`SELECT count(*)::int AS n FROM coffer_entries`);
    expect(diff.rows[0].n).toBeGreaterThan(100);
  } finally {
    await c.end();
  }

  // A local mount on the secondary is its own: written there, never forwarded or shipped.
  expect((await vault(sec.p.addr, 'POST', 'sys/mounts/mine', { token: sec.token, body: { type: 'kv', local: true, options: { version: '2' } } })).status).toBe(204);
  expect((await vault(sec.p.addr, 'POST', 'mine/data/x', { token: sec.token, body: { data: { local: true } } })).status).toBe(200);
  expect((await vault(sec.p.addr, 'GET', 'mine/data/x', { token: sec.token })).body.data.data).toEqual({ local: true });
  expect((await vault(pri.p.addr, 'GET', 'sys/mounts/mine', { token: pri.token })).status).toBe(404);

  // Tokens are local: the primary's root token means nothing on the secondary.
  expect((await vault(sec.p.addr, 'GET', 'secret/data/before/1', { token: pri.token })).status).toBe(403);

  // Metrics: batches sent (primary: this server ships in-process) and applied (secondary), with
  // their sizes and times, and the shipping queue's depth.
  const metric = async (addr: string, token: string) => (await (await fetch(`${addr}/v1/sys/metrics?format=prometheus`, { headers: { 'X-Vault-Token': token } })).text());
  const value = (text: string, name: string) => Number(new RegExp(`^${name} ([\\d.e+]+)$`, 'm').exec(text)?.[1] ?? NaN);
  // The primary records a batch when the secondary's answer reaches it, after the secondary
  // counted it: wait until both have counted the same batches.
  const [pm, sm] = await waitFor('both sides to count the same batches', async () => {
    const both = [await metric(pri.p.addr, pri.token), await metric(sec.p.addr, sec.token)];
    return value(both[0], 'coffer_replication_ship_batch_entries_count') === value(both[1], 'coffer_replication_apply_batch_entries_count') ? both : null;
  });
  // 50 streamed KV v2 writes and the forwarded one are 2 entries each; the bootstrap is not a batch.
  expect(value(pm, 'coffer_replication_ship_batch_entries_sum')).toBeGreaterThanOrEqual(102);
  expect(value(pm, 'coffer_replication_ship_batch_entries_count')).toBeGreaterThan(0);
  expect(value(pm, 'coffer_replication_ship_batch_bytes_sum')).toBeGreaterThan(0);
  expect(value(pm, 'vault_replication_rpc_client_stream_wals_count')).toBe(value(pm, 'coffer_replication_ship_batch_entries_count'));
  expect(pm).toMatch(/^coffer_queue_jobs\{queue="replication.ship",state="waiting"\} \d+$/m);
  expect(value(sm, 'coffer_replication_apply_batch_entries_sum')).toBe(value(pm, 'coffer_replication_ship_batch_entries_sum'));
  expect(value(sm, 'vault_replication_rpc_server_stream_wals_request_count')).toBe(value(pm, 'coffer_replication_ship_batch_entries_count'));

  // The apply endpoint, as the primary calls it (served without Express) and chunked (served by
  // Express's router): the same clear 4xx for a missing or wrong credential and for bad JSON.
  const applyAs = async (body: string, headers: Record<string, string>, chunked: boolean) => {
    const r = await fetch(`${sec.p.addr}${APPLY_PATH}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...headers },
      body: chunked ? new Blob([body]).stream() : body,
      ...(chunked ? { duplex: 'half' } : {}),
    } as RequestInit);
    return { status: r.status, body: (await r.json()) as { errors: string[] } };
  };
  for (const chunked of [false, true]) {
    expect(await applyAs('{"from_lsn":1,"to_lsn":1,"entries":[]}', {}, chunked)).toEqual({ status: 403, body: { errors: ['permission denied'] } });
    const wrong = await applyAs('{"from_lsn":1,"to_lsn":1,"entries":[]}', { 'x-coffer-replication': 'dc2:not-the-secret' }, chunked);
    expect(wrong.status).toBe(403);
    const bad = await applyAs('{"from_lsn":', {}, chunked);
    expect(bad.status).toBe(400);
    expect(bad.body.errors[0]).toMatch(/^failed to parse JSON input: /);
  }
});

test('ship_linger: after a batch at the threshold the shipper waits, and what came meanwhile goes as one batch', async () => {
  // A long linger (5 s) and a 2-entry threshold (one KV v2 write), so the test needs no timing luck.
  const db = await createTestDatabase('rlinger');
  dbs.push(db);
  const p = await startCoffer({ dbUrl: db.url, extraHcl: 'replication {\n  ship_linger = "5s"\n  ship_linger_min_entries = 2\n}\n' });
  const { rootToken } = await initAndUnseal([p]);
  const pri = { p, addr: p.addr, token: rootToken };
  const sec = await cluster('rlinger-sec');
  await replicatePair(pri, sec, 'dc-linger');
  const shipped = async () => {
    const text = await (await fetch(`${p.addr}/v1/sys/metrics?format=prometheus`, { headers: { 'X-Vault-Token': rootToken } })).text();
    const pick = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1] ?? 0);
    return { batches: pick('coffer_replication_ship_batch_entries_count'), entries: pick('coffer_replication_ship_batch_entries_sum') };
  };
  const reached = (index: number) => waitFor(`the secondary to apply ${index}`, async () => (await perfStatus(sec.addr)).last_remote_wal >= index, { intervalMs: 20 });
  const write = async (key: string) => {
    const w = await vault(p.addr, 'POST', `secret/data/${key}`, { token: rootToken, body: { data: { key } } });
    expect(w.status).toBe(200);
    return Number(w.headers.get('x-vault-index'));
  };
  // Count from when the setup's batches are all acknowledged: the primary records a batch's
  // acknowledgement at its next step, after any linger, and its metric before that.
  const head = (await perfStatus(p.addr)).last_wal;
  const c = await sqlClient(db.url);
  try {
    await waitFor('the setup acknowledged', async () => Number((await c.query(`SELECT min(acked_lsn) AS a FROM coffer_secondaries`)).rows[0].a) >= head);
  } finally {
    await c.end();
  }
  const before = await shipped();

  await reached(await write('first')); // a batch of 2 entries: the shipper now lingers 5 s
  let last = 0;
  for (let i = 0; i < 5; i++) last = await write(`during-linger-${i}`);
  await reached(last);
  // The primary counts a batch when the secondary's answer reaches it (after the apply).
  const after = await waitFor('the primary to count the batches', async () => {
    const now = await shipped();
    return now.entries - before.entries >= 12 ? now : null;
  });
  expect(after.entries - before.entries).toBe(12);
  expect(after.batches - before.batches).toBe(2); // the first write alone, then the five together
});

/**
 * Replication administration: a secondary refuses a newer primary and says why; a revoked
 * secondary is cut off; link-local primary addresses are refused.
 */
import type { TestDatabase } from '../helpers/pg';
import { mountKv2, startCoffer, stopAllCoffers, unseal, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';
import { activationToken as activation, perfStatus, startCluster, waitForStream } from '../helpers/replication';
import { waitFor } from '../helpers/wait';

const dbs: TestDatabase[] = [];
afterAll(async () => {
  await stopAllCoffers();
  for (const d of dbs) await d.drop();
});

const cluster = (label: string, env?: Record<string, string>) => startCluster(label, dbs, { env });

const status = (p: CofferProcess) => perfStatus(p.addr);

/** A primary (kv v2 at secret/, primary/enable) and a secondary enabled with activation `id`, streaming. */
async function streamingPair(priLabel: string, secLabel: string, id: string) {
  const pri = await cluster(priLabel);
  await mountKv2(pri.p.addr, pri.token);
  await vault(pri.p.addr, 'POST', 'sys/replication/performance/primary/enable', { token: pri.token, body: {} });
  const sec = await cluster(secLabel);
  expect((await vault(sec.p.addr, 'POST', 'sys/replication/performance/secondary/enable', { token: sec.token, body: { token: await activation(pri, id) } })).status).toBe(200);
  await waitForStream(sec.p.addr, 'streaming');
  return { pri, sec };
}

test('a secondary refuses a primary of a newer Coffer version, at enable and after an upgrade of the primary', async () => {
  const newer = await cluster('rnewer', { COFFER_ADVERTISE_VERSION: '99.0.0' });
  const sec = await cluster('rolder');
  await vault(newer.p.addr, 'POST', 'sys/replication/performance/primary/enable', { token: newer.token, body: {} });
  const en = await vault(sec.p.addr, 'POST', 'sys/replication/performance/secondary/enable', { token: sec.token, body: { token: await activation(newer, 'old') } });
  expect(en.status).toBe(400);
  expect(en.body.errors[0]).toMatch(/primary runs Coffer 99\.0\.0, newer than this cluster's/);
  expect((await status(sec.p)).mode).toBe('disabled');

  // Same version at enable; then the primary is "upgraded" under a running secondary.
  const { pri, sec: sec2 } = await streamingPair('rsame', 'rsec2', 'dc2');
  await pri.p.kill('SIGKILL');
  const upgraded = await startCoffer({ dbUrl: pri.db.url, port: Number(new URL(pri.p.addr).port), env: { COFFER_ADVERTISE_VERSION: '99.0.0' } });
  await unseal(upgraded, pri.keys);
  const s = await waitFor('the secondary to notice the newer primary', async () => {
    const st = await status(sec2.p);
    return /newer than this cluster's/.test(st.last_error) ? st : null;
  });
  expect(s.state).toBe('idle');
});

test('revoke-secondary cuts a secondary off: forwarded writes are refused, status drops it', async () => {
  const { pri, sec } = await streamingPair('rrevoke', 'rrevoked', 'gone');
  expect((await vault(sec.p.addr, 'POST', 'secret/data/before', { token: sec.token, body: { data: { a: 1 } } })).status).toBe(200);

  expect((await vault(pri.p.addr, 'POST', 'sys/replication/performance/primary/revoke-secondary', { token: pri.token, body: { id: 'gone' } })).status).toBe(204);
  const w = await vault(sec.p.addr, 'POST', 'secret/data/after', { token: sec.token, body: { data: { a: 2 } } });
  expect(w.status).toBe(403);
  expect((await status(pri.p)).known_secondaries).toEqual([]);
  // Reads keep working locally.
  expect((await vault(sec.p.addr, 'GET', 'secret/data/before', { token: sec.token })).status).toBe(200);
});

test('sys/rotate on a secondary rotates the primary\'s keyring; the secondary learns the new term and still reads everything', async () => {
  const { pri, sec } = await streamingPair('rrotp', 'rrots', 'rot');
  await vault(pri.p.addr, 'POST', 'secret/data/old', { token: pri.token, body: { data: { t: 1 } } });
  expect((await vault(sec.p.addr, 'PUT', 'sys/rotate', { token: sec.token })).status).toBe(204);
  expect((await vault(pri.p.addr, 'GET', 'sys/key-status', { token: pri.token })).body.data.term).toBe(2);
  await vault(pri.p.addr, 'POST', 'secret/data/new', { token: pri.token, body: { data: { t: 2 } } });
  const r = await waitFor('the term-2 value on the secondary', async () => {
    const x = await vault(sec.p.addr, 'GET', 'secret/data/new', { token: sec.token });
    return x.status === 200 ? x : null;
  });
  expect(r.body.data.data).toEqual({ t: 2 });
  expect((await vault(sec.p.addr, 'GET', 'secret/data/old', { token: sec.token })).body.data.data).toEqual({ t: 1 });
  expect((await vault(sec.p.addr, 'GET', 'sys/key-status', { token: sec.token })).body.data.term).toBe(2);
});

test('secondary/enable refuses a link-local primary address and a non-sudo caller', async () => {
  const sec = await cluster('rsafe');
  const en = await vault(sec.p.addr, 'POST', 'sys/replication/performance/secondary/enable', {
    token: sec.token,
    body: { token: 'cofferact.' + Buffer.from(JSON.stringify({ addr: 'http://127.0.0.1:1', token: 'x' })).toString('base64url'), primary_api_addr: 'http://169.254.169.254' },
  });
  expect(en.status).toBe(400);
  expect(en.body.errors[0]).toMatch(/link-local or metadata/);
  expect((await vault(sec.p.addr, 'POST', 'sys/replication/performance/secondary/enable', { body: { token: 'x' } })).status).toBe(403);
});

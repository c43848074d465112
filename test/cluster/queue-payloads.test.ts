/**
 * Invariant 8 for the queue: nothing in Redis — job payloads, BullMQ's bookkeeping, its event
 * streams — holds a secret, a token or a replication credential, while expiry and shipping
 * jobs are flowing.
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import { vault } from '../helpers/http';
import type { TestDatabase } from '../helpers/pg';
import { connectRedis, releaseClusters, replicatePair, scanKeys, startCluster } from '../helpers/replication';
import { waitFor } from '../helpers/wait';

const dbs: TestDatabase[] = [];
const run = randomBytes(4).toString('hex');
const prefixes = [`qp-pri-${run}`, `qp-sec-${run}`];
let redis: Redis | undefined;

afterAll(async () => {
  await releaseClusters(redis, prefixes, dbs);
});

async function dumpPrefix(r: Redis, prefix: string): Promise<string> {
  const parts: string[] = [];
  for (const key of await scanKeys(r, `${prefix}:*`)) {
    const type = await r.type(key);
    parts.push(key);
    if (type === 'string') parts.push(String(await r.get(key)));
    else if (type === 'hash') parts.push(JSON.stringify(await r.hgetall(key)));
    else if (type === 'list') parts.push(JSON.stringify(await r.lrange(key, 0, -1)));
    else if (type === 'set') parts.push(JSON.stringify(await r.smembers(key)));
    else if (type === 'zset') parts.push(JSON.stringify(await r.zrange(key, 0, -1)));
    else if (type === 'stream') parts.push(JSON.stringify(await r.xrange(key, '-', '+')));
  }
  return parts.join('\n');
}

test('Redis holds no secret, token or credential while expiry and shipping jobs run', async () => {
  redis = await connectRedis();
  const pri = await startCluster('qp_pri', dbs, { prefix: prefixes[0] });
  const sec = await startCluster('qp_sec', dbs, { prefix: prefixes[1] });
  await replicatePair(pri, sec, 'qp');

  const canary = `canary-${randomBytes(12).toString('hex')}`;
  const secrets: string[] = [canary, pri.token, sec.token];
  for (let i = 0; i < 20; i++) {
    expect((await vault(pri.addr, 'POST', `secret/data/c/${i}`, { token: pri.token, body: { data: { password: `${canary}-${i}` } } })).status).toBe(200);
  }
  // Forwarded writes ship back; tokens with TTLs schedule expiry jobs on both clusters.
  expect((await vault(sec.addr, 'POST', 'secret/data/fwd', { token: sec.token, body: { data: { password: canary } } })).status).toBe(200);
  for (const c of [pri, sec]) {
    const t = await vault(c.addr, 'POST', 'auth/token/create', { token: c.token, body: { ttl: '1h', policies: ['default'] } });
    secrets.push(t.body.auth.client_token);
  }
  const act = await vault(pri.addr, 'POST', 'sys/replication/performance/primary/secondary-token', { token: pri.token, body: { id: 'never-used' } });
  secrets.push(act.body.wrap_info.token);

  await waitFor('the forwarded write on the secondary', async () => (await vault(sec.addr, 'GET', 'secret/data/c/19', { token: sec.token })).status === 200);
  const dump = (await dumpPrefix(redis, prefixes[0])) + '\n' + (await dumpPrefix(redis, prefixes[1]));
  expect(dump).toMatch(/expiry\.check/); // the delayed expiry jobs are there to be inspected
  for (const s of secrets) {
    expect(dump.includes(s)).toBe(false);
    expect(dump.includes(Buffer.from(s).toString('base64'))).toBe(false);
  }
});

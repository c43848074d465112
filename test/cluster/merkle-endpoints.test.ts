/**
 * The merkle operator endpoints and the internal reconciliation endpoints, on a real primary
 * and secondary (the secondary reaches the primary through a counting proxy):
 *
 *   - sys/replication/reindex, merkle-check and recover need sudo: a token with every other
 *     capability on sys/replication/* gets 403, on either cluster;
 *   - reindex answers with warnings, the status shows it running and then done
 *     (reindex_in_progress, last_reindex_epoch), and the root is unchanged;
 *   - merkle-check reports a healthy index as such on both clusters; a flushed subpage image
 *     corrupted in SQL, then read back by recovery after kill -9, is reported by page and
 *     subpage; reindex repairs it and merkle-check is clean again;
 *   - recover on a secondary runs merkle-diff and merkle-sync (one round trip each) and
 *     returns to stream-wals, repairing a divergence;
 *   - malformed bodies to /internal/merkle-diff and /internal/merkle-sync, with no credential,
 *     a wrong one or a valid one, get a 4xx with {"errors": [...]}, never a 5xx.
 */
import { randomBytes } from 'node:crypto';
import type Redis from 'ioredis';
import { vault } from '../helpers/http';
import type { TestDatabase } from '../helpers/pg';
import {
  activationToken,
  connectRedis,
  diffRows,
  enablePrimary,
  liveRows,
  perfStatus,
  releaseClusters,
  waitAllConverged,
  waitForStream,
  withSql,
  type Cluster,
} from '../helpers/replication';
import { waitFor } from '../helpers/wait';
import { credentialHeader, CREDENTIAL_HEADER, decodeActivation } from '../../src/replication/wire';
import { CountingProxy, INTERNAL, metric, mountKv1, restart, secondaryRow, startClusterWith, StateRecorder, waitFlushedAt, writeAll } from './merkle-support';

const RUN = randomBytes(4).toString('hex');
const PRI_PREFIX = `coffer-test-mendp-pri-${RUN}`;
const SEC_PREFIX = `coffer-test-mendp-sec-${RUN}`;
const ID = 'mendp-dc2';
const KEYS = 500;
const MERKLE_HCL = `merkle {\n  checkpoint_interval = "200ms"\n  flush_interval = "50ms"\n  flush_fraction = 0.5\n}\n`;

const dbs: TestDatabase[] = [];
let redis: Redis | undefined;
let pri: Cluster;
let sec: Cluster;
const proxy = new CountingProxy('');

const root = async (addr: string): Promise<string> => (await perfStatus(addr)).merkle_root;
const post = (c: Cluster, path: string, token = c.token, body: unknown = {}) => vault(c.addr, 'POST', path, { token, body });

async function converged(what: string): Promise<string> {
  await withSql(pri.db.url, (priSql) => waitAllConverged(what, pri.addr, priSql, [sec.addr], 30_000));
  const [p, s] = await Promise.all([liveRows(pri.db.url), liveRows(sec.db.url)]);
  expect(diffRows(p, s)).toEqual({ onlyOnPrimary: 0, onlySecondary: 0, differing: 0, examples: [] });
  return waitFor(
    `${what}: equal merkle roots`,
    async () => {
      const [a, b] = [await root(pri.addr), await root(sec.addr)];
      return a && a === b ? a : null;
    },
    { timeoutMs: 20_000, intervalMs: 100 },
  );
}

/** Runs merkle-check on a cluster (waiting while its index is not ready) and returns the report. */
async function merkleCheck(c: Cluster) {
  const r = await waitFor(`merkle-check to answer on ${c.addr}`, async () => {
    const x = await post(c, 'sys/replication/merkle-check');
    return x.status === 503 ? null : x;
  });
  expect([r.status, r.body.errors]).toEqual([200, undefined]);
  return r.body.data.merkle_corruption_report;
}

/** Starts a reindex and waits for it to finish; returns what the status showed meanwhile. */
async function reindex(c: Cluster) {
  const before = await perfStatus(c.addr);
  const progress = new StateRecorder(async () => String((await perfStatus(c.addr)).reindex_in_progress), 2);
  const t0 = Date.now();
  const r = await post(c, 'sys/replication/reindex');
  expect(r.status).toBe(200);
  expect(r.body.warnings?.length ?? 0).toBeGreaterThan(0);
  const after = await waitFor(
    'the reindex to finish (last_reindex_epoch moves)',
    async () => {
      const s = await perfStatus(c.addr);
      return s.reindex_in_progress === false && s.last_reindex_epoch !== before.last_reindex_epoch ? s : null;
    },
    { timeoutMs: 20_000, intervalMs: 20 },
  );
  const seen = await progress.stop();
  return { before, after, seen, ms: Date.now() - t0, warnings: r.body.warnings as string[] };
}

beforeAll(async () => {
  redis = await connectRedis();
  await proxy.listen();
  [pri, sec] = await Promise.all([
    startClusterWith('mendp_pri', dbs, { prefix: PRI_PREFIX, extraHcl: MERKLE_HCL }),
    startClusterWith('mendp_sec', dbs, { prefix: SEC_PREFIX, extraHcl: MERKLE_HCL }),
  ]);
  proxy.target = pri.addr;
  await mountKv1(pri.addr, pri.token);
  await writeAll(pri.addr, pri.token, Array.from({ length: KEYS }, (_, i) => `kv/ep/${i}`), (p) => ({ p }));
  await enablePrimary(pri);
  const en = await post(sec, 'sys/replication/performance/secondary/enable', sec.token, { token: await activationToken(pri, ID), primary_api_addr: proxy.url });
  expect([en.status, en.body.errors]).toEqual([200, undefined]);
  await waitForStream(sec.addr, 'the secondary to stream WAL', { timeoutMs: 30_000 });
  await converged('initial replication');
}, 60_000);

afterAll(async () => {
  await releaseClusters(redis, [PRI_PREFIX, SEC_PREFIX], dbs);
  await proxy.close();
});

test('reindex, merkle-check and recover need sudo: 403 for a token with every other capability, on both clusters', async () => {
  const policy = 'path "sys/replication/*" {\n  capabilities = ["create", "read", "update", "delete", "list"]\n}\n';
  expect((await vault(pri.addr, 'PUT', 'sys/policies/acl/replops', { token: pri.token, body: { policy } })).status).toBe(204);
  await waitFor('the policy on the secondary', async () => (await vault(sec.addr, 'GET', 'sys/policies/acl/replops', { token: sec.token })).status === 200);
  for (const c of [pri, sec]) {
    const t = await post(c, 'auth/token/create', c.token, { policies: ['replops'] });
    expect(t.status).toBe(200);
    const token: string = t.body.auth.client_token;
    for (const path of ['sys/replication/reindex', 'sys/replication/merkle-check', 'sys/replication/recover']) {
      const r = await post(c, path, token);
      expect([path, r.status]).toEqual([path, 403]);
      expect(r.body.errors).toEqual(['permission denied']);
    }
    // No token at all: 403 too.
    expect((await vault(c.addr, 'POST', 'sys/replication/merkle-check', { body: {} })).status).toBe(403);
  }
});

test('reindex: warnings, reindex_in_progress while it runs, then last_reindex_epoch set and the same root', async () => {
  const root0 = await root(pri.addr);
  const t0 = Math.floor(Date.now() / 1000);
  const r = await reindex(pri);
  // eslint-disable-next-line no-console
  console.log(`[merkle-endpoints] reindex of ${KEYS}+ keys: ${r.ms} ms; reindex_in_progress seen: ${r.seen.join(' → ')}; warnings: ${JSON.stringify(r.warnings)}`);
  expect(r.before.last_reindex_epoch).toBe('0');
  expect(Number(r.after.last_reindex_epoch)).toBeGreaterThanOrEqual(t0);
  expect(r.seen).toContain('true');
  expect(r.seen[r.seen.length - 1]).toBe('false');
  expect(r.after.merkle_root).toBe(root0);
  // Writes after a reindex still reach the index and the secondary.
  await writeAll(pri.addr, pri.token, ['kv/ep/after-reindex'], (p) => ({ p }));
  const root1 = await converged('after the reindex');
  expect(root1).not.toBe(root0);
});

test('merkle-check reports a healthy index as such on both clusters', async () => {
  for (const c of [pri, sec]) {
    const rep = await merkleCheck(c);
    expect(rep.corrupted_root).toBe(false);
    expect(rep.corrupted_tree_map['1'].corrupted_subtree_root).toBe(false);
    expect(rep.corrupted_tree_map['1'].corrupted_index_tuples_map).toEqual({});
    expect(rep.corrupted_tree_map['1'].root_hash).toBe(await root(c.addr));
  }
});

test('a flushed subpage corrupted in SQL and recovered after kill -9 is reported by merkle-check; reindex repairs it', async () => {
  const rootBefore = await root(pri.addr);
  const head = await waitFlushedAt(pri.db.url, 'the primary to flush and checkpoint every change');
  // A subpage with at least two records loses its first one: the image a crash would recover.
  const victim = await withSql(pri.db.url, async (c) => {
    const { rows } = await c.query(`SELECT subpage FROM coffer_merkle_pages WHERE octet_length(records) >= 64 ORDER BY subpage LIMIT 1`);
    const sp: number = rows[0].subpage;
    const upd = await c.query(`UPDATE coffer_merkle_pages SET records = substring(records FROM 33) WHERE subpage = $1`, [sp]);
    expect(upd.rowCount).toBe(1);
    return sp;
  });
  await pri.p.kill('SIGKILL');
  await restart(pri);
  proxy.target = pri.addr;
  const rep = await merkleCheck(pri);
  // eslint-disable-next-line no-console
  console.log(`[merkle-endpoints] corrupted subpage ${victim} (page ${Math.floor(victim / 64)}, subpage ${victim % 64}) at head ${head}; merkle-check: ${JSON.stringify(rep)}`);
  expect(rep.corrupted_root).toBe(true);
  expect(rep.corrupted_tree_map['1'].corrupted_subtree_root).toBe(true);
  expect(rep.corrupted_tree_map['1'].corrupted_index_tuples_map).toEqual({ [String(Math.floor(victim / 64))]: { corrupted: true, subpages: [victim % 64] } });

  const r = await reindex(pri);
  expect(r.after.merkle_root).toBe(rootBefore);
  const clean = await merkleCheck(pri);
  expect(clean.corrupted_root).toBe(false);
  expect(clean.corrupted_tree_map['1'].corrupted_index_tuples_map).toEqual({});
  expect(await converged('after the repair')).toBe(rootBefore);
});

test('recover on a secondary runs merkle-diff and merkle-sync, repairs a divergence and returns to stream-wals', async () => {
  await converged('before recover');
  // The secondary loses a key (a DBA's accident, with its WAL row — numbered at the head, as
  // every WAL row must be before it commits — so its index sees it).
  const lost = await withSql(sec.db.url, async (c) => {
    const { rows } = await c.query(
      `WITH e AS (
         UPDATE coffer_entries SET version = version + 1, value = NULL, value_hash = NULL, updated_at = clock_timestamp()
          WHERE path = (SELECT path FROM coffer_entries WHERE path LIKE '%/data/ep/7' AND value IS NOT NULL)
         RETURNING path, version),
       hd AS (UPDATE coffer_wal_head SET last_lsn = last_lsn + 1 WHERE id = 1 AND EXISTS (SELECT 1 FROM e) RETURNING last_lsn)
       INSERT INTO coffer_wal (path, op, key_version, lsn, ordered_at) SELECT path, 'delete', version, (SELECT last_lsn FROM hd), clock_timestamp() FROM e RETURNING path`,
    );
    expect(rows).toHaveLength(1);
    return rows[0].path as string;
  });
  await waitFor("the secondary's index to see the loss", async () => (await root(sec.addr)) !== (await root(pri.addr)));
  expect((await vault(sec.addr, 'GET', 'kv/ep/7', { token: sec.token })).status).toBe(404);
  const movedBefore = (await metric(sec.addr, sec.token, 'coffer_merkle_sync_keys_total')) ?? 0;
  const since = Date.now();
  const states = new StateRecorder(async () => (await perfStatus(sec.addr)).state, 5);

  const r = await post(sec, 'sys/replication/recover');
  expect([r.status, r.body.errors]).toEqual([200, undefined]);
  expect(r.body.warnings?.length ?? 0).toBeGreaterThan(0);
  await waitFor('a merkle-sync after recover', () => proxy.internal('merkle-sync', since).length >= 1, { timeoutMs: 20_000 });
  await waitForStream(sec.addr, 'the secondary back in stream-wals');
  await waitFor('the primary to stream to it again', async () => (await secondaryRow(pri.db.url, ID)).status === 'streaming');
  const seen = await states.stop();
  const rootAfter = await converged('after recover');
  // eslint-disable-next-line no-console
  console.log(`[merkle-endpoints] recover: lost ${lost}; secondary states ${seen.join(' → ')}`);
  expect(seen).toContain('merkle-diff');
  expect(seen[seen.length - 1]).toBe('stream-wals');
  expect(proxy.internal('merkle-diff', since).map((c) => c.status)).toEqual([200]);
  expect(proxy.internal('merkle-sync', since).map((c) => c.status)).toEqual([200]);
  expect((await metric(sec.addr, sec.token, 'coffer_merkle_sync_keys_total')) ?? 0).toBe(movedBefore + 1);
  const back = await vault(sec.addr, 'GET', 'kv/ep/7', { token: sec.token });
  expect([back.status, back.body.data]).toEqual([200, { p: 'kv/ep/7' }]);
  expect(rootAfter).toBe(await root(pri.addr));
});

test('malformed bodies to the internal merkle endpoints get a 4xx with errors, never a 5xx', async () => {
  // A valid credential: a probe secondary's activation token, unwrapped as a secondary would.
  const act = decodeActivation(await activationToken(pri, 'probe'));
  const unwrapped = await vault(pri.addr, 'POST', 'sys/wrapping/unwrap', { token: act.token, body: {} });
  expect(unwrapped.status).toBe(200);
  const valid = credentialHeader('probe', unwrapped.body.data.secret);
  const credentials: [string, Record<string, string>][] = [
    ['none', {}],
    ['garbage', { [CREDENTIAL_HEADER]: 'not-a-credential' }],
    ['wrong secret', { [CREDENTIAL_HEADER]: credentialHeader('probe', 'x'.repeat(43)) }],
    ['valid', { [CREDENTIAL_HEADER]: valid }],
  ];
  const hash = Buffer.alloc(32, 7);
  const bodies: Record<'merkle-diff' | 'merkle-sync', (string | unknown)[]> = {
    'merkle-diff': [
      {},
      [],
      null,
      'pages',
      42,
      { pages: null },
      { pages: 42 },
      { pages: {} },
      { pages: ['a'] },
      { pages: '%%% not base64 %%%' },
      { pages: Buffer.concat(Array.from({ length: 63 }, () => hash)).toString('base64') },
      { pages: Buffer.concat(Array.from({ length: 65 }, () => hash)).toString('base64') },
      { pages: Buffer.alloc(64 * 32 - 1).toString('base64') },
    ],
    'merkle-sync': [
      {},
      [],
      null,
      'subpages',
      { subpages: null },
      { subpages: 'x' },
      { subpages: {} },
      { subpages: [] },
      { subpages: [null] },
      { subpages: [1] },
      { subpages: ['x'] },
      { subpages: [{}] },
      { subpages: [{ sp: -1, run: '' }] },
      { subpages: [{ sp: 4096, run: '' }] },
      { subpages: [{ sp: 1.5, run: '' }] },
      { subpages: [{ sp: 'one', run: '' }] },
      { subpages: [{ sp: 1, run: 'AAAA' }] },
      { subpages: [{ sp: 1, run: { a: 1 } }] },
      { subpages: Array.from({ length: 513 }, (_, sp) => ({ sp, run: '' })) },
    ],
  };
  const raw = ['{not json', '', '\u0000'];
  const wrong: string[] = [];
  let checked = 0;
  for (const [credName, headers] of credentials) {
    for (const [endpoint, list] of Object.entries(bodies)) {
      const cases: { what: string; init: RequestInit }[] = [
        ...list.map((b) => ({ what: JSON.stringify(b).slice(0, 60), init: { body: JSON.stringify(b), headers: { 'content-type': 'application/json', ...headers } } })),
        ...raw.map((b) => ({ what: `raw ${JSON.stringify(b)}`, init: { body: b, headers: { 'content-type': 'application/json', ...headers } } })),
        { what: 'GET', init: { method: 'GET', headers } },
      ];
      for (const c of cases) {
        const res = await fetch(`${pri.addr}${INTERNAL}/${endpoint}`, { method: 'POST', ...c.init });
        const text = await res.text();
        let body: any = null;
        try {
          body = JSON.parse(text);
        } catch {
          body = text;
        }
        checked++;
        const ok = res.status >= 400 && res.status < 500 && Array.isArray(body?.errors) && body.errors.length > 0 && body.errors.every((e: unknown) => typeof e === 'string');
        if (!ok) wrong.push(`${credName} ${endpoint} ${c.what}: ${res.status} ${text.slice(0, 160)}`);
        // Without a valid credential a parsable body is refused before it is looked at (403);
        // one that is not JSON never reaches the endpoint (400 from the body parser).
        const refused = c.what === 'GET' ? [403, 404, 405] : c.what.startsWith('raw') ? [400, 403] : [403];
        if (credName !== 'valid' && !refused.includes(res.status)) wrong.push(`${credName} ${endpoint} ${c.what}: ${res.status}, expected ${refused.join(' or ')}`);
      }
    }
  }
  // eslint-disable-next-line no-console
  console.log(`[merkle-endpoints] ${checked} malformed internal calls; wrong answers: ${wrong.length}`);
  expect(wrong).toEqual([]);
  // Once revoked, the probe's credential is refused.
  expect((await post(pri, 'sys/replication/performance/primary/revoke-secondary', pri.token, { id: 'probe' })).status).toBe(204);
  const revoked = await fetch(`${pri.addr}${INTERNAL}/merkle-diff`, { method: 'POST', body: '{}', headers: { 'content-type': 'application/json', [CREDENTIAL_HEADER]: valid } });
  expect(revoked.status).toBe(403);
  // The probe's calls changed nothing for the real secondary: it streams, and gets new writes.
  expect((await secondaryRow(pri.db.url, ID)).status).toBe('streaming');
  await writeAll(pri.addr, pri.token, ['kv/ep/after-probe'], (p) => ({ p }));
  await waitFor('the write on the secondary', async () => (await vault(sec.addr, 'GET', 'kv/ep/after-probe', { token: sec.token })).status === 200);
  await waitFor('identical rows', async () => diffRows(await liveRows(pri.db.url), await liveRows(sec.db.url)).examples.length === 0);
});

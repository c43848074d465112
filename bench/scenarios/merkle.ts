/**
 * `npm run bench -- merkle` (issue #5): the merkle index at N entries (BENCH_MERKLE_N, default
 * 10^6) on real processes and real Postgres.
 *
 * 1. Full reindex time of the primary at N (sys/replication/reindex; the server's own
 *    coffer_merkle_recovery_seconds{mode="rebuild"}), and the worst event-loop delay of the
 *    server meanwhile (prom-client's nodejs_eventloop_lag_max_seconds, reset at each scrape).
 * 2. A new secondary's first sync (merkle-diff + merkle-sync of everything): the full-copy
 *    reference in bytes and time, through a recording proxy in front of the primary.
 * 3. For d ∈ {1, 100, 10 000} keys changed on the primary while the secondary is down:
 *    round trips, non-payload bytes ÷ the d·16 B floor, total bytes ÷ the full copy, time.
 *    "Payload" is what any protocol must move: each changed entry's path and ciphertext
 *    (raw bytes); everything else on the wire (hashes, records, JSON, base64 expansion) is
 *    non-payload.
 * 4. Recovery after kill -9 under write load: the redo time the restarted primary reports ÷
 *    the full reindex time of (1) (target ≤ 0.1).
 * 5. KV v2 write throughput with the index on ÷ off (target ≥ 0.9), alternating runs.
 *
 * Entries for N are bulk-inserted with SQL (opaque 128-byte values, as ciphertext is to the
 * index); the d changes go through the same entry+WAL statement shape the server uses, so the
 * primary's sequencer and index see them as ordinary writes.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import { createTestDatabase, sqlClient, type TestDatabase } from '../../test/helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, unseal, type CofferProcess, type StartOptions } from '../../test/helpers/coffer-process';
import { vault } from '../../test/helpers/http';
import { waitFor } from '../../test/helpers/wait';
import { closedLoop } from '../load';
import type { Figure } from '../run';

const N = Number(process.env.BENCH_MERKLE_N ?? 1_000_000);
const DIFFS = (process.env.BENCH_MERKLE_D ?? '1,100,10000').split(',').map(Number);
const log = (s: string) => process.stdout.write(`    ${s}\n`);

interface Exchange {
  path: string;
  reqBytes: number;
  resBytes: number;
  payloadBytes: number;
}

/** A proxy in front of the primary that records every merkle exchange's sizes. */
async function recordingProxy(target: () => string): Promise<{ addr: string; take(): Exchange[]; close(): Promise<void> }> {
  let seen: Exchange[] = [];
  const server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const url = new URL(req.url!, target());
      const out = http.request(url, { method: req.method, headers: { ...req.headers, host: url.host } }, (up) => {
        const back: Buffer[] = [];
        up.on('data', (c) => back.push(c));
        up.on('end', () => {
          const resBody = Buffer.concat(back);
          if (req.url!.includes('/internal/merkle-')) {
            let payload = 0;
            if (req.url!.endsWith('/merkle-sync') && up.statusCode === 200) {
              for (const e of JSON.parse(resBody.toString()).entries as { path: string; value: string | null }[]) {
                payload += Buffer.byteLength(e.path) + (e.value ? Buffer.from(e.value, 'base64').length : 0);
              }
            }
            seen.push({ path: req.url!, reqBytes: body.length, resBytes: resBody.length, payloadBytes: payload });
          }
          res.writeHead(up.statusCode ?? 502, up.headers);
          res.end(resBody);
        });
      });
      out.on('error', (err) => {
        res.writeHead(502, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ errors: [`proxy: ${err.message}`] }));
      });
      out.end(body);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return {
    addr: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    take: () => {
      const out = seen;
      seen = [];
      return out;
    },
    close: () => new Promise((r) => server.close(() => r())),
  };
}

async function metric(p: CofferProcess, token: string, name: string, label?: string): Promise<number | null> {
  const r = await fetch(`${p.addr}/v1/sys/metrics?format=prometheus`, { headers: { 'x-vault-token': token } });
  const text = await r.text();
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const [k, v] = line.split(' ');
    if (k === name || (label && k === `${name}{${label}}`)) return Number(v);
  }
  return null;
}

const status = async (addr: string) => (await vault(addr, 'GET', 'sys/replication/performance/status')).body.data;

async function bulkLoad(url: string, n: number): Promise<void> {
  const c = await sqlClient(url);
  try {
    const step = 100_000;
    for (let from = 1; from <= n; from += step) {
      const to = Math.min(n, from + step - 1);
      await c.query(
        `INSERT INTO coffer_entries (path, version, value, value_hash)
         SELECT 'logical/bench-kv/data/k' || lpad(i::text, 8, '0'), 1, v, sha256(v)
           FROM generate_series($1::int, $2::int) i, LATERAL (SELECT sha512(int8send(i)) || sha512(int8send(-i)) AS v) x`,
        [from, to],
      );
    }
    await c.query('ANALYZE coffer_entries');
  } finally {
    await c.end();
  }
}

/** d changed keys on the primary, as ordinary writes would make them (entry + WAL row). */
async function change(url: string, d: number, round: number): Promise<void> {
  const c = await sqlClient(url);
  try {
    const keys = Array.from({ length: d }, (_, i) => `logical/bench-kv/data/k${String(1 + ((i * 7919 + round * 104729) % N)).padStart(8, '0')}`);
    await c.query(
      `WITH v AS (SELECT p, sha512(convert_to(p || $2, 'UTF8')) || sha512(convert_to($2 || p, 'UTF8')) AS val FROM unnest($1::text[]) p),
            e AS (UPDATE coffer_entries c SET version = c.version + 1, value = v.val, value_hash = sha256(v.val), updated_at = clock_timestamp()
                    FROM v WHERE c.path = v.p RETURNING c.path, c.version, c.value_hash, octet_length(c.value) AS size)
       INSERT INTO coffer_wal (path, op, key_version, value_hash, value_size) SELECT path, 'put', version, value_hash, size FROM e`,
      [[...new Set(keys)], `round-${round}`],
    );
  } finally {
    await c.end();
  }
}

export async function merkleScenario(seconds: number): Promise<Figure[]> {
  const dbs: TestDatabase[] = [];
  const figures: Figure[] = [];
  let proxy: Awaited<ReturnType<typeof recordingProxy>> | null = null;
  // BENCH_MERKLE_ONLY=writes: only the index on ÷ off write comparison (part 5).
  const onlyWrites = process.env.BENCH_MERKLE_ONLY === 'writes';
  try {
    if (!onlyWrites) await diffAndRecovery(seconds, dbs, figures, (p) => (proxy = p));
    figures.push(await writesOnOff(seconds, dbs));
    return figures;
  } finally {
    await (proxy as Awaited<ReturnType<typeof recordingProxy>> | null)?.close();
    await stopAllCoffers();
    for (const d of dbs) await d.drop().catch(() => undefined);
  }
}

async function diffAndRecovery(seconds: number, dbs: TestDatabase[], figures: Figure[], setProxy: (p: Awaited<ReturnType<typeof recordingProxy>>) => void): Promise<void> {
  let proxy: Awaited<ReturnType<typeof recordingProxy>>;
  {
    // ---------------------------------------------------------------- primary at N
    const pdb = await createTestDatabase('bench_merkle_p');
    dbs.push(pdb);
    const pOpts: StartOptions = { dbUrl: pdb.url, logLevel: 'warn', port: 0 };
    let primary = await startCoffer(pOpts);
    pOpts.port = Number(new URL(primary.addr).port);
    const { rootToken, keys } = await initAndUnseal([primary]);
    const pri = { addr: primary.addr, token: rootToken };
    let t = performance.now();
    await bulkLoad(pdb.url, N);
    log(`loaded ${N} entries in ${((performance.now() - t) / 1000).toFixed(1)} s`);

    // 1. full reindex (on a primary: a cluster with replication disabled reports no index fields)
    await vault(pri.addr, 'POST', 'sys/replication/performance/primary/enable', { token: pri.token, body: {} });
    await metric(primary, rootToken, 'nodejs_eventloop_lag_max_seconds'); // resets the window
    t = performance.now();
    await vault(pri.addr, 'POST', 'sys/replication/reindex', { token: pri.token, body: {} });
    await waitFor('reindex to finish', async () => {
      const s = await status(pri.addr);
      return s.mode === 'primary' && s.last_reindex_epoch !== '0' && s.reindex_in_progress === false;
    }, { timeoutMs: 600_000, intervalMs: 100 });
    const reindexWall = (performance.now() - t) / 1000;
    const reindexSeconds = (await metric(primary, rootToken, 'coffer_merkle_recovery_seconds', 'mode="rebuild"')) ?? reindexWall;
    const reindexLagMax = (await metric(primary, rootToken, 'nodejs_eventloop_lag_max_seconds')) ?? NaN;
    log(`reindex ${reindexSeconds.toFixed(2)} s (wall ${reindexWall.toFixed(2)} s), event-loop delay max ${(reindexLagMax * 1000).toFixed(1)} ms`);

    // ---------------------------------------------------------------- 2. a new secondary: full sync
    proxy = await recordingProxy(() => pri.addr);
    setProxy(proxy);
    const sdb = await createTestDatabase('bench_merkle_s');
    dbs.push(sdb);
    const sOpts: StartOptions = { dbUrl: sdb.url, logLevel: 'warn', port: 0 };
    let secondary = await startCoffer(sOpts);
    sOpts.port = Number(new URL(secondary.addr).port);
    const sInit = await initAndUnseal([secondary]);
    const tok = await vault(pri.addr, 'POST', 'sys/replication/performance/primary/secondary-token', { token: pri.token, body: { id: 'bench' } });
    t = performance.now();
    const en = await vault(secondary.addr, 'POST', 'sys/replication/performance/secondary/enable', {
      token: sInit.rootToken,
      body: { token: tok.body.wrap_info.token, primary_api_addr: proxy.addr },
    });
    if (en.status !== 200) throw new Error(`secondary enable: ${en.status} ${JSON.stringify(en.body)}`);
    await waitFor('first sync', async () => (await status(secondary.addr)).state === 'stream-wals', { timeoutMs: 1_800_000, intervalMs: 200 });
    const fullSeconds = (performance.now() - t) / 1000;
    const full = proxy.take();
    const fullBytes = full.reduce((a, x) => a + x.reqBytes + x.resBytes, 0);
    log(`first sync: ${full.length} round trips, ${(fullBytes / 1e6).toFixed(1)} MB, ${fullSeconds.toFixed(1)} s`);
    const syncLagMax = (await metric(secondary, sInit.rootToken, 'nodejs_eventloop_lag_max_seconds')) ?? NaN;
    log(`secondary event-loop delay max during the first sync: ${(syncLagMax * 1000).toFixed(1)} ms`);
    figures.push({ name: 'merkle_full_copy_seconds', value: fullSeconds, unit: 's', extra: { n: N, round_trips: full.length, bytes: fullBytes, secondary_event_loop_delay_max_ms: syncLagMax * 1000 } });

    // ---------------------------------------------------------------- 3. d differences
    for (const [round, d] of DIFFS.entries()) {
      await secondary.kill('SIGKILL');
      await change(pdb.url, d, round + 1);
      // The secondary restarts straight into merkle-diff (as sys/replication/recover would put it).
      const c = await sqlClient(sdb.url);
      await c.query(`UPDATE coffer_replication SET state = 'merkle-diff'`);
      await c.end();
      secondary = await startCoffer(sOpts);
      await unseal(secondary, sInit.keys);
      await waitFor(`reconcile d=${d}`, async () => {
        const s = await status(secondary.addr);
        return s.state === 'stream-wals';
      }, { timeoutMs: 600_000, intervalMs: 50 });
      const ex = proxy.take();
      const rts = ex.filter((x) => x.path.includes('/merkle-')).length;
      const bytes = ex.reduce((a, x) => a + x.reqBytes + x.resBytes, 0);
      const payload = ex.reduce((a, x) => a + x.payloadBytes, 0);
      const nonPayload = bytes - payload;
      figures.push({
        name: `merkle_diff_d${d}_non_payload_bytes`,
        value: nonPayload,
        unit: 'B',
        reference: { name: `d·16 B floor`, value: d * 16 },
        extra: { round_trips: rts, total_bytes: bytes, payload_bytes: payload, total_over_full_copy: bytes / fullBytes },
      });
      log(`d=${d}: ${rts} round trips, ${bytes} B total (${payload} payload), ${(bytes / fullBytes).toFixed(5)} of a full copy`);
    }
    // The secondary's index takes in what merkle-sync wrote once its own WAL is ordered.
    t = performance.now();
    const equalRoot = await waitFor('equal roots', async () => {
      const [pr, sr] = [await status(pri.addr), await status(secondary.addr)];
      return pr.merkle_root && pr.merkle_root === sr.merkle_root ? pr.merkle_root : null;
    }, { timeoutMs: 120_000, intervalMs: 100 }).catch(() => null);
    log(`roots after reconciliation: ${equalRoot ? `equal (${equalRoot}) ${((performance.now() - t) / 1000).toFixed(2)} s after stream-wals` : 'DIFFERENT after 120 s'}`);

    // ---------------------------------------------------------------- 4. recovery after kill -9
    await mountKv2(pri.addr, pri.token, 'secret').catch(() => undefined);
    const body = JSON.stringify({ data: { password: 'x'.repeat(100) } });
    const load = closedLoop(pri.addr, 8, Math.max(2, Math.min(seconds, 5)), (i) => ({
      method: 'POST',
      path: `/v1/secret/data/recovery/${i}`,
      headers: { 'x-vault-token': pri.token, 'content-type': 'application/json' },
      body,
    })).catch(() => null);
    await new Promise((r) => setTimeout(r, Math.max(1000, Math.min(seconds, 5) * 600)));
    await primary.kill('SIGKILL');
    await load;
    primary = await startCoffer(pOpts);
    await unseal(primary, keys);
    const redoSeconds = await waitFor('recovery report', () => metric(primary, rootToken, 'coffer_merkle_recovery_seconds', 'mode="redo"'), { timeoutMs: 600_000, intervalMs: 100 });
    const records = await metric(primary, rootToken, 'coffer_merkle_recovery_records');
    const recoveryLagMax = (await metric(primary, rootToken, 'nodejs_eventloop_lag_max_seconds')) ?? NaN;
    figures.push({
      name: 'merkle_recovery_seconds_after_kill9',
      value: redoSeconds,
      unit: 's',
      reference: { name: `full reindex at N=${N}`, value: reindexSeconds },
      target: undefined,
      extra: {
        wal_records_redone: records ?? NaN,
        target_ratio_at_most: 0.1,
        reindex_event_loop_delay_max_ms: reindexLagMax * 1000,
        boot_and_recovery_event_loop_delay_max_ms: recoveryLagMax * 1000,
      },
    });
    log(`recovery ${redoSeconds.toFixed(3)} s over ${records} WAL records ÷ reindex ${reindexSeconds.toFixed(2)} s = ${(redoSeconds / reindexSeconds).toFixed(3)} (target ≤ 0.1)`);
    await stopAllCoffers();
  }
}

// ---------------------------------------------------------------- 5. writes with the index on ÷ off
async function writesOnOff(seconds: number, dbs: TestDatabase[]): Promise<Figure> {
  const body = JSON.stringify({ data: { password: 'x'.repeat(100) } });
  {
    const rate = async (index: boolean): Promise<number> => {
      const db = await createTestDatabase(`bench_merkle_w${index ? 'on' : 'off'}`);
      dbs.push(db);
      const p = await startCoffer({ dbUrl: db.url, logLevel: 'warn', extraHcl: `merkle {\n  index = ${index}\n}\n` });
      const { rootToken: tk } = await initAndUnseal([p]);
      await mountKv2(p.addr, tk);
      const r = await closedLoop(p.addr, 8, seconds, (i) => ({
        method: 'POST',
        path: `/v1/secret/data/bench/${i % 10000}`,
        headers: { 'x-vault-token': tk, 'content-type': 'application/json' },
        body,
      }));
      await p.kill('SIGKILL');
      return r.perSecond;
    };
    const on: number[] = [];
    const off: number[] = [];
    // Alternating runs, so drift on a shared machine hits both sides alike.
    for (let i = 0; i < 3; i++) {
      on.push(await rate(true));
      off.push(await rate(false));
    }
    const mean = (a: number[]) => a.reduce((x, y) => x + y, 0) / a.length;
    return {
      name: 'kv2_writes_per_s_index_on',
      value: mean(on),
      unit: 'writes/s',
      reference: { name: 'same with merkle { index = false }', value: mean(off) },
      target: 0.9,
      extra: { runs_on: on.map((x) => x.toFixed(0)).join('/'), runs_off: off.map((x) => x.toFixed(0)).join('/') },
    };
  }
}

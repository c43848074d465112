/**
 * DESIGN.md invariant 8, secrets stay secret: canary values written every way a client can
 * (KV v2 data and custom metadata, KV v1, requests that fail) must not be readable by a DBA
 * in any table or view of the database — plaintext, hex or base64 — nor appear in the server's
 * debug-level output. The WAL shows what a DBA may see: paths, ops, versions, hashes, sizes, times.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createTestDatabase, sqlClient, type TestDatabase } from '../helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, type CofferProcess } from '../helpers/coffer-process';
import { vault } from '../helpers/http';

let db: TestDatabase;
afterAll(async () => {
  await stopAllCoffers();
  await db?.drop();
});

const canary = (what: string) => `canary-${what}-${randomBytes(12).toString('hex')}`;

/** Every spelling of `secret` a careless store or log could hold: plaintext, hex, base64 at each byte alignment. */
function spellings(secret: string): string[] {
  const bytes = Buffer.from(secret, 'utf8');
  const out = [secret, bytes.toString('hex'), JSON.stringify(secret).slice(1, -1)];
  for (let offset = 0; offset < 3; offset++) {
    for (const enc of ['base64', 'base64url'] as const) {
      const b64 = Buffer.concat([Buffer.alloc(offset), bytes]).toString(enc);
      // Drop the characters that depend on neighbouring bytes: the first group when the
      // secret does not start it, and the last group, which depends on what follows.
      out.push(b64.slice(offset === 0 ? 0 : 4, b64.length - 4));
    }
  }
  return out;
}

function findIn(haystack: string, secrets: Record<string, string>): string[] {
  const lower = haystack.toLowerCase();
  const found: string[] = [];
  for (const [name, secret] of Object.entries(secrets)) {
    for (const s of spellings(secret)) {
      // Hex is compared case-insensitively; the others exactly.
      if (haystack.includes(s) || (/^[0-9a-f]+$/.test(s) && lower.includes(s))) found.push(`${name} as ${JSON.stringify(s)}`);
    }
  }
  return found;
}

describe('secrets stay secret (invariant 8)', () => {
  let p: CofferProcess;
  let rootToken = '';
  let unsealKeys: string[] = [];
  const canaries: Record<string, string> = {};
  const plaintextHashes: string[] = [];

  beforeAll(async () => {
    db = await createTestDatabase('secrets');
    p = await startCoffer({ dbUrl: db.url, logLevel: 'debug' });
    ({ rootToken, keys: unsealKeys } = await initAndUnseal([p]));
    await mountKv2(p.addr, rootToken);
    const v1 = await vault(p.addr, 'POST', 'sys/mounts/kv', { token: rootToken, body: { type: 'kv', options: { version: '1' } } });
    expect(v1.status).toBe(204);

    const t = rootToken;
    const must = async (status: number, r: Promise<{ status: number; body: unknown }>) => {
      const res = await r;
      if (res.status !== status) throw new Error(`expected ${status}, got ${res.status}: ${JSON.stringify(res.body)}`);
    };
    const record = (data: unknown) => plaintextHashes.push(createHash('sha256').update(JSON.stringify(data)).digest('hex'));

    // KV v2 data, two versions, and a patch.
    canaries.v2data = canary('v2data');
    canaries.v2data2 = canary('v2data2');
    canaries.v2patch = canary('v2patch');
    record({ password: canaries.v2data });
    await must(200, vault(p.addr, 'PUT', 'secret/data/app/db', { token: t, body: { data: { password: canaries.v2data } } }));
    record({ password: canaries.v2data2, nested: { deeper: [canaries.v2data2] } });
    await must(200, vault(p.addr, 'PUT', 'secret/data/app/db', { token: t, body: { data: { password: canaries.v2data2, nested: { deeper: [canaries.v2data2] } } } }));
    await must(
      200,
      vault(p.addr, 'PATCH', 'secret/data/app/db', { token: t, body: { data: { api_key: canaries.v2patch } }, headers: { 'Content-Type': 'application/merge-patch+json' } }),
    );
    // KV v2 custom metadata.
    canaries.v2meta = canary('v2meta');
    await must(204, vault(p.addr, 'POST', 'secret/metadata/app/db', { token: t, body: { custom_metadata: { owner: canaries.v2meta } } }));
    // KV v1, including a key later deleted.
    canaries.v1 = canary('v1');
    canaries.v1deleted = canary('v1deleted');
    record({ password: canaries.v1 });
    await must(204, vault(p.addr, 'PUT', 'kv/app/db', { token: t, body: { password: canaries.v1 } }));
    await must(204, vault(p.addr, 'PUT', 'kv/app/gone', { token: t, body: { password: canaries.v1deleted } }));
    await must(204, vault(p.addr, 'DELETE', 'kv/app/gone', { token: t }));

    // Requests that fail. Malformed JSON carrying a canary:
    canaries.malformed = canary('malformed');
    await must(400, vault(p.addr, 'PUT', 'secret/data/app/bad', { token: t, rawBody: `{"data":{"password":"${canaries.malformed}"`, headers: { 'Content-Type': 'application/json' } }));
    await must(400, vault(p.addr, 'PUT', 'secret/data/app/bad', { token: t, rawBody: `{"data":{"password":${canaries.malformed}}}`, headers: { 'Content-Type': 'application/json' } }));
    // Well-formed requests refused for other reasons: check-and-set mismatch, no data,
    // PATCH without merge-patch, a bad token, an unknown mount, a deeply nested value.
    canaries.refused = canary('refused');
    await must(400, vault(p.addr, 'PUT', 'secret/data/app/db', { token: t, body: { options: { cas: 99 }, data: { password: canaries.refused } } }));
    await must(400, vault(p.addr, 'PUT', 'secret/data/app/other', { token: t, body: { data: canaries.refused } }));
    await must(415, vault(p.addr, 'PATCH', 'secret/data/app/db', { token: t, body: { data: { password: canaries.refused } } }));
    await must(403, vault(p.addr, 'PUT', 'secret/data/app/db', { token: 'hvs.wrong', body: { data: { password: canaries.refused } } }));
    await must(404, vault(p.addr, 'PUT', 'nope/app/db', { token: t, body: { password: canaries.refused } }));
    await must(400, vault(p.addr, 'GET', `secret/data/app/db?version=${canaries.refused}`, { token: t }));
    // A canary used as a token, in both token headers.
    canaries.asToken = canary('token');
    await must(403, vault(p.addr, 'GET', 'secret/data/app/db', { token: canaries.asToken }));
    await must(403, vault(p.addr, 'GET', 'secret/data/app/db', { headers: { Authorization: `Bearer ${canaries.asToken}` } }));

    // Reads, lists and metadata reads go through the same logging.
    const r = await vault(p.addr, 'GET', 'secret/data/app/db', { token: t });
    expect(r.body.data.data).toEqual({ password: canaries.v2data2, nested: { deeper: [canaries.v2data2] }, api_key: canaries.v2patch });
    expect((await vault(p.addr, 'GET', 'secret/metadata/app/db', { token: t })).body.data.custom_metadata).toEqual({ owner: canaries.v2meta });
    expect((await vault(p.addr, 'GET', 'kv/app/db', { token: t })).body.data).toEqual({ password: canaries.v1 });
    expect((await vault(p.addr, 'GET', 'secret/metadata/app/?list=true', { token: t })).body.data.keys).toEqual(['db']);

  });

  test('no table or view holds a canary, the root token or an unseal key, in any spelling', async () => {
    const secrets: Record<string, string> = { ...canaries, rootToken };
    unsealKeys.forEach((k, i) => (secrets[`unsealKey${i}`] = k));
    const c = await sqlClient(db.url);
    try {
      const { rows: relations } = await c.query<{ table_name: string; table_type: string }>(
        `SELECT table_name, table_type FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY table_name`,
      );
      const names = relations.map((r) => r.table_name);
      // The tables and views a DBA sees today; any new one is scanned too, because we iterate them all.
      for (const t of ['coffer_wal', 'coffer_entries', 'coffer_local_entries', 'coffer_tokens', 'coffer_seal', 'coffer_wal_status', 'coffer_wal_log', 'coffer_wal_per_minute']) {
        expect(names).toContain(t);
      }

      const leaks: string[] = [];
      const rowCounts: Record<string, number> = {};
      for (const { table_name: t } of relations) {
        const ident = `"${t.replace(/"/g, '""')}"`;
        // 1. As text: Postgres renders bytea as \x<hex>, jsonb and arrays as their text.
        const asText = await c.query<{ r: string }>(`SELECT x::text AS r FROM ${ident} x`);
        rowCounts[t] = asText.rows.length;
        for (const f of findIn(asText.rows.map((r) => r.r).join('\n'), secrets)) leaks.push(`${t} (row text): ${f}`);
        // 2. Column by column, with bytea as raw bytes, read as UTF-8 and Latin-1 too.
        const raw = await c.query(`SELECT * FROM ${ident}`);
        const parts: string[] = [];
        for (const row of raw.rows) {
          for (const v of Object.values(row)) {
            if (Buffer.isBuffer(v)) parts.push(v.toString('latin1'), v.toString('utf8'), v.toString('hex'));
            else if (v instanceof Date) parts.push(v.toISOString());
            else parts.push(typeof v === 'string' ? v : JSON.stringify(v));
          }
        }
        for (const f of findIn(parts.join('\n'), secrets)) leaks.push(`${t} (columns): ${f}`);
      }
      expect(leaks).toEqual([]);
      // The scan was not vacuous: the stored data is there, only unreadable.
      expect(rowCounts.coffer_entries).toBeGreaterThanOrEqual(5);
      expect(rowCounts.coffer_wal).toBeGreaterThanOrEqual(8);
      // coffer_wal_log shows the rows the active node has ordered so far (a projection of coffer_wal,
      // which is scanned in full above, so ordering need not have caught up for this check).
      expect(rowCounts.coffer_wal_log).toBeLessThanOrEqual(rowCounts.coffer_wal);
      expect(rowCounts.coffer_tokens).toBeGreaterThanOrEqual(1);
      expect(rowCounts.coffer_seal).toBe(1);
    } finally {
      await c.end();
    }
  });

  test('the server output at debug level holds no canary, no root token, no unseal key', async () => {
    const out = p.output();
    // Debug logging really was on, and requests were logged (so the check below means something).
    expect(out).toMatch(/"msg":"request"/);
    expect(out).toMatch(/"path":"\/v1\/secret\/data\/app\/db"/);
    const secrets: Record<string, string> = { ...canaries, rootToken };
    unsealKeys.forEach((k, i) => (secrets[`unsealKey${i}`] = k));
    expect(findIn(out, secrets)).toEqual([]);
  });

  test('WAL rows show path, op, key_version, a 32-byte hash of the ciphertext, a size and a time — not the value', async () => {
    const c = await sqlClient(db.url);
    try {
      // Insertion order (seq): nothing here needs the positions.
      const { rows } = await c.query<{ path: string; op: string; key_version: number; value_hash: Buffer | null; value_size: number; written_at: Date }>(
        'SELECT path, op, key_version, value_hash, value_size, written_at FROM coffer_wal ORDER BY seq',
      );
      expect(rows.length).toBeGreaterThanOrEqual(8);
      const puts = rows.filter((r) => r.op === 'put');
      const deletes = rows.filter((r) => r.op === 'delete');
      expect(puts.length).toBeGreaterThan(0);
      expect(deletes.length).toBeGreaterThanOrEqual(1); // kv/app/gone
      const started = Date.now() - 5 * 60_000;
      for (const r of rows) {
        expect(r.path).toMatch(/^(core|logical)\//);
        expect(Number(r.key_version)).toBeGreaterThanOrEqual(1);
        expect(r.written_at).toBeInstanceOf(Date);
        expect(r.written_at.getTime()).toBeGreaterThan(started);
      }
      for (const r of puts) {
        expect(r.value_hash).toBeInstanceOf(Buffer);
        expect(r.value_hash!.length).toBe(32);
        expect(r.value_size).toBeGreaterThan(0);
      }
      for (const r of deletes) {
        expect(r.value_hash).toBeNull();
        expect(r.value_size).toBe(0);
      }
      // The data paths are there, by mount uuid and (for v2) hashed key; values are not.
      expect(puts.some((r) => /^logical\/[0-9a-f-]{36}\/versions\/[0-9a-f]{64}\/\d+$/.test(r.path))).toBe(true);
      expect(puts.some((r) => /^logical\/[0-9a-f-]{36}\/data\/app\/db$/.test(r.path))).toBe(true);
      expect(deletes.some((r) => /^logical\/[0-9a-f-]{36}\/data\/app\/gone$/.test(r.path))).toBe(true);

      // The hash is of the stored ciphertext (so it is useless for guessing a value): the current
      // entry of each put path hashes to its latest WAL row (a key's rows are inserted under its
      // row lock, so seq order is its commit order), and no hash is of a plaintext we wrote.
      const { rows: entries } = await c.query<{ path: string; value: Buffer; version: number }>('SELECT path, value, version FROM coffer_entries WHERE value IS NOT NULL');
      for (const e of entries) {
        const last = rows.filter((r) => r.path === e.path).at(-1)!;
        expect(last.op).toBe('put');
        expect(Number(last.key_version)).toBe(Number(e.version));
        expect(last.value_hash!.equals(createHash('sha256').update(e.value).digest())).toBe(true);
        expect(last.value_size).toBe(e.value.length);
        expect(e.value[0]).toBe(0x01); // barrier envelope
      }
      const hashes = new Set(puts.map((r) => r.value_hash!.toString('hex')));
      for (const h of plaintextHashes) expect(hashes.has(h)).toBe(false);

      // The DBA views show the same, with the hash as hex text; read in one statement (one snapshot)
      // so writes committing meanwhile cannot skew the counts.
      const { rows: views } = await c.query<{ total: string; ordered: string; logged: string; bad_hash: string; per_minute: string; head_lsn: string; unordered_rows: string }>(`
        SELECT (SELECT count(*) FROM coffer_wal)                                      AS total,
               (SELECT count(*) FROM coffer_wal WHERE lsn IS NOT NULL)                AS ordered,
               (SELECT count(*) FROM coffer_wal_log)                                  AS logged,
               (SELECT count(*) FROM coffer_wal_log
                 WHERE op = 'put' AND value_sha256 !~ '^[0-9a-f]{64}$')               AS bad_hash,
               (SELECT coalesce(sum(rows), 0) FROM coffer_wal_per_minute)             AS per_minute,
               s.head_lsn, s.unordered_rows
          FROM coffer_wal_status s`);
      const v = views[0];
      expect(Number(v.total)).toBe(rows.length);
      expect(Number(v.logged)).toBe(Number(v.ordered));
      expect(Number(v.bad_hash)).toBe(0);
      expect(Number(v.per_minute)).toBe(rows.length);
      expect(Number(v.unordered_rows)).toBe(rows.length - Number(v.ordered));
      expect(Number(v.head_lsn)).toBeGreaterThanOrEqual(Number(v.ordered)); // equal until WAL garbage collection exists
    } finally {
      await c.end();
    }
  });
});

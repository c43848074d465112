/**
 * Durable KV v2 writes/s through HTTP ÷ raw "entry upsert + WAL row" transactions/s on the
 * same Postgres at the same concurrency (issue 2; target ratio ≥ 0.5).
 *
 * A KV v2 write is more than one upsert: Coffer reads the engine config and the key's
 * metadata under a per-key lock, writes the version entry and the metadata entry, each with
 * its WAL row, and encrypts both. The reference is the floor under all of that.
 */
import pg from 'pg';
import { createTestDatabase } from '../../test/helpers/pg';
import { benchCluster } from '../env';
import { closedLoop } from '../load';
import type { Figure } from '../run';

const PAYLOAD = 'x'.repeat(100);

async function rawUpsertPlusWal(concurrency: number, seconds: number): Promise<number> {
  const db = await createTestDatabase('bench_raw');
  const pool = new pg.Pool({ connectionString: db.url, max: concurrency });
  pool.on('error', () => undefined);
  try {
    await pool.query(`CREATE TABLE entries (path text COLLATE "C" PRIMARY KEY, version bigint NOT NULL, value bytea)`);
    await pool.query(`CREATE TABLE wal (seq bigserial PRIMARY KEY, xid xid8 NOT NULL DEFAULT pg_current_xact_id(), path text NOT NULL, op text NOT NULL, key_version bigint NOT NULL, value_size int NOT NULL)`);
    let n = 0;
    let done = 0;
    const end = Date.now() + seconds * 1000;
    const t0 = process.hrtime.bigint();
    await Promise.all(
      Array.from({ length: concurrency }, async () => {
        const c = await pool.connect();
        try {
          while (Date.now() < end) {
            const path = `k/${n++ % 10000}`;
            await c.query('BEGIN');
            const r = await c.query(
              `INSERT INTO entries AS cur (path, version, value) VALUES ($1, 1, $2)
               ON CONFLICT (path) DO UPDATE SET version = cur.version + 1, value = EXCLUDED.value RETURNING version`,
              [path, Buffer.from(PAYLOAD)],
            );
            await c.query(`INSERT INTO wal (path, op, key_version, value_size) VALUES ($1, 'put', $2, $3)`, [path, r.rows[0].version, PAYLOAD.length]);
            await c.query('COMMIT');
            done++;
          }
        } finally {
          c.release();
        }
      }),
    );
    return done / (Number(process.hrtime.bigint() - t0) / 1e9);
  } finally {
    await pool.end();
    await db.drop();
  }
}

export async function writeScenario(seconds: number): Promise<Figure[]> {
  const concurrency = 8;
  const reference = await rawUpsertPlusWal(concurrency, seconds);
  const cluster = await benchCluster('write');
  try {
    const body = JSON.stringify({ data: { password: PAYLOAD } });
    const r = await closedLoop(cluster.server.addr, concurrency, seconds, (i) => ({
      method: 'POST',
      path: `/v1/secret/data/bench/${i % 10000}`,
      headers: { 'x-vault-token': cluster.token, 'content-type': 'application/json' },
      body,
    }));
    return [
      {
        name: 'kv2_durable_writes_per_s',
        value: r.perSecond,
        unit: 'writes/s',
        reference: { name: 'raw upsert+WAL tx/s (pg, same concurrency)', value: reference },
        target: 0.5,
        extra: { concurrency, p50_ms: r.p50Ms, p99_ms: r.p99Ms, errors: r.errors, requests: r.requests },
      },
    ];
  } finally {
    await cluster.close();
  }
}

/** Fresh, throwaway Postgres databases on the machine's server (no Docker here). */
import { randomBytes } from 'node:crypto';
import pg from 'pg';

export const PG_ADMIN_URL = process.env.COFFER_TEST_PG ?? 'postgres://postgres@127.0.0.1:5432/postgres';

export interface TestDatabase {
  name: string;
  url: string;
  drop(): Promise<void>;
}

async function admin<T>(fn: (c: pg.Client) => Promise<T>, adminUrl = PG_ADMIN_URL): Promise<T> {
  const c = new pg.Client({ connectionString: adminUrl });
  await c.connect();
  try {
    return await fn(c);
  } finally {
    await c.end();
  }
}

/** A new database on the server of `adminUrl` (default: the machine's, PG_ADMIN_URL). */
export async function createTestDatabase(label = 't', adminUrl = PG_ADMIN_URL): Promise<TestDatabase> {
  const name = `coffer_${label.replace(/[^a-z0-9_]/gi, '_').toLowerCase()}_${randomBytes(4).toString('hex')}`;
  await admin((c) => c.query(`CREATE DATABASE ${name}`), adminUrl);
  const base = new URL(adminUrl);
  base.pathname = `/${name}`;
  return {
    name,
    url: base.toString(),
    drop: () => admin((c) => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`), adminUrl).then(() => undefined),
  };
}

/** A plain pg client on a test database, for assertions a DBA would make with SQL. */
export async function sqlClient(url: string): Promise<pg.Client> {
  const c = new pg.Client({ connectionString: url });
  await c.connect();
  return c;
}

/**
 * The database factory: the only place a Postgres connection is made. Real Postgres through a
 * `pg` pool, or — for `-dev` — PGlite (Postgres compiled to WASM) in this process, served on a
 * loopback socket so exactly the same `pg` + kysely code runs against it.
 */
import { Kysely, PostgresDialect } from 'kysely';
import pg from 'pg';
import type { DB } from './schema';

// int8 columns come back as strings by default; WAL positions and versions fit in 2^53 for
// centuries at any plausible write rate, and plain numbers keep the code readable.
pg.types.setTypeParser(pg.types.builtins.INT8, (v) => Number(v));

export interface Database {
  db: Kysely<DB>;
  /** A connection string a separate session (the active-lease lock) can use. */
  connectionString: string;
  /** True for the in-process dev database: one connection, no HA. */
  embedded: boolean;
  close(): Promise<void>;
}

export function openPostgres(connectionString: string, maxConnections = 10): Database {
  const pool = new pg.Pool({ connectionString, max: maxConnections, application_name: 'coffer' });
  // An idle client losing its connection (Postgres restart) must not crash the process.
  pool.on('error', () => undefined);
  // Nor a checked-out one: the pool removes its own 'error' listener while a client is lent
  // out, and a connection reset then emits 'error' on the client with no listener (an uncaught
  // exception: the process died when Postgres went away mid-transaction). The query in flight
  // still fails with the error; the pool discards the broken client on release.
  pool.on('connect', (client) => client.on('error', () => undefined));
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  return { db, connectionString, embedded: false, close: () => db.destroy() };
}

export async function openEmbedded(): Promise<Database> {
  const { PGlite } = await import('@electric-sql/pglite');
  const { PGLiteSocketServer } = await import('@electric-sql/pglite-socket');
  const lite = await PGlite.create();
  const server = new PGLiteSocketServer({ db: lite, port: 0, host: '127.0.0.1' });
  await server.start();
  const connectionString = `postgres://postgres@${server.getServerConn()}/postgres`;
  // PGlite serves one connection at a time, so the pool holds exactly one.
  const pool = new pg.Pool({ connectionString, max: 1 });
  pool.on('error', () => undefined);
  pool.on('connect', (client) => client.on('error', () => undefined));
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  return {
    db,
    connectionString,
    embedded: true,
    async close() {
      await db.destroy();
      await server.stop();
      await lite.close();
    },
  };
}

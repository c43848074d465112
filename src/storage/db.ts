/**
 * The database factory: the only place a Postgres connection is made. Real Postgres through a
 * `pg` pool, or — for `-dev` — PGlite (Postgres compiled to WASM) in this process, served on a
 * loopback socket so exactly the same `pg` + kysely code runs against it.
 */
import { CompiledQuery, Kysely, PostgresDialect } from 'kysely';
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

/** The pg pools behind each Kysely handle made here (see `preparedQuery`). */
const pools = new WeakMap<Kysely<DB>, { main: pg.Pool; hot: pg.Pool }>();

/** Connections of the request path's own pool (see `preparedQuery`), besides `max_parallel`. */
export const HOT_CONNECTIONS = 2;

/**
 * Runs one of the request path's fixed statements as a NAMED prepared statement: Postgres
 * parses it once per connection instead of on every execution. Only for a small, fixed set of
 * statement texts: each name stays prepared on every connection that ran it. Handles not made
 * here run the same text unnamed.
 *
 * `hot`: on a pool of its own (HOT_CONNECTIONS connections) whose sessions use generic plans
 * (`plan_cache_mode = force_generic_plan`): the request path's batched authentication
 * statement is then also planned once, where Postgres would otherwise re-plan it on every
 * execution (its batch size changes its custom plans' costs), which costs it more than running
 * it. Only statements whose plan does not depend on their parameters' values belong there.
 */
export async function preparedQuery<R>(db: Kysely<DB>, name: string, text: string, values: unknown[], o: { hot?: boolean } = {}): Promise<R[]> {
  const p = pools.get(db);
  if (!p) return (await db.executeQuery<R>(CompiledQuery.raw(text, values))).rows;
  return (await (o.hot ? p.hot : p.main).query<R & pg.QueryResultRow>({ name, text, values })).rows;
}

/**
 * Every session runs READ COMMITTED whatever the server's default: a writer that waited for the
 * WAL head re-reads it (EvalPlanQual) and numbers its rows after its predecessor's; under
 * REPEATABLE READ or SERIALIZABLE it would fail with a serialization error instead.
 */
const SESSION = '-c default_transaction_isolation=read\\ committed';

export function openPostgres(connectionString: string, maxConnections = 10): Database {
  const pool = new pg.Pool({ connectionString, max: maxConnections, application_name: 'coffer', options: SESSION });
  // An idle client losing its connection (Postgres restart) must not crash the process.
  pool.on('error', () => undefined);
  // Nor a checked-out one: the pool removes its own 'error' listener while a client is lent
  // out, and a connection reset then emits 'error' on the client with no listener (an uncaught
  // exception: the process died when Postgres went away mid-transaction). The query in flight
  // still fails with the error; the pool discards the broken client on release.
  pool.on('connect', (client) => client.on('error', () => undefined));
  const db = new Kysely<DB>({ dialect: new PostgresDialect({ pool }) });
  const hot = new pg.Pool({ connectionString, max: HOT_CONNECTIONS, application_name: 'coffer', options: `${SESSION} -c plan_cache_mode=force_generic_plan` });
  hot.on('error', () => undefined);
  hot.on('connect', (client) => client.on('error', () => undefined));
  pools.set(db, { main: pool, hot });
  return {
    db,
    connectionString,
    embedded: false,
    close: async () => {
      await db.destroy();
      await hot.end();
    },
  };
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

/** An in-process Core on a fresh real Postgres database, initialised and unsealed. */
import type { Clock } from '../../src/core/clock';
import { Core } from '../../src/core/core';
import { openPostgres, type Database } from '../../src/storage/db';
import { migrateToLatest } from '../../src/storage/migrate';
import { pgStore } from '../../src/storage/pg-store';
import { createTestDatabase, type TestDatabase } from './pg';

/** Time that moves only when a test moves it. */
export class ManualClock implements Clock {
  constructor(private t = Date.parse('2026-01-01T00:00:00.000Z')) {}
  now(): Date {
    return new Date(this.t);
  }
  advance(seconds: number): void {
    this.t += seconds * 1000;
  }
}

export interface InProcessCore {
  tdb: TestDatabase;
  database: Database;
  core: Core;
  root: string;
}

export async function inProcessCore(label: string, clock: Clock): Promise<InProcessCore> {
  const tdb = await createTestDatabase(label);
  const database = openPostgres(tdb.url, 4);
  await migrateToLatest(database.db);
  const core = new Core({ store: pgStore(database.db), clock, version: 'test' });
  const init = await core.initialize(1, 1);
  await core.unseal(init.keys[0]);
  return { tdb, database, core, root: init.rootToken };
}

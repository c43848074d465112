/**
 * Applies db/migrations in order. kysely's migrator takes a Postgres advisory lock for the
 * duration, so several processes booting at once apply each migration exactly once.
 */
import { Migrator, type Kysely, type Migration, type MigrationProvider } from 'kysely';
import * as m0001 from '../../db/migrations/0001_initial';
import * as m0002 from '../../db/migrations/0002_leases';
import * as m0003 from '../../db/migrations/0003_keyring_term';
import * as m0004 from '../../db/migrations/0004_replication';
import * as m0005 from '../../db/migrations/0005_merkle';
import * as m0006 from '../../db/migrations/0006_failover';
import * as m0007 from '../../db/migrations/0007_sequencer';
import * as m0008 from '../../db/migrations/0008_wal_positions_at_commit';
import * as m0009 from '../../db/migrations/0009_replication_notify';
import * as m0010 from '../../db/migrations/0010_role_guard';

const migrations: Record<string, Migration> = {
  '0001_initial': m0001,
  '0002_leases': m0002,
  '0003_keyring_term': m0003,
  '0004_replication': m0004,
  '0005_merkle': m0005,
  '0006_failover': m0006,
  '0007_sequencer': m0007,
  '0008_wal_positions_at_commit': m0008,
  '0009_replication_notify': m0009,
  '0010_role_guard': m0010,
};

const provider: MigrationProvider = { getMigrations: async () => migrations };

export async function migrateToLatest(db: Kysely<any>): Promise<string[]> {
  const migrator = new Migrator({
    db,
    provider,
    migrationTableName: 'coffer_migrations',
    migrationLockTableName: 'coffer_migrations_lock',
  });
  const { error, results } = await migrator.migrateToLatest();
  if (error) throw error instanceof Error ? error : new Error(String(error));
  return (results ?? []).filter((r) => r.status === 'Success').map((r) => r.migrationName);
}

/** Bench environment: a fresh database and a real Coffer server, as the tests make them. */
import { createTestDatabase, type TestDatabase } from '../test/helpers/pg';
import { initAndUnseal, mountKv2, startCoffer, stopAllCoffers, type CofferProcess } from '../test/helpers/coffer-process';

export interface BenchCluster {
  db: TestDatabase;
  server: CofferProcess;
  token: string;
  close(): Promise<void>;
}

export async function benchCluster(label: string): Promise<BenchCluster> {
  const db = await createTestDatabase(`bench_${label}`);
  const server = await startCoffer({ dbUrl: db.url, logLevel: 'warn' });
  const { rootToken } = await initAndUnseal([server]);
  await mountKv2(server.addr, rootToken);
  return {
    db,
    server,
    token: rootToken,
    async close() {
      await stopAllCoffers();
      await db.drop();
    },
  };
}

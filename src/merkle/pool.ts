/**
 * The Piscina pool that runs workers/merkle.ts. The worker is always the compiled file in
 * dist/ (Jest runs TypeScript sources, worker threads cannot), so `npm run build` must have run.
 */
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { Piscina } from 'piscina';
import type * as tasks from '../../workers/merkle';

function workerFile(): string {
  const candidates = [resolve(__dirname, '../../workers/merkle.js'), resolve(__dirname, '../../dist/workers/merkle.js')];
  const found = candidates.find((c) => existsSync(c));
  if (!found) throw new Error(`merkle worker not built (looked for ${candidates.join(', ')}); run npm run build`);
  return found;
}

type Tasks = typeof tasks;
export type TaskName = keyof Tasks;

/** A typed front to the pool: `run('hashRuns', {...})` checks the argument and result types. */
export class MerklePool {
  private readonly pool: Piscina;

  constructor(maxThreads = 2) {
    this.pool = new Piscina({ filename: workerFile(), minThreads: 1, maxThreads, idleTimeout: 60_000 });
  }

  run<K extends TaskName>(name: K, arg: Parameters<Tasks[K]>[0]): Promise<ReturnType<Tasks[K]>> {
    return this.pool.run(arg, { name });
  }

  async destroy(): Promise<void> {
    await this.pool.destroy();
  }
}

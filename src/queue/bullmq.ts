/**
 * BullMQ on Redis. One BullMQ queue per job name under the cluster's prefix, so clusters can
 * share a Redis. Workers run in servers (by default) and in `coffer worker` processes; BullMQ
 * hands each job to one worker at a time, and handlers are idempotent anyway.
 */
import { Queue, Worker, type ConnectionOptions } from 'bullmq';
import type { JobName, JobPayloads, JobQueue } from './jobs';

export function redisConnection(url: string): ConnectionOptions {
  const u = new URL(url);
  return {
    host: u.hostname,
    port: Number(u.port || 6379),
    username: u.username || undefined,
    password: u.password ? decodeURIComponent(u.password) : undefined,
    db: u.pathname.length > 1 ? Number(u.pathname.slice(1)) : 0,
    tls: u.protocol === 'rediss:' ? {} : undefined,
    // Workers block on Redis; BullMQ requires this to be null for them.
    maxRetriesPerRequest: null,
  };
}

export class BullQueue implements JobQueue {
  private readonly queues = new Map<string, Queue>();
  private readonly workers: Worker[] = [];

  constructor(
    private readonly connection: ConnectionOptions,
    private readonly prefix: string,
    private readonly onError: (err: Error) => void = () => undefined,
  ) {}

  private queue(name: string): Queue {
    let q = this.queues.get(name);
    if (!q) {
      // Producers fail fast while Redis is away instead of queueing commands in memory.
      q = new Queue(name, { connection: { ...this.connection, enableOfflineQueue: false } as ConnectionOptions, prefix: this.prefix });
      q.on('error', this.onError);
      this.queues.set(name, q);
    }
    return q;
  }

  async add<N extends JobName>(name: N, payload: JobPayloads[N], opts: { delayMs?: number; jobId?: string } = {}): Promise<void> {
    await this.queue(name).add(name, payload, {
      delay: opts.delayMs,
      jobId: opts.jobId,
      // A failed job is dropped, not kept: its id must be free for the next wake-up (every job
      // re-reads Postgres, and the periodic ticks and sweeps enqueue again).
      removeOnComplete: true,
      removeOnFail: true,
      attempts: 3,
      backoff: { type: 'exponential', delay: 500 },
    });
  }

  process<N extends JobName>(name: N, handler: (payload: JobPayloads[N]) => Promise<void>, concurrency = 4): void {
    const w = new Worker(name, async (job) => handler(job.data as JobPayloads[N]), { connection: this.connection, prefix: this.prefix, concurrency });
    w.on('error', this.onError);
    this.workers.push(w);
  }

  async depth(name: JobName): Promise<Record<'waiting' | 'active' | 'delayed', number>> {
    const c = await this.queue(name).getJobCounts('waiting', 'prioritized', 'active', 'delayed');
    return { waiting: (c.waiting ?? 0) + (c.prioritized ?? 0), active: c.active ?? 0, delayed: c.delayed ?? 0 };
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.close()));
    await Promise.all([...this.queues.values()].map((q) => q.close()));
  }
}

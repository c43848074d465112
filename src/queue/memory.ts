/**
 * The in-process queue used by `-dev` without Redis: timers in this process. Delays beyond
 * what a timer can hold are dropped — the Postgres sweep still catches them.
 */
import type { JobName, JobPayloads, JobQueue } from './jobs';

const MAX_TIMER_MS = 2 ** 31 - 1;

export class MemoryQueue implements JobQueue {
  private readonly handlers = new Map<string, (p: unknown) => Promise<void>>();
  /** Pending jobs by id: their timer, and their name (depth()). */
  private readonly timers = new Map<string, { t: NodeJS.Timeout; name: JobName }>();
  private closed = false;

  async add<N extends JobName>(name: N, payload: JobPayloads[N], opts: { delayMs?: number; jobId?: string } = {}): Promise<void> {
    const delay = Math.max(0, opts.delayMs ?? 0);
    if (this.closed || delay > MAX_TIMER_MS) return;
    const id = opts.jobId ?? `${name}:${Math.random()}`;
    if (this.timers.has(id)) return;
    const t = setTimeout(() => {
      this.timers.delete(id);
      void this.handlers.get(name)?.(payload).catch(() => undefined);
    }, delay);
    t.unref();
    this.timers.set(id, { t, name });
  }

  process<N extends JobName>(name: N, handler: (payload: JobPayloads[N]) => Promise<void>): void {
    this.handlers.set(name, handler as (p: unknown) => Promise<void>);
  }

  async depth(name: JobName): Promise<Record<'waiting' | 'active' | 'delayed', number>> {
    // A timer is a delayed or waiting job; a running handler is not tracked.
    let n = 0;
    for (const job of this.timers.values()) if (job.name === name) n++;
    return { waiting: 0, active: 0, delayed: n };
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const job of this.timers.values()) clearTimeout(job.t);
    this.timers.clear();
  }
}

/** Expiry checks as queue jobs: the scheduler core calls, and the handler workers run. */
import type { ExpiryScheduler, ExpiryTarget } from '../core/expiry';
import type { JobQueue } from './jobs';

/**
 * Scheduling never fails or stalls a request: if Redis is down or slow the job is skipped
 * (reported through `onError`) and the Postgres sweep revokes on time anyway.
 */
export function queueScheduler(queue: JobQueue, onError: (err: Error) => void, now: () => number = Date.now): ExpiryScheduler {
  return {
    async schedule(kind, id, at) {
      // One job per (target, due time): a renewal schedules a new check; the old one finds
      // nothing to do. BullMQ job ids may not contain ':'.
      const jobId = `${kind}-${id}-${at.getTime()}`.replace(/:/g, '_');
      const add = queue.add('expiry.check', { kind, id }, { delayMs: Math.max(0, at.getTime() - now()) + 50, jobId });
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error('queue did not accept the expiry job within 1 s')), 1000);
      });
      try {
        await Promise.race([add, timeout]);
      } catch (err) {
        add.catch(() => undefined);
        onError(err as Error);
      } finally {
        clearTimeout(timer);
      }
    },
  };
}

export function processExpiry(queue: JobQueue, target: ExpiryTarget): void {
  queue.process('expiry.check', async ({ kind, id }) => {
    if (kind === 'token') await target.expireToken(id);
    else await target.expireLease(id);
  });
}

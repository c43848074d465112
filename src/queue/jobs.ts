/**
 * Every queue job Coffer runs: name → payload type, in one place. Payloads are wake-ups that
 * name what to look at; the truth is re-read from Postgres, so every job is idempotent and
 * losing Redis loses nothing (DESIGN.md). No payload ever carries a token or a secret.
 */
export interface JobPayloads {
  /** Check whether a token (by accessor) or a lease has expired, and revoke it if so. */
  'expiry.check': { kind: 'token' | 'lease'; id: string };
  /** Ship the next WAL batch to a secondary (its cursor lives in Postgres). */
  'replication.ship': { secondaryId: string };
}

export type JobName = keyof JobPayloads;

export interface JobQueue {
  add<N extends JobName>(name: N, payload: JobPayloads[N], opts?: { delayMs?: number; jobId?: string }): Promise<void>;
  /** Starts processing jobs of `name` in this process. */
  process<N extends JobName>(name: N, handler: (payload: JobPayloads[N]) => Promise<void>, concurrency?: number): void;
  /** Jobs of `name` waiting, active and delayed right now (metrics). */
  depth(name: JobName): Promise<Record<'waiting' | 'active' | 'delayed', number>>;
  close(): Promise<void>;
}

/**
 * Expiry of tokens and leases. A delayed queue job per expiring token/lease is the fast path;
 * a periodic sweep of Postgres is the backstop, so losing Redis (or its jobs) delays a
 * revocation by at most one sweep interval and never loses it. Job payloads carry only
 * accessors and lease ids — never a token (invariant 8).
 */
export interface ExpiryScheduler {
  /** Ask for a check of `kind`/`id` at `at`. Idempotent: the check re-reads Postgres. */
  schedule(kind: 'token' | 'lease', id: string, at: Date): Promise<void>;
}

export const noScheduler: ExpiryScheduler = { schedule: async () => undefined };

/** The checks the expiry jobs and the sweep run; they re-read Postgres, so repeats are harmless. */
export interface ExpiryTarget {
  expireToken(accessor: string): Promise<boolean>;
  expireLease(leaseId: string): Promise<boolean>;
  sweep(): Promise<{ tokens: number; leases: number; wrapped: number }>;
}

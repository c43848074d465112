/**
 * Leases (Vault's expiration manager): every login and every leased secret gets one, owned
 * by a token; revoking the token revokes its leases. Leases are local data (invariant 5).
 */
import type { Clock } from './clock';
import { InvalidRequest } from './errors';
import type { ExpiryScheduler } from './expiry';
import type { LeaseRecord, LeaseRepo, TokenRecord } from './ports';
import { randomId } from './tokens';

/**
 * Go's RFC3339Nano, as Vault writes times in JSON: trailing zeros of the fraction dropped,
 * and no fraction at all when it is zero ("2024-05-01T10:00:00Z", "…:00.12Z").
 */
export function rfc3339Nano(d: Date): string {
  return d.toISOString().replace(/\.(\d*?)0*Z$/, (_m, frac: string) => (frac ? `.${frac}Z` : 'Z'));
}

/** Vault's system default and maximum TTL (32 days). */
export const SYSTEM_MAX_TTL_SECONDS = 32 * 24 * 3600;

export class LeaseManager {
  constructor(
    readonly repo: LeaseRepo,
    private readonly clock: Clock,
    private readonly scheduler: ExpiryScheduler,
  ) {}

  /** A lease for a login: `<path>/<random>`, expiring with the token. */
  async createForToken(token: TokenRecord, path: string): Promise<LeaseRecord> {
    const now = this.clock.now();
    const rec: LeaseRecord = {
      leaseId: `${path.replace(/\/$/, '')}/${randomId(24)}`,
      tokenHmac: token.hmac,
      kind: 'auth',
      path,
      issuedAt: now,
      lastRenewal: null,
      expiresAt: token.expiresAt,
      ttlSeconds: token.ttlSeconds,
      maxExpiresAt: token.explicitMaxTtlSeconds ? new Date(token.createdAt.getTime() + token.explicitMaxTtlSeconds * 1000) : null,
      renewable: token.renewable,
    };
    await this.repo.insert(rec);
    if (rec.expiresAt) await this.scheduler.schedule('lease', rec.leaseId, rec.expiresAt);
    return rec;
  }

  async lookup(leaseId: string): Promise<LeaseRecord> {
    const rec = await this.repo.get(leaseId);
    if (!rec || (rec.expiresAt && rec.expiresAt <= this.clock.now())) throw new InvalidRequest('invalid lease');
    return rec;
  }

  /** Extends a lease by `increment` seconds from now, capped by its maximum. */
  async renew(leaseId: string, incrementSeconds: number): Promise<LeaseRecord> {
    const rec = await this.lookup(leaseId);
    if (!rec.renewable) throw new InvalidRequest('lease is not renewable');
    const now = this.clock.now();
    const ttl = incrementSeconds > 0 ? incrementSeconds : rec.ttlSeconds;
    let expiresAt = new Date(now.getTime() + ttl * 1000);
    const cap = rec.maxExpiresAt ?? new Date(rec.issuedAt.getTime() + SYSTEM_MAX_TTL_SECONDS * 1000);
    if (expiresAt > cap) expiresAt = cap;
    await this.repo.update(leaseId, { expiresAt, lastRenewal: now, ttlSeconds: ttl });
    await this.scheduler.schedule('lease', leaseId, expiresAt);
    return { ...rec, expiresAt, lastRenewal: now, ttlSeconds: ttl };
  }

  async revoke(leaseId: string): Promise<void> {
    await this.repo.delete(leaseId);
  }

  async revokePrefix(prefix: string): Promise<number> {
    const ids = await this.repo.idsWithPrefix(prefix);
    for (const id of ids) await this.repo.delete(id);
    return ids.length;
  }

  async revokeForToken(hmac: Buffer): Promise<void> {
    for (const l of await this.repo.byToken(hmac)) await this.repo.delete(l.leaseId);
  }

  /**
   * Vault-style folder listing of lease ids under `prefix` ('' or ending in '/'): the ids
   * directly under it and its sub-prefixes with a trailing '/', sorted, without duplicates.
   */
  async listFolder(prefix: string): Promise<string[]> {
    const keys = new Set<string>();
    for (const id of await this.repo.idsWithPrefix(prefix)) {
      const rest = id.slice(prefix.length);
      const slash = rest.indexOf('/');
      keys.add(slash >= 0 ? rest.slice(0, slash + 1) : rest);
    }
    return [...keys].sort();
  }

  remainingSeconds(rec: LeaseRecord): number {
    if (!rec.expiresAt) return 0;
    return Math.max(0, Math.round((rec.expiresAt.getTime() - this.clock.now().getTime()) / 1000));
  }
}

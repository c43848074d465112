/**
 * The token store. Tokens are local to a cluster (invariant 5) and stored only as a salted
 * HMAC: a database dump yields no usable token. The HMAC key lives in barrier-encrypted local
 * storage, so it is only available while unsealed.
 */
import { createHmac, randomBytes } from 'node:crypto';
import type { Clock } from './clock';
import { Sealed } from './errors';
import { noScheduler, type ExpiryScheduler } from './expiry';
import type { TokenRecord, TokenRepo } from './ports';

export const TOKEN_HMAC_KEY_PATH = 'core/token-hmac-key';
/** Longer strings are not looked up: no token is that long. */
export const MAX_TOKEN_LENGTH = 512;

const ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';

export function randomId(length: number): string {
  const bytes = randomBytes(length * 2);
  let out = '';
  for (let i = 0; out.length < length && i < bytes.length; i++) {
    // Reject bytes that would bias the distribution (248 = 4 * 62).
    if (bytes[i] < 248) out += ALPHABET[bytes[i] % 62];
  }
  return out.length === length ? out : out + randomId(length - out.length);
}

export interface CreateTokenParams {
  policies: string[];
  parent?: TokenRecord | null;
  ttlSeconds?: number;
  explicitMaxTtlSeconds?: number;
  periodSeconds?: number;
  numUses?: number;
  orphan?: boolean;
  renewable?: boolean;
  displayName?: string;
  path?: string;
  meta?: Record<string, string>;
  type?: 'service' | 'batch';
  role?: string | null;
  /** A caller-chosen id (`-dev-root-token-id`, `id` on create with root). */
  id?: string;
}

export class TokenStore {
  private hmacKey: Buffer | null = null;

  /** Runs before a token row is deleted (revokes its leases). */
  onRevoke: (hmac: Buffer) => Promise<void> = async () => undefined;

  constructor(
    readonly repo: TokenRepo,
    private readonly clock: Clock,
    public scheduler: ExpiryScheduler = noScheduler,
  ) {}

  setKey(key: Buffer | null): void {
    this.hmacKey = key;
  }

  digest(token: string): Buffer {
    if (!this.hmacKey) throw new Sealed();
    return createHmac('sha256', this.hmacKey).update(token).digest();
  }

  async create(p: CreateTokenParams): Promise<{ token: string; record: TokenRecord }> {
    const type = p.type ?? 'service';
    const token = p.id ?? `${type === 'batch' ? 'hvb' : 'hvs'}.${randomId(24)}`;
    const now = this.clock.now();
    const ttl = p.periodSeconds || p.ttlSeconds || 0;
    const record: TokenRecord = {
      hmac: this.digest(token),
      accessor: randomId(24),
      parentHmac: p.orphan ? null : (p.parent?.hmac ?? null),
      policies: [...new Set(p.policies)].sort(),
      tokenType: type,
      displayName: p.displayName ?? 'token',
      path: p.path ?? 'auth/token/create',
      meta: p.meta ?? {},
      orphan: p.orphan ?? !p.parent,
      renewable: p.renewable ?? ttl > 0,
      numUses: p.numUses ?? 0,
      ttlSeconds: ttl,
      explicitMaxTtlSeconds: p.explicitMaxTtlSeconds ?? 0,
      periodSeconds: p.periodSeconds ?? 0,
      role: p.role ?? null,
      entityId: '',
      createdAt: now,
      expiresAt: ttl > 0 ? new Date(now.getTime() + ttl * 1000) : null,
    };
    await this.repo.insert(record);
    if (record.expiresAt) await this.scheduler.schedule('token', record.accessor, record.expiresAt);
    return { token, record };
  }

  /** Extends a token's life (renew), rescheduling its expiry check. */
  async setExpiry(rec: TokenRecord, expiresAt: Date | null, ttlSeconds: number): Promise<void> {
    await this.repo.update(rec.hmac, { expiresAt, ttlSeconds });
    if (expiresAt) await this.scheduler.schedule('token', rec.accessor, expiresAt);
  }

  /** Revokes `accessor`'s token if it has expired (the expiry job and the sweep call this). */
  async expireByAccessor(accessor: string): Promise<boolean> {
    const rec = await this.repo.byAccessor(accessor);
    if (!rec || !rec.expiresAt || rec.expiresAt.getTime() > this.clock.now().getTime()) return false;
    await this.revoke(rec.hmac);
    return true;
  }

  /** The backstop: revokes every expired token, oldest first, in bounded batches. */
  async sweep(limit = 500): Promise<number> {
    let n = 0;
    for (;;) {
      const batch = await this.repo.expired(this.clock.now(), limit);
      for (const h of batch) {
        // A child may already be gone with its parent.
        if (await this.repo.byHmac(h)) await this.revoke(h);
        n++;
      }
      if (batch.length < limit) return n;
    }
  }

  /** The live record of `token`, or null if unknown, expired or out of uses. */
  async lookup(token: string): Promise<TokenRecord | null> {
    if (!token || token.length > MAX_TOKEN_LENGTH) return null;
    return this.live(await this.repo.byHmac(this.digest(token)));
  }

  /** The live record of the token with this accessor (batch tokens have none, as in Vault). */
  async lookupByAccessor(accessor: string): Promise<TokenRecord | null> {
    if (!accessor) return null;
    const rec = this.live(await this.repo.byAccessor(accessor));
    return rec && rec.tokenType === 'service' ? rec : null;
  }

  /** Whether a token record read from storage is usable: not expired, not out of uses. */
  isLive(rec: TokenRecord): boolean {
    return this.live(rec) !== null;
  }

  private live(rec: TokenRecord | null): TokenRecord | null {
    if (!rec) return null;
    if (rec.expiresAt && rec.expiresAt.getTime() <= this.clock.now().getTime()) return null;
    // -1: the last use was spent and revocation is pending (see use()).
    if (rec.numUses < 0) return null;
    return rec;
  }

  /**
   * Spends one use of a use-limited token (Vault's UseToken); unlimited tokens (num_uses 0) are
   * untouched. 'last': this request took the final use; serve it, then revoke the token.
   * 'exhausted': nothing was left (a concurrent request took the last use); refuse the request.
   * The last use leaves num_uses at -1, never 0, because 0 means unlimited: a crash before the
   * revocation must leave a dead token, not an immortal one.
   */
  async use(rec: TokenRecord): Promise<'ok' | 'last' | 'exhausted'> {
    if (rec.numUses === 0) return 'ok';
    const left = await this.repo.use(rec.hmac);
    if (left === null) return 'exhausted';
    return left === 0 ? 'last' : 'ok';
  }

  /** Revokes a token and, unless it is an orphan-revoke, its descendants. */
  async revoke(hmac: Buffer, opts: { orphanChildren?: boolean } = {}): Promise<void> {
    if (opts.orphanChildren) {
      await this.repo.orphanChildren(hmac);
    } else {
      // Depth-first so a crash mid-way leaves no child whose parent is already gone unnoticed:
      // children go first, the parent last.
      for (const child of await this.repo.children(hmac)) await this.revoke(child.hmac);
    }
    await this.onRevoke(hmac);
    await this.repo.delete(hmac);
  }
}

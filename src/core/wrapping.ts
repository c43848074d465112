/**
 * Response wrapping: the real response is stored (barrier-encrypted, local, single use) under
 * a fresh wrapping token; the caller receives only `wrap_info`.
 *
 * Vault keeps the payload in the wrapping token's cubbyhole; Coffer keeps it in
 * `coffer_wrapped`, keyed by the token's HMAC (never the token: invariant 8) and sealed by the
 * barrier under `wrapped/<accessor>`, so a database dump yields neither the token nor the
 * payload.
 *
 * Life of a wrapping token:
 *   wrap   → token created (policy `response-wrapping`, 1 use, orphan, TTL = wrap TTL) and
 *            payload row inserted;
 *   lookup → reads the row's metadata; leaves both in place;
 *   unwrap → row taken (DELETE … RETURNING, so two racing unwraps cannot both succeed), token
 *            revoked, payload returned;
 *   rewrap → unwrap + wrap again with the original TTL and creation path;
 *   expiry → the token expires (the token sweep removes it) and the row is unusable at once
 *            because its own expires_at has passed; `sys/leases/tidy` deletes such rows.
 */
import type { Core } from './core';
import { InvalidRequest } from './errors';
import { rfc3339Nano } from './leases';
import type { AuthBlock, LogicalResponse } from './request';
import { parseDurationSeconds } from './units';

export interface WrapInfo {
  token: string;
  accessor: string;
  ttl: number;
  creation_time: string;
  creation_path: string;
  wrapped_accessor?: string;
}

/** What is sealed in `coffer_wrapped.payload`: the original response, minus transport fields. */
interface WrappedPayload {
  data: Record<string, unknown> | null;
  auth: AuthBlock | null;
  warnings: string[];
  leaseId: string;
  leaseDuration: number;
  renewable: boolean;
  status: number | null;
}

export const WRAPPING_POLICY_NAME = 'response-wrapping';
const INVALID = 'wrapping token is not valid or does not exist';

export class Wrapping {
  constructor(private readonly core: Core) {}

  /**
   * Stores `resp` and returns a response that carries only its wrap_info. `ttl` is seconds or a
   * Vault duration string (the raw X-Vault-Wrap-TTL header); zero or unparsable is a 400.
   */
  async wrap(resp: LogicalResponse, ttl: number | string, creationPath: string): Promise<LogicalResponse> {
    const payload: WrappedPayload = {
      data: resp.data ?? null,
      auth: resp.auth ?? null,
      warnings: resp.warnings ?? [],
      leaseId: resp.leaseId ?? '',
      leaseDuration: resp.leaseDuration ?? 0,
      renewable: resp.renewable ?? false,
      status: resp.status ?? null,
    };
    const wrapInfo = await this.store(payload, wrapTtlSeconds(ttl), creationPath);
    // Keep the write's WAL position: a wrapped write still needs its X-Vault-Index.
    return { wrapInfo, data: null, ...(resp.walLsn ? { walLsn: resp.walLsn } : {}) };
  }

  /** The original response; the wrapping token is spent whatever happens next. */
  async unwrap(token: string): Promise<LogicalResponse> {
    const { payload } = await this.take(token);
    return {
      data: payload.data,
      auth: payload.auth,
      warnings: payload.warnings,
      leaseId: payload.leaseId,
      leaseDuration: payload.leaseDuration,
      renewable: payload.renewable,
      // Vault answers an unwrap with 200 whatever the wrapped status was.
      status: 200,
    };
  }

  async lookup(token: string): Promise<{ creation_path: string; creation_time: string; creation_ttl: number }> {
    const hmac = this.digest(token);
    const rec = await this.core.opts.store.wrapped.get(hmac);
    if (!rec || !(await this.live(rec.expiresAt, hmac))) throw new InvalidRequest(INVALID);
    return { creation_path: rec.creationPath, creation_time: rfc3339Nano(rec.createdAt), creation_ttl: ttlOf(rec.createdAt, rec.expiresAt) };
  }

  /** A new wrapping token for the same payload, with the original TTL and creation path. */
  async rewrap(token: string): Promise<LogicalResponse> {
    const { payload, rec } = await this.take(token);
    const wrapInfo = await this.store(payload, ttlOf(rec.createdAt, rec.expiresAt), rec.creationPath);
    return { wrapInfo, data: null };
  }

  /**
   * Drops the payload of a revoked token. Meant for `tokens.onRevoke` so that revoking a
   * wrapping token (auth/token/revoke, the expiry sweep) destroys its payload at once, as
   * revoking a Vault token destroys its cubbyhole.
   */
  async discard(hmac: Buffer): Promise<void> {
    await this.core.opts.store.wrapped.take(hmac);
  }

  private async store(payload: WrappedPayload, ttlSeconds: number, creationPath: string): Promise<WrapInfo> {
    const { token, record } = await this.core.tokens.create({
      policies: [WRAPPING_POLICY_NAME],
      numUses: 1,
      ttlSeconds,
      orphan: true,
      displayName: 'response-wrapping',
      path: creationPath,
      renewable: false,
    });
    try {
      await this.core.opts.store.wrapped.insert({
        tokenHmac: record.hmac,
        accessor: record.accessor,
        creationPath,
        createdAt: record.createdAt,
        expiresAt: record.expiresAt!,
        payload: this.core.barrier.encrypt(`wrapped/${record.accessor}`, payload),
      });
    } catch (err) {
      // No token may outlive a payload that was never stored.
      await this.core.tokens.revoke(record.hmac).catch(() => undefined);
      throw err;
    }
    return {
      token,
      accessor: record.accessor,
      ttl: ttlSeconds,
      creation_time: rfc3339Nano(record.createdAt),
      creation_path: creationPath,
      ...(payload.auth?.accessor ? { wrapped_accessor: payload.auth.accessor } : {}),
    };
  }

  /** Removes the payload (single use) and revokes its token; throws unless both were live. */
  private async take(token: string) {
    const hmac = this.digest(token);
    const rec = await this.core.opts.store.wrapped.take(hmac);
    if (!rec) throw new InvalidRequest(INVALID);
    const live = await this.live(rec.expiresAt, hmac);
    // Revoke whether live or not: the payload is gone, the token is now useless.
    await this.core.tokens.revoke(hmac);
    if (!live) throw new InvalidRequest(INVALID);
    const payload = await this.core.barrier.decrypt<WrappedPayload>(`wrapped/${rec.accessor}`, rec.payload);
    if (!payload) throw new InvalidRequest(INVALID);
    return { payload, rec };
  }

  /** A payload is usable only before its expiry and while its token exists (not revoked). */
  private async live(expiresAt: Date, hmac: Buffer): Promise<boolean> {
    if (expiresAt.getTime() <= this.core.opts.clock.now().getTime()) return false;
    const tok = await this.core.tokens.repo.byHmac(hmac);
    return tok !== null && tok.policies.includes(WRAPPING_POLICY_NAME);
  }

  private digest(token: string): Buffer {
    if (!token || token.length > 512) throw new InvalidRequest(INVALID);
    return this.core.tokens.digest(token);
  }
}

function wrapTtlSeconds(ttl: number | string): number {
  let seconds: number;
  try {
    seconds = Math.floor(parseDurationSeconds(ttl));
  } catch (err) {
    throw new InvalidRequest(`error parsing wrap TTL: ${(err as Error).message}`);
  }
  if (seconds < 1) throw new InvalidRequest('wrap TTL must be at least 1s');
  return seconds;
}

function ttlOf(createdAt: Date, expiresAt: Date): number {
  return Math.round((expiresAt.getTime() - createdAt.getTime()) / 1000);
}

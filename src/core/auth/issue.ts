/**
 * Turning a successful login (or token create) into a token, its lease and the `auth` block
 * of the response — shared by every auth method.
 */
import type { Core } from '../core';
import { SYSTEM_MAX_TTL_SECONDS } from '../leases';
import type { MountEntry } from '../mounts';
import type { TokenRecord } from '../ports';
import type { AuthBlock } from '../request';
import type { CreateTokenParams } from '../tokens';

export interface IssueParams extends Omit<CreateTokenParams, 'ttlSeconds'> {
  /** Requested TTL in seconds (0: the mount's default). */
  ttlSeconds?: number;
  maxTtlSeconds?: number;
  /** Lease path, e.g. `auth/userpass/login/bob`. */
  leasePath: string;
  mount?: MountEntry;
  noDefaultPolicy?: boolean;
}

/** Effective TTL: requested, else mount default, else system default; capped by max TTLs. */
export function effectiveTtl(requested: number, mount: MountEntry | undefined, maxTtl = 0): number {
  const mountDefault = mount?.config.default_lease_ttl || SYSTEM_MAX_TTL_SECONDS;
  const mountMax = mount?.config.max_lease_ttl || SYSTEM_MAX_TTL_SECONDS;
  let ttl = requested > 0 ? requested : mountDefault;
  ttl = Math.min(ttl, mountMax);
  if (maxTtl > 0) ttl = Math.min(ttl, maxTtl);
  return ttl;
}

export async function issueAuth(core: Core, p: IssueParams): Promise<{ auth: AuthBlock; token: string; record: TokenRecord }> {
  const policies = [...new Set([...(p.noDefaultPolicy || p.policies.includes('root') ? [] : ['default']), ...p.policies])];
  const ttl = p.policies.includes('root') && !p.ttlSeconds ? 0 : effectiveTtl(p.ttlSeconds ?? 0, p.mount, p.maxTtlSeconds);
  const { token, record } = await core.tokens.create({ ...p, policies, ttlSeconds: ttl });
  if (record.tokenType === 'service') await core.leases.createForToken(record, p.leasePath);
  return { auth: authBlock(token, record), token, record };
}

export function authBlock(token: string, r: TokenRecord): AuthBlock {
  return {
    client_token: token,
    accessor: r.tokenType === 'batch' ? '' : r.accessor,
    policies: r.policies,
    token_policies: r.policies,
    metadata: Object.keys(r.meta).length ? r.meta : null,
    lease_duration: r.ttlSeconds,
    renewable: r.renewable,
    entity_id: r.entityId,
    token_type: r.tokenType,
    orphan: r.orphan,
    mfa_requirement: null,
    num_uses: r.numUses,
  };
}

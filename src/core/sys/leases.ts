/**
 * sys/ routes: leases (Vault's `sys/leases/*` and the legacy `sys/renew`, `sys/revoke`,
 * `sys/revoke-prefix`, `sys/revoke-force` that node-vault still calls).
 *
 * Coffer's leases are login leases (kind `auth`), each owned by a token; `secret` leases have
 * no backend to call on revoke, so revoking one only deletes it. Revoking an auth lease
 * revokes its token (and, through tokens.onRevoke, every other lease of that token); renewing
 * one extends its token too, within the lease's caps, so the two never disagree.
 */
import type { Core } from '../core';
import { InvalidRequest, NotFound, PermissionDenied } from '../errors';
import type { RouteContext, RouteDef } from '../framework';
import { rfc3339Nano } from '../leases';
import type { LeaseRecord } from '../ports';
import type { LogicalResponse } from '../request';
import { formatDuration } from '../units';

const TIDY_BATCH = 500;

const leaseIdField = { lease_id: { type: 'string', description: 'The lease identifier.' } } as const;
const syncField = { sync: { type: 'bool', default: true, description: 'Accepted for compatibility: Coffer always revokes synchronously.' } } as const;

export function leasesRoutes(core: Core): RouteDef[] {
  const renew: RouteDef['operations'] = { update: (ctx) => renewLease(core, leaseIdOf(ctx), Number(ctx.fields.increment ?? 0)) };
  const revoke: RouteDef['operations'] = { update: (ctx) => revokeLease(core, leaseIdOf(ctx)) };
  const revokePrefix = (force: boolean): RouteDef['operations'] => ({ update: (ctx) => revokeByPrefix(core, ctx.params.prefix, force) });
  const renewFields = { ...leaseIdField, increment: { type: 'duration', default: 0, description: 'The requested extension, in seconds or a duration string.' } } as const;
  const revokeFields = { ...leaseIdField, ...syncField } as const;

  const defs: RouteDef[] = [
    // The prefixed list goes first: `leases/lookup` would otherwise also match `leases/lookup/x/`.
    {
      pattern: 'leases/lookup/:prefix+',
      summary: 'Lists the lease ids (and sub-prefixes) under a prefix.',
      sudo: true,
      operations: { list: (ctx) => listLeases(core, ctx.params.prefix) },
    },
    {
      pattern: 'leases/lookup',
      summary: 'Retrieves lease metadata; LIST on `leases/lookup/` lists the top-level prefixes.',
      fields: leaseIdField,
      operations: {
        update: (ctx) => lookupLease(core, leaseIdOf(ctx)),
        list: async (ctx) => {
          // The HTTP layer's trailing '/' makes core demand sudo; a direct `leases/lookup` LIST
          // must not get around that.
          if (!(await core.aclFor(ctx.token!)).allows('sys/leases/lookup/', 'list', true)) throw new PermissionDenied();
          return listLeases(core, '');
        },
      },
    },
    { pattern: 'leases/tidy', summary: 'Cleans up expired leases, leases of revoked tokens and expired wrapped responses.', operations: { update: () => tidy(core) } },
  ];
  // Current paths under leases/ and Vault's legacy aliases directly under sys/.
  for (const base of ['leases/', '']) {
    defs.push(
      { pattern: `${base}renew`, summary: 'Renews a lease.', fields: renewFields, operations: renew },
      { pattern: `${base}renew/:url_lease_id+`, summary: 'Renews a lease.', fields: renewFields, operations: renew },
      { pattern: `${base}revoke`, summary: 'Revokes a lease.', fields: revokeFields, operations: revoke },
      { pattern: `${base}revoke/:url_lease_id+`, summary: 'Revokes a lease.', fields: revokeFields, operations: revoke },
      { pattern: `${base}revoke-prefix/:prefix+`, summary: 'Revokes every lease under a prefix.', sudo: true, fields: syncField, operations: revokePrefix(false) },
      { pattern: `${base}revoke-force/:prefix+`, summary: 'Revokes every lease under a prefix, deleting those whose revocation fails.', sudo: true, operations: revokePrefix(true) },
    );
  }
  return defs;
}

/** `lease_id` from the body, else from the URL (Vault's precedence). */
function leaseIdOf(ctx: RouteContext): string {
  const id = (ctx.fields.lease_id as string | undefined) || ctx.params.url_lease_id;
  if (!id) throw new InvalidRequest('lease_id must be specified');
  return id;
}

async function lookupLease(core: Core, leaseId: string): Promise<LogicalResponse> {
  const l = await core.leases.lookup(leaseId);
  return {
    data: {
      id: l.leaseId,
      issue_time: rfc3339Nano(l.issuedAt),
      expire_time: l.expiresAt ? rfc3339Nano(l.expiresAt) : null,
      last_renewal: l.lastRenewal ? rfc3339Nano(l.lastRenewal) : null,
      renewable: l.renewable,
      ttl: core.leases.remainingSeconds(l),
    },
  };
}

async function listLeases(core: Core, prefix: string): Promise<LogicalResponse> {
  const p = prefix && !prefix.endsWith('/') ? `${prefix}/` : prefix;
  const keys = await core.leases.listFolder(p);
  if (keys.length === 0) throw new NotFound();
  return { data: { keys } };
}

async function renewLease(core: Core, leaseId: string, increment: number): Promise<LogicalResponse> {
  const lease = await core.leases.lookup(leaseId);
  if (!lease.renewable) throw new InvalidRequest('lease is not renewable');
  const owner = lease.kind === 'auth' && lease.tokenHmac ? await core.tokens.repo.byHmac(lease.tokenHmac) : null;
  if (lease.kind === 'auth' && !owner) {
    // The token is gone but its lease was left behind: it is dead, say so and clean up.
    await core.leases.revoke(leaseId);
    throw new InvalidRequest('invalid lease');
  }
  if (!lease.expiresAt) {
    // A lease that never expires has nothing to extend (a TTL-less token's lease).
    return { leaseId, renewable: lease.renewable, leaseDuration: 0, status: 200 };
  }
  const renewed = await core.leases.renew(leaseId, increment);
  const granted = core.leases.remainingSeconds(renewed);
  if (owner) await core.tokens.setExpiry(owner, renewed.expiresAt, granted);
  const warnings = increment > 0 && granted < increment
    ? [`TTL of "${formatDuration(increment)}" exceeded the effective max_ttl of "${formatDuration(granted)}"; TTL value is capped accordingly`]
    : undefined;
  return { leaseId, renewable: renewed.renewable, leaseDuration: granted, warnings, status: 200 };
}

async function revokeLease(core: Core, leaseId: string): Promise<LogicalResponse> {
  // Not core.leases.lookup: an expired lease the sweep has not reached yet is still revocable.
  const lease = await core.leases.repo.get(leaseId);
  if (!lease) throw new InvalidRequest('invalid lease');
  await revokeOne(core, lease);
  return { status: 204 };
}

/** Revokes one lease; an auth lease takes its token (and the token's other leases) with it. */
async function revokeOne(core: Core, lease: LeaseRecord): Promise<void> {
  if (lease.kind === 'auth' && lease.tokenHmac) await core.tokens.revoke(lease.tokenHmac);
  // The token's revocation deleted the lease already, unless the token was gone before.
  await core.leases.revoke(lease.leaseId);
}

async function revokeByPrefix(core: Core, rawPrefix: string, force: boolean): Promise<LogicalResponse> {
  let prefix = rawPrefix;
  if (!prefix.endsWith('/')) {
    // Vault: a prefix without a trailing slash that names a lease revokes just that lease.
    const exact = await core.leases.repo.get(prefix);
    if (exact) {
      await revokeOne(core, exact);
      return { status: 204 };
    }
    prefix += '/';
  }
  for (const id of await core.leases.repo.idsWithPrefix(prefix)) {
    // Revoked already with an earlier lease's token.
    const lease = await core.leases.repo.get(id);
    if (!lease) continue;
    try {
      await revokeOne(core, lease);
    } catch (err) {
      if (!force) throw err;
      // revoke-force: the lease goes even when revoking what it stands for failed.
      await core.leases.revoke(id);
    }
  }
  return { status: 204 };
}

/**
 * Vault's lease tidy, run synchronously: revokes expired leases the expiry jobs missed,
 * deletes leases whose token no longer exists, and drops expired wrapped responses.
 */
async function tidy(core: Core): Promise<LogicalResponse> {
  const now = core.opts.clock.now();
  let expired = 0;
  for (;;) {
    const ids = await core.leases.repo.expired(now, TIDY_BATCH);
    for (const id of ids) {
      const lease = await core.leases.repo.get(id);
      if (lease) await revokeOne(core, lease);
      expired++;
    }
    if (ids.length < TIDY_BATCH) break;
  }
  let dangling = 0;
  for (;;) {
    const ids = await core.tokens.repo.leaseIdsOfMissingTokens(TIDY_BATCH);
    for (const id of ids) await core.leases.revoke(id);
    dangling += ids.length;
    if (ids.length < TIDY_BATCH) break;
  }
  const wrapped = await core.opts.store.wrapped.deleteExpired(now);
  const warnings: string[] = [];
  if (expired) warnings.push(`revoked ${expired} expired lease(s)`);
  if (dangling) warnings.push(`deleted ${dangling} lease(s) whose token no longer exists`);
  if (wrapped) warnings.push(`deleted ${wrapped} expired wrapped response(s)`);
  return warnings.length ? { warnings, status: 200 } : { status: 204 };
}

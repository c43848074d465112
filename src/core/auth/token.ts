/**
 * The token auth method (`auth/token/...`), after Vault's token store: create (plain, orphan or
 * against a role), lookup / renew / revoke by token, by the caller itself or by accessor, the
 * accessor list, roles and tidy. Tokens live in the cluster-local token table (TokenStore);
 * roles are replicated barrier data (token-roles.ts).
 *
 * Error statuses follow Vault's handlers: looking up an unknown token is 403 "bad token";
 * renewing one is 400 "token not found"; revoking one is a silent 204.
 */
import type { Core } from '../core';
import { InvalidRequest, NotFound, PermissionDenied } from '../errors';
import { RouteTable, type FieldSchema, type RouteContext, type RouteDef } from '../framework';
import { rfc3339Nano, SYSTEM_MAX_TTL_SECONDS } from '../leases';
import type { MountEntry } from '../mounts';
import type { TokenRecord } from '../ports';
import type { LogicalResponse } from '../request';
import { authBlock, issueAuth } from './issue';
import { matchesAnyGlob, ROLE_FIELDS, roleView, sanitizePolicies, TokenRoles, type TokenRole } from './token-roles';

/** Policies no token may be given by hand (Vault's nonAssignablePolicies). */
const NON_ASSIGNABLE_POLICIES = ['response-wrapping', 'control-group'];

const CREATE_FIELDS: Record<string, FieldSchema> = {
  id: { type: 'string', description: 'Value for the token (root or sudo only).' },
  role_name: { type: 'string', description: 'Name of the role.' },
  policies: { type: 'strings', description: 'List of policies for the token.' },
  meta: { type: 'map', description: 'Arbitrary key=value metadata to associate with the token.' },
  metadata: { type: 'map', description: 'Alias of meta.' },
  no_parent: { type: 'bool', description: 'Create the token with no parent (root or sudo only).' },
  no_default_policy: { type: 'bool', description: 'Do not include the default policy for this token.' },
  renewable: { type: 'bool', description: 'Allow the token to be renewed past its initial TTL (default true).' },
  lease: { type: 'duration', description: 'Deprecated: use ttl.' },
  ttl: { type: 'duration', description: 'Time to live for this token.' },
  type: { type: 'string', description: 'Token type: service or batch.' },
  explicit_max_ttl: { type: 'duration', description: 'Explicit max TTL of this token.' },
  display_name: { type: 'string', description: 'Name to associate with this token.' },
  num_uses: { type: 'int', description: 'Max number of uses for this token (0: unlimited).' },
  period: { type: 'duration', description: 'Renew period (root or sudo only, unless set by a role).' },
  entity_alias: { type: 'string', description: 'Name of the entity alias to associate with this token.' },
};
const TOKEN_FIELD: Record<string, FieldSchema> = { token: { type: 'string', description: 'The token.' } };
const ACCESSOR_FIELD: Record<string, FieldSchema> = { accessor: { type: 'string', description: 'Accessor of the token.' } };
const INCREMENT_FIELD: Record<string, FieldSchema> = { increment: { type: 'duration', description: 'The desired increment to the token expiration.' } };

export class TokenBackend {
  readonly table: RouteTable;
  readonly roles: TokenRoles;

  constructor(private readonly core: Core) {
    this.roles = new TokenRoles(core.barrier, () => this.mount());
    this.table = new RouteTable(this.routeDefs());
  }

  private routeDefs(): RouteDef[] {
    return [
      {
        pattern: 'create',
        summary: 'Create a new token (a child of the caller unless no_parent).',
        fields: CREATE_FIELDS,
        // A `role_name` in the body is ignored, as by Vault: applying it here would let a caller
        // with access to create use a role whose path (create/:role_name) its policies deny.
        operations: { update: (ctx) => this.create(ctx, false, null) },
      },
      {
        pattern: 'create-orphan',
        summary: 'Create a new token with no parent.',
        fields: CREATE_FIELDS,
        operations: { update: (ctx) => this.create(ctx, true, null) },
      },
      {
        pattern: 'create/:role_name',
        summary: 'Create a new token adhering to the given role.',
        fields: CREATE_FIELDS,
        operations: { update: (ctx) => this.create(ctx, false, ctx.params.role_name) },
      },
      {
        pattern: 'lookup',
        summary: 'Look up a token and its properties.',
        fields: TOKEN_FIELD,
        operations: { read: (ctx) => this.lookup(ctx), update: (ctx) => this.lookup(ctx) },
      },
      {
        pattern: 'lookup-self',
        summary: 'Look up the calling token and its properties.',
        fields: TOKEN_FIELD,
        operations: { read: (ctx) => this.lookupSelf(ctx), update: (ctx) => this.lookupSelf(ctx) },
      },
      {
        pattern: 'lookup-accessor',
        summary: 'Look up the token with the given accessor (the response omits the token).',
        fields: ACCESSOR_FIELD,
        operations: {
          update: async (ctx) => {
            const rec = await this.byAccessor(ctx.fields.accessor);
            return { data: await this.describe(rec, '') };
          },
        },
      },
      {
        pattern: 'renew',
        summary: 'Renew the given token.',
        fields: { ...TOKEN_FIELD, ...INCREMENT_FIELD },
        operations: {
          update: async (ctx) => {
            const token = String(ctx.fields.token ?? '');
            if (!token) throw new InvalidRequest('missing token ID');
            const rec = await this.core.tokens.lookup(token);
            if (!rec) throw new InvalidRequest('token not found');
            return this.renew(rec, token, ctx.fields.increment ?? 0);
          },
        },
      },
      {
        pattern: 'renew-self',
        summary: 'Renew the calling token.',
        fields: { ...TOKEN_FIELD, ...INCREMENT_FIELD },
        operations: { update: (ctx) => this.renew(ctx.token!, ctx.req.token ?? '', ctx.fields.increment ?? 0) },
      },
      {
        pattern: 'renew-accessor',
        summary: 'Renew the token with the given accessor (the response omits the token).',
        fields: { ...ACCESSOR_FIELD, ...INCREMENT_FIELD },
        operations: { update: async (ctx) => this.renew(await this.byAccessor(ctx.fields.accessor), '', ctx.fields.increment ?? 0) },
      },
      {
        pattern: 'revoke',
        summary: 'Revoke the given token and all of its children.',
        fields: TOKEN_FIELD,
        operations: {
          update: async (ctx) => {
            const token = String(ctx.fields.token ?? '');
            if (!token) throw new InvalidRequest('missing token ID');
            const rec = await this.core.tokens.lookup(token);
            // Vault answers 204 for an unknown token: revoking tells nothing about existence.
            if (rec) await this.revoke(rec);
            return { status: 204 };
          },
        },
      },
      {
        pattern: 'revoke-self',
        summary: 'Revoke the calling token and all of its children.',
        operations: {
          update: async (ctx) => {
            await this.revoke(ctx.token!);
            return { status: 204 };
          },
        },
      },
      {
        pattern: 'revoke-accessor',
        summary: 'Revoke the token with the given accessor and all of its children.',
        fields: ACCESSOR_FIELD,
        operations: {
          update: async (ctx) => {
            const accessor = String(ctx.fields.accessor ?? '');
            if (!accessor) throw new InvalidRequest('missing accessor');
            const rec = await this.core.tokens.repo.byAccessor(accessor);
            if (!rec || rec.tokenType === 'batch') return { status: 204, warnings: ['No token found with this accessor'] };
            if (!(await this.core.tokens.lookupByAccessor(accessor))) throw new InvalidRequest('token not found');
            await this.revoke(rec);
            return { status: 204 };
          },
        },
      },
      {
        pattern: 'revoke-orphan',
        summary: 'Revoke the given token and make its children orphans.',
        sudo: true,
        fields: TOKEN_FIELD,
        operations: {
          update: async (ctx) => {
            const token = String(ctx.fields.token ?? '');
            if (!token) throw new InvalidRequest('missing token ID');
            const rec = await this.core.tokens.lookup(token);
            if (!rec) throw new InvalidRequest('token to revoke not found');
            if (rec.tokenType === 'batch') throw new InvalidRequest('batch tokens cannot be revoked');
            await this.core.tokens.revoke(rec.hmac, { orphanChildren: true });
            return { status: 204 };
          },
        },
      },
      {
        pattern: 'accessors',
        summary: 'List token accessors (needs sudo: it can be used to revoke every token).',
        sudo: true,
        operations: { list: async () => ({ data: { keys: await this.core.tokens.repo.accessors() } }) },
      },
      {
        pattern: 'roles',
        summary: 'List the token roles.',
        operations: {
          list: async () => {
            const keys = await this.roles.list();
            if (keys.length === 0) throw new NotFound();
            return { data: { keys } };
          },
        },
      },
      {
        pattern: 'roles/:role_name',
        summary: 'Create, read, update or delete a token role.',
        fields: ROLE_FIELDS,
        exists: async (ctx) => (await this.roles.get(ctx.params.role_name)) !== null,
        operations: {
          read: async (ctx) => {
            const role = await this.roles.get(ctx.params.role_name);
            if (!role) throw new NotFound();
            return { data: roleView(role) };
          },
          update: async (ctx) => {
            const { warnings, walLsn } = await this.roles.write(ctx.params.role_name, ctx.fields);
            return { status: 204, warnings, walLsn };
          },
          delete: async (ctx) => ({ status: 204, walLsn: await this.roles.delete(ctx.params.role_name) }),
        },
      },
      {
        pattern: 'tidy',
        summary: 'Clean up tokens whose parent is gone, used-up tokens and leases whose token is gone.',
        operations: { update: () => this.tidy() },
      },
    ];
  }

  private mount(): MountEntry {
    const m = this.core.mounts.get('auth', 'token/');
    if (!m) throw new Error('the token auth mount is missing from the mount table');
    return m;
  }

  // ------------------------------------------------------------------ create

  /** Vault's handleCreateCommon. `orphanPath`: the request came to create-orphan. */
  private async create(ctx: RouteContext, orphanPath: boolean, roleName: string | null): Promise<LogicalResponse> {
    const parent = ctx.token!;
    const f = ctx.fields;
    let role: TokenRole | null = null;
    if (roleName) {
      role = await this.roles.get(roleName);
      if (!role) throw new InvalidRequest(`unknown role ${roleName}`);
    }
    if (parent.tokenType === 'batch') throw new InvalidRequest('batch tokens cannot create more tokens');
    // Otherwise a use-limited token could escape its limit through unlimited children.
    if (parent.numUses > 0) throw new InvalidRequest('restricted use token cannot generate child tokens');

    const requestPath = ctx.req.path.replace(/\/+$/, '');
    const acl = await this.core.aclFor(parent);
    const sudo = acl.root || acl.capabilities(requestPath).includes('sudo');
    const warnings: string[] = [];

    // Type, with the role's say first.
    let typeName = String(f.type ?? '');
    if (role?.token_type === 'service' || role?.token_type === 'batch') typeName = role.token_type;
    else if (role?.token_type === 'default-batch' && !typeName) typeName = 'batch';
    let renewable: boolean = f.renewable ?? true;
    let type: 'service' | 'batch' = 'service';
    if (typeName === 'batch') {
      const bad = (f.explicit_max_ttl ?? 0) > 0 ? 'explicit_max_ttl' : (f.num_uses ?? 0) !== 0 ? 'num_uses' : (f.period ?? 0) > 0 ? 'period' : '';
      if (bad) throw new InvalidRequest(`batch tokens cannot have "${bad}" set`);
      type = 'batch';
      renewable = false;
    } else if (typeName !== '' && typeName !== 'service') {
      throw new InvalidRequest("invalid 'token_type' value");
    }

    let numUses: number = f.num_uses ?? 0;
    if (numUses < 0) throw new InvalidRequest('number of uses cannot be negative');
    if (f.entity_alias) {
      if (!role) throw new InvalidRequest("'entity_alias' is only allowed in combination with token role");
      const alias = String(f.entity_alias).toLowerCase();
      if (!role.allowed_entity_aliases.includes(alias) && !matchesAnyGlob(role.allowed_entity_aliases, alias)) {
        throw new InvalidRequest("invalid 'entity_alias' value");
      }
      throw new InvalidRequest("'entity_alias' is not supported by this server: it has no identity store");
    }

    let path = requestPath;
    if (role) {
      if (!role.renewable) renewable = false;
      // 0 is unlimited, so any limit from the role is tighter than none.
      if (role.token_num_uses > 0 && (numUses === 0 || role.token_num_uses < numUses)) numUses = role.token_num_uses;
      if (role.path_suffix) path = `${path}/${role.path_suffix}`;
    }

    let displayName = 'token';
    if (f.display_name) displayName = `token-${f.display_name}`.replace(/[^a-zA-Z0-9-]/g, '-').replace(/-$/, '');

    let id: string | undefined;
    if (f.id) {
      if (!sudo) throw new InvalidRequest('root or sudo privileges required to specify token id');
      id = String(f.id);
      if (type === 'service') await this.checkCustomId(id);
      else id = undefined; // Vault ignores a custom id for batch tokens.
    }

    const policies = this.childPolicies(parent, f, role, sudo);
    // Batch tokens cannot be revoked, so there must never be a root batch token.
    if (type === 'batch' && policies.includes('root')) throw new InvalidRequest('batch tokens cannot be root tokens');

    let orphan = orphanPath;
    if (role) orphan = role.orphan;
    else if (f.no_parent) {
      if (!sudo) throw new InvalidRequest('root or sudo privileges required to create orphan token');
      orphan = true;
    }

    let explicitMax: number = f.explicit_max_ttl ?? 0;
    let period: number = f.period ?? 0;
    if (period > 0 && !sudo) throw new InvalidRequest('root or sudo privileges required to create periodic token');
    const requestedTtl: number = f.ttl || f.lease || 0;
    if (role && type !== 'batch') {
      if (role.token_explicit_max_ttl) {
        if (explicitMax) {
          explicitMax = Math.min(explicitMax, role.token_explicit_max_ttl);
          warnings.push(`Explicit max TTL specified both during creation call and in role; using the lesser value of ${explicitMax} seconds`);
        } else explicitMax = role.token_explicit_max_ttl;
      }
      if (role.token_period) {
        if (period) {
          period = Math.min(period, role.token_period);
          warnings.push(`Period specified both during creation call and in role; using the lesser value of ${period} seconds`);
        } else period = role.token_period;
      }
    }

    const { ttl, effectivePeriod } = this.creationTtl(requestedTtl, period, explicitMax, policies.includes('root'), warnings);
    if (ttl === 0) {
      if (parent.expiresAt) throw new InvalidRequest('expiring root tokens cannot create non-expiring root tokens');
      // A token that never expires cannot be renewed; do not advertise it as renewable.
      renewable = false;
    }

    const meta: Record<string, string> = {};
    for (const [k, v] of Object.entries({ ...(f.metadata ?? {}), ...(f.meta ?? {}) })) meta[k] = typeof v === 'string' ? v : JSON.stringify(v);

    const { auth } = await issueAuth(this.core, {
      policies,
      noDefaultPolicy: true, // policies are final here; issueAuth must not add default again
      parent,
      orphan,
      ttlSeconds: ttl,
      maxTtlSeconds: explicitMax,
      explicitMaxTtlSeconds: explicitMax,
      // tokens.create gives a periodic token one period of life: pass the period already capped
      // by the max TTLs, as Vault's CalculateTTL caps it.
      periodSeconds: effectivePeriod,
      numUses,
      renewable,
      displayName,
      path,
      leasePath: path,
      mount: this.mount(),
      meta,
      type,
      role: role?.name ?? null,
      id,
    });
    for (const p of policies) {
      if (p === 'root' || p === 'default') continue;
      if (!(await this.core.barrier.get(`core/policies/acl/${p}`))) warnings.push(`Policy "${p}" does not exist`);
    }
    return { auth, ...(warnings.length ? { warnings } : {}) };
  }

  /** The child's policies (Vault's subset rules, or the role's allowed/disallowed lists). */
  private childPolicies(parent: TokenRecord, f: Record<string, any>, role: TokenRole | null, sudo: boolean): string[] {
    const requested: string[] = f.policies ?? [];
    const noDefault = Boolean(f.no_default_policy);
    let policies: string[];
    let addDefault = false;
    const roleConstrains =
      role && (role.allowed_policies.length || role.disallowed_policies.length || role.allowed_policies_glob.length || role.disallowed_policies_glob.length);
    if (role && roleConstrains) {
      // A role with allowed/disallowed lists replaces the subset rule: that is what roles are for.
      const roleDefault = !noDefault && !role.token_no_default_policy && !role.disallowed_policies.includes('default') && !matchesAnyGlob(role.disallowed_policies_glob, 'default');
      policies = requested.length ? sanitizePolicies(requested, roleDefault) : [];
      if (role.allowed_policies.length || role.allowed_policies_glob.length) {
        const allowed = sanitizePolicies(role.allowed_policies, roleDefault);
        if (!policies.length) policies = allowed;
        else {
          for (const p of policies) {
            if (!allowed.includes(p) && !matchesAnyGlob(role.allowed_policies_glob, p)) {
              throw new InvalidRequest(`token policies (${JSON.stringify(policies)}) must be subset of the role's allowed policies (${JSON.stringify(allowed)}) or glob policies (${JSON.stringify(role.allowed_policies_glob)})`);
            }
          }
        }
      } else if (!policies.length) {
        policies = sanitizePolicies(parent.policies, roleDefault);
      }
      for (const p of policies) {
        if (role.disallowed_policies.includes(p) || matchesAnyGlob(role.disallowed_policies_glob, p)) {
          throw new InvalidRequest(`token policy "${p}" is disallowed by this role`);
        }
      }
    } else if (!requested.length) {
      // Inherit the parent's policies ("default" only if the parent has it).
      policies = sanitizePolicies(parent.policies, false);
    } else if (!sudo) {
      policies = sanitizePolicies(requested, false);
      const parentPolicies = sanitizePolicies(parent.policies, false);
      if (!policies.every((p) => parentPolicies.includes(p))) throw new InvalidRequest('child policies must be subset of parent');
      addDefault = !noDefault && parent.policies.includes('default');
    } else {
      policies = requested;
      addDefault = !noDefault;
    }
    policies = sanitizePolicies(policies, addDefault);
    if (noDefault) policies = policies.filter((p) => p !== 'default');
    for (const p of policies) {
      if (NON_ASSIGNABLE_POLICIES.includes(p)) throw new InvalidRequest(`cannot assign policy "${p}"`);
    }
    // sudo lets a caller skip the subset rule, never mint root: that needs a root parent.
    if (policies.includes('root') && !parent.policies.includes('root')) {
      throw new InvalidRequest('root tokens may not be created without parent token being root');
    }
    return policies;
  }

  private async checkCustomId(id: string): Promise<void> {
    if (id.startsWith('hvs.')) throw new InvalidRequest("custom token ID cannot have the 'hvs.' prefix");
    if (id.startsWith('s.')) throw new InvalidRequest("custom token ID cannot have the 's.' prefix");
    if (id.includes('.')) throw new InvalidRequest("custom token ID cannot have a '.' in the value");
    if (await this.core.tokens.repo.byHmac(this.core.tokens.digest(id))) throw new InvalidRequest('cannot create a token with a duplicate ID');
  }

  /** The effective maximum TTL: the mount's (or system) maximum, tightened by an explicit max. */
  private maxTtl(explicitMax: number): number {
    const mountMax = this.mount().config.max_lease_ttl || SYSTEM_MAX_TTL_SECONDS;
    return explicitMax > 0 ? Math.min(mountMax, explicitMax) : mountMax;
  }

  /** Vault's CalculateTTL at creation; 0 means never expires (root tokens only). */
  private creationTtl(requested: number, period: number, explicitMax: number, root: boolean, warnings: string[]): { ttl: number; effectivePeriod: number } {
    const max = this.maxTtl(explicitMax);
    if (period > 0) {
      if (period > max) warnings.push(`period of ${period}s exceeded the effective max_ttl of ${max}s; period value is capped accordingly`);
      const p = Math.min(period, max);
      return { ttl: p, effectivePeriod: p };
    }
    if (requested > 0 || !root) {
      const ttl = requested > 0 ? requested : this.mount().config.default_lease_ttl || SYSTEM_MAX_TTL_SECONDS;
      if (ttl > max) warnings.push(`TTL of ${ttl}s exceeded the effective max_ttl of ${max}s; TTL value is capped accordingly`);
      return { ttl: Math.min(ttl, max), effectivePeriod: 0 };
    }
    // Root tokens are still bound by an explicit max TTL.
    return { ttl: explicitMax, effectivePeriod: 0 };
  }

  // ------------------------------------------------------------------ lookup

  private async lookup(ctx: RouteContext): Promise<LogicalResponse> {
    const token = String(ctx.fields.token || ctx.req.token || '');
    if (!token) throw new InvalidRequest('missing token ID');
    const rec = await this.core.tokens.lookup(token);
    if (!rec) throw new PermissionDenied('bad token');
    return { data: await this.describe(rec, token) };
  }

  private async lookupSelf(ctx: RouteContext): Promise<LogicalResponse> {
    return { data: await this.describe(ctx.token!, ctx.req.token ?? '') };
  }

  private async byAccessor(accessor: unknown): Promise<TokenRecord> {
    if (!accessor) throw new InvalidRequest('missing accessor');
    const rec = await this.core.tokens.lookupByAccessor(String(accessor));
    if (!rec) throw new InvalidRequest('invalid accessor');
    return rec;
  }

  /** The `data` of a lookup, with Vault's field names and units. `id` is '' for accessor lookups. */
  private async describe(r: TokenRecord, id: string): Promise<Record<string, unknown>> {
    const now = this.core.opts.clock.now().getTime();
    const lease = r.tokenType === 'service' ? (await this.core.leases.repo.byToken(r.hmac)).find((l) => l.kind === 'auth') : undefined;
    return {
      accessor: r.tokenType === 'batch' ? '' : r.accessor,
      creation_time: Math.floor(r.createdAt.getTime() / 1000),
      creation_ttl: r.ttlSeconds,
      display_name: r.displayName,
      entity_id: r.entityId,
      expire_time: r.expiresAt ? rfc3339Nano(r.expiresAt) : null,
      explicit_max_ttl: r.explicitMaxTtlSeconds,
      id,
      issue_time: rfc3339Nano(r.createdAt),
      ...(lease?.lastRenewal ? { last_renewal: rfc3339Nano(lease.lastRenewal), last_renewal_time: Math.floor(lease.lastRenewal.getTime() / 1000) } : {}),
      meta: Object.keys(r.meta).length ? r.meta : null,
      num_uses: r.numUses,
      orphan: r.orphan,
      path: r.path,
      ...(r.periodSeconds ? { period: r.periodSeconds } : {}),
      policies: r.policies,
      renewable: r.renewable,
      ...(r.role ? { role: r.role } : {}),
      ttl: r.expiresAt ? Math.max(0, Math.floor((r.expiresAt.getTime() - now) / 1000)) : 0,
      type: r.tokenType,
    };
  }

  // ------------------------------------------------------------------ renew

  /**
   * Vault's RenewToken + CalculateTTL: a periodic token gets one more period (never past its
   * explicit max); any other token gets `increment` (else its last TTL) from now, never past
   * creation + min(explicit max, mount max). The token's creation TTL is left as it was.
   */
  private async renew(rec: TokenRecord, token: string, increment: number): Promise<LogicalResponse> {
    if (rec.tokenType === 'batch') throw new InvalidRequest('batch tokens cannot be renewed');
    if (!rec.renewable || !rec.expiresAt) throw new InvalidRequest('lease is not renewable');
    let period = rec.periodSeconds;
    let explicitMax = rec.explicitMaxTtlSeconds;
    if (rec.role) {
      // As Vault's authRenew: the role's current period and explicit max decide, not the token's.
      const role = await this.roles.get(rec.role);
      if (!role) throw new InvalidRequest(`original token role "${rec.role}" could not be found, not renewing`);
      period = role.token_period;
      explicitMax = role.token_explicit_max_ttl;
    }
    const lease = (await this.core.leases.repo.byToken(rec.hmac)).find((l) => l.kind === 'auth');
    const now = this.core.opts.clock.now();
    const max = this.maxTtl(explicitMax);
    const warnings: string[] = [];
    let ttl: number;
    let deadline: number | null;
    if (period > 0) {
      ttl = Math.min(period, max);
      deadline = explicitMax > 0 ? rec.createdAt.getTime() + explicitMax * 1000 : null;
    } else {
      ttl = increment > 0 ? increment : lease?.ttlSeconds || rec.ttlSeconds;
      deadline = rec.createdAt.getTime() + max * 1000;
    }
    if (deadline !== null) {
      const left = Math.floor((deadline - now.getTime()) / 1000);
      if (left <= 0) throw new InvalidRequest('past the max TTL, cannot renew');
      if (ttl > left) {
        warnings.push(`TTL of ${ttl}s exceeded the effective max_ttl of ${left}s; TTL value is capped accordingly`);
        ttl = left;
      }
    }
    const expiresAt = new Date(now.getTime() + ttl * 1000);
    await this.core.tokens.setExpiry(rec, expiresAt, rec.ttlSeconds);
    if (lease) {
      await this.core.leases.repo.update(lease.leaseId, { expiresAt, lastRenewal: now, ttlSeconds: ttl });
      await this.core.opts.scheduler?.schedule('lease', lease.leaseId, expiresAt);
    }
    return { auth: { ...authBlock(token, rec), lease_duration: ttl }, ...(warnings.length ? { warnings } : {}) };
  }

  // ------------------------------------------------------------------ revoke & tidy

  private async revoke(rec: TokenRecord): Promise<void> {
    if (rec.tokenType === 'batch') throw new InvalidRequest('batch tokens cannot be revoked');
    await this.core.tokens.revoke(rec.hmac);
  }

  /**
   * Revokes (with their subtrees) tokens whose parent is gone and used-up tokens whose
   * revocation never ran, then deletes leases whose token is gone. Vault makes parentless
   * tokens orphans instead; here a child that outlived its parent's revocation is revoked,
   * as the parent's revocation meant it to be. Bounded batches, so a huge backlog cannot hold
   * one request for ever: run it again if the warning says the limit was reached.
   */
  private async tidy(): Promise<LogicalResponse> {
    const limit = 1000;
    const { tokens, leases } = this.core;
    let revoked = 0;
    for (const h of [...(await tokens.repo.withMissingParent(limit)), ...(await tokens.repo.usedUp(limit))]) {
      if (!(await tokens.repo.byHmac(h))) continue; // already gone with an ancestor
      await tokens.revoke(h);
      revoked++;
    }
    const leaseIds = await tokens.repo.leaseIdsOfMissingTokens(limit);
    for (const id of leaseIds) await leases.revoke(id);
    return {
      status: 204,
      warnings: [`Tidy revoked ${revoked} token(s) whose parent was gone or whose uses were spent, and ${leaseIds.length} lease(s) whose token was gone.`],
    };
  }
}

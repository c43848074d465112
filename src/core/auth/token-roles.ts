/**
 * Token roles (`auth/token/roles/:role_name`), after Vault's token store: named presets that
 * `create/:role_name` applies (allowed/disallowed policies, orphan, period, explicit max TTL,
 * token type, path suffix). Roles are replicated barrier data under the token mount's storage
 * prefix (`auth/<uuid>/roles/<name>`), unlike tokens, which are local to a cluster.
 */
import type { Barrier } from '../barrier';
import { InvalidRequest } from '../errors';
import type { FieldSchema } from '../framework';
import { SYSTEM_MAX_TTL_SECONDS } from '../leases';
import { mountStoragePrefix, type MountEntry } from '../mounts';

export type RoleTokenType = 'service' | 'batch' | 'default-service' | 'default-batch';

/** A stored role. Legacy `period`/`explicit_max_ttl` are kept only to answer reads as Vault does. */
export interface TokenRole {
  name: string;
  allowed_policies: string[];
  disallowed_policies: string[];
  allowed_policies_glob: string[];
  disallowed_policies_glob: string[];
  allowed_entity_aliases: string[];
  orphan: boolean;
  renewable: boolean;
  path_suffix: string;
  period: number;
  explicit_max_ttl: number;
  token_period: number;
  token_explicit_max_ttl: number;
  token_type: RoleTokenType;
  token_no_default_policy: boolean;
  token_num_uses: number;
}

/** Vault's framework.GenericNameRegex. */
const ROLE_NAME = /^\w(([\w\-.]+)?\w)?$/;
/** Vault's pathSuffixSanitize; like Vault it is matched anywhere in the suffix, not anchored. */
const PATH_SUFFIX = /\w[\w\-.]+\w/;

export const ROLE_FIELDS: Record<string, FieldSchema> = {
  allowed_policies: { type: 'strings', description: 'Policies tokens created with this role may have (instead of a subset of the parent\'s).' },
  disallowed_policies: { type: 'strings', description: 'Policies tokens created with this role may not have.' },
  allowed_policies_glob: { type: 'strings', description: 'Like allowed_policies, matched as globs.' },
  disallowed_policies_glob: { type: 'strings', description: 'Like disallowed_policies, matched as globs.' },
  orphan: { type: 'bool', description: 'If true, tokens created via this role are orphans (have no parent).' },
  renewable: { type: 'bool', description: 'Tokens created via this role are renewable or not according to this value (default true).' },
  path_suffix: { type: 'string', description: 'Appended to the token path of tokens created via this role (for revoke-prefix).' },
  period: { type: 'duration', description: 'Deprecated: use token_period.' },
  explicit_max_ttl: { type: 'duration', description: 'Deprecated: use token_explicit_max_ttl.' },
  bound_cidrs: { type: 'strings', description: 'Deprecated: use token_bound_cidrs.' },
  allowed_entity_aliases: { type: 'strings', description: 'Entity aliases allowed during token creation.' },
  token_period: { type: 'duration', description: 'If set, tokens are periodic: each renewal resets their TTL to this value.' },
  token_explicit_max_ttl: { type: 'duration', description: 'A hard cap on the lifetime of tokens created via this role.' },
  token_type: { type: 'string', description: 'service, batch, default-service or default-batch.' },
  token_no_default_policy: { type: 'bool', description: 'Do not add the default policy to tokens created via this role.' },
  token_num_uses: { type: 'int', description: 'Maximum number of uses of tokens created via this role (0: unlimited).' },
  token_bound_cidrs: { type: 'strings', description: 'Not supported by Coffer: must be empty.' },
};

/** Vault's policyutil.SanitizePolicies: trimmed, lower-cased, unique and sorted; `root` alone wins. */
export function sanitizePolicies(list: readonly string[], addDefault: boolean): string[] {
  const out = new Set<string>();
  for (const raw of list) {
    const p = raw.trim().toLowerCase();
    if (!p) continue;
    if (p === 'root') return ['root'];
    out.add(p);
  }
  if (addDefault) out.add('default');
  return [...out].sort();
}

/** Vault's strutil.RemoveDuplicates(list, lowercase=true). */
function uniqueLower(list: readonly string[]): string[] {
  return [...new Set(list.map((s) => s.trim().toLowerCase()).filter(Boolean))].sort();
}

/** Vault's strutil.StrListContainsGlob: `*` is the only wildcard. */
export function matchesAnyGlob(globs: readonly string[], value: string): boolean {
  return globs.some((g) => new RegExp(`^${g.split('*').map((s) => s.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*')}$`).test(value));
}

function newRole(name: string): TokenRole {
  return {
    name,
    allowed_policies: [],
    disallowed_policies: [],
    allowed_policies_glob: [],
    disallowed_policies_glob: [],
    allowed_entity_aliases: [],
    orphan: false,
    renewable: true,
    path_suffix: '',
    period: 0,
    explicit_max_ttl: 0,
    token_period: 0,
    token_explicit_max_ttl: 0,
    token_type: 'default-service',
    token_no_default_policy: false,
    token_num_uses: 0,
  };
}

export class TokenRoles {
  constructor(
    private readonly barrier: Barrier,
    /** The token mount (built in, so always present once mounts are loaded). */
    private readonly mount: () => MountEntry,
  ) {}

  private prefix(): string {
    return `${mountStoragePrefix(this.mount())}roles/`;
  }

  async get(name: string): Promise<TokenRole | null> {
    if (!ROLE_NAME.test(name)) return null;
    const r = await this.barrier.get<TokenRole>(this.prefix() + name);
    return r ? { ...newRole(name), ...r } : null;
  }

  async list(): Promise<string[]> {
    return this.barrier.list(this.prefix());
  }

  async delete(name: string): Promise<number> {
    const { lastLsn } = await this.barrier.transaction((tx) => tx.delete(this.prefix() + name));
    return lastLsn;
  }

  /**
   * Creates or updates a role from request fields: on update only the fields given change.
   * Runs under a per-role lock so two concurrent partial updates cannot lose each other's fields.
   */
  async write(name: string, f: Record<string, any>): Promise<{ warnings: string[]; walLsn: number }> {
    if (!ROLE_NAME.test(name)) throw new InvalidRequest('role name cannot be empty or contain invalid characters');
    const key = this.prefix() + name;
    const mountMax = this.mount().config.max_lease_ttl || SYSTEM_MAX_TTL_SECONDS;
    const { result: warnings, lastLsn } = await this.barrier.transaction(async (tx) => {
      await tx.lock(key);
      const existing = await tx.get<TokenRole>(key);
      const role = existing ? { ...newRole(name), ...existing } : newRole(name);
      const warnings = applyFields(role, f, mountMax);
      await tx.put(key, role);
      return warnings;
    });
    return { warnings, walLsn: lastLsn };
  }
}

/** Applies request fields to `role` (Vault's tokenStoreRoleCreateUpdate); returns warnings. */
function applyFields(role: TokenRole, f: Record<string, any>, mountMaxTtl: number): string[] {
  const warnings: string[] = [];
  if (f.orphan !== undefined) role.orphan = f.orphan;
  if (f.renewable !== undefined) role.renewable = f.renewable;
  if (f.path_suffix !== undefined) {
    if (f.path_suffix !== '' && !PATH_SUFFIX.test(f.path_suffix)) {
      throw new InvalidRequest(`given role path suffix contains invalid characters; must match ${PATH_SUFFIX.source}`);
    }
    role.path_suffix = f.path_suffix;
  }
  if (role.path_suffix.includes('..')) throw new InvalidRequest('error registering path suffix: path cannot contain parent references');
  if (f.allowed_policies !== undefined) role.allowed_policies = sanitizePolicies(f.allowed_policies, false);
  if (f.disallowed_policies !== undefined) role.disallowed_policies = uniqueLower(f.disallowed_policies);
  if (f.allowed_policies_glob !== undefined) role.allowed_policies_glob = sanitizePolicies(f.allowed_policies_glob, false);
  if (f.disallowed_policies_glob !== undefined) role.disallowed_policies_glob = uniqueLower(f.disallowed_policies_glob);
  if (f.allowed_entity_aliases !== undefined) role.allowed_entity_aliases = uniqueLower(f.allowed_entity_aliases);
  if (f.token_no_default_policy !== undefined) role.token_no_default_policy = f.token_no_default_policy;
  if (f.token_num_uses !== undefined) {
    if (f.token_num_uses < 0) throw new InvalidRequest('error parsing role fields: token_num_uses cannot be negative');
    role.token_num_uses = f.token_num_uses;
  }
  // Source-address binding is not enforced anywhere in Coffer, so accepting it would be a lie.
  if ((f.token_bound_cidrs ?? []).length || (f.bound_cidrs ?? []).length) {
    throw new InvalidRequest('token_bound_cidrs is not supported by this server');
  }
  if (f.token_type !== undefined) {
    if (!['service', 'batch', 'default-service', 'default-batch'].includes(f.token_type)) {
      throw new InvalidRequest(`invalid 'token_type' value "${f.token_type}"`);
    }
    role.token_type = f.token_type;
  }

  // Prefer the token_ fields over the deprecated ones; the deprecated value is kept only for reads.
  if (f.token_period !== undefined) {
    if (f.period !== undefined) warnings.push("Both 'token_period' and deprecated 'period' value supplied, ignoring the deprecated value");
    role.token_period = f.token_period;
    role.period = 0;
  } else if (f.period !== undefined) {
    role.period = role.token_period = f.period;
  }
  if (f.token_explicit_max_ttl !== undefined) {
    if (f.explicit_max_ttl !== undefined) warnings.push("Both 'token_explicit_max_ttl' and deprecated 'explicit_max_ttl' value supplied, ignoring the deprecated value");
    role.token_explicit_max_ttl = f.token_explicit_max_ttl;
    role.explicit_max_ttl = 0;
  } else if (f.explicit_max_ttl !== undefined) {
    role.explicit_max_ttl = role.token_explicit_max_ttl = f.explicit_max_ttl;
  }
  if (role.token_explicit_max_ttl > mountMaxTtl) {
    warnings.push(
      `Given explicit max TTL of ${role.token_explicit_max_ttl} is greater than system/mount allowed value of ${mountMaxTtl} seconds; until this is fixed attempting to create tokens against this role will result in an error`,
    );
  }

  if (role.token_type === 'batch') {
    if (!role.orphan) throw new InvalidRequest("'token_type' cannot be 'batch' when role is set to generate non-orphan tokens");
    if (role.token_period) throw new InvalidRequest("'token_type' cannot be 'batch' when role is set to generate periodic tokens");
    if (role.renewable) throw new InvalidRequest("'token_type' cannot be 'batch' when role is set to generate renewable tokens");
    if (role.token_explicit_max_ttl) throw new InvalidRequest("'token_type' cannot be 'batch' when role is set to generate tokens with an explicit max TTL");
  }
  return warnings;
}

/** The role as `GET auth/token/roles/:name` shows it. */
export function roleView(r: TokenRole): Record<string, unknown> {
  return {
    allowed_entity_aliases: r.allowed_entity_aliases,
    allowed_policies: r.allowed_policies,
    allowed_policies_glob: r.allowed_policies_glob,
    disallowed_policies: r.disallowed_policies,
    disallowed_policies_glob: r.disallowed_policies_glob,
    explicit_max_ttl: r.explicit_max_ttl,
    name: r.name,
    orphan: r.orphan,
    path_suffix: r.path_suffix,
    period: r.period,
    renewable: r.renewable,
    token_explicit_max_ttl: r.token_explicit_max_ttl,
    token_no_default_policy: r.token_no_default_policy,
    token_period: r.token_period,
    token_type: r.token_type,
    ...(r.token_num_uses > 0 ? { token_num_uses: r.token_num_uses } : {}),
  };
}

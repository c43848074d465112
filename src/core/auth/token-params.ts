/**
 * The `token_*` parameters every auth method's roles and users carry (Vault's
 * `tokenutil.TokenParams`): their field declarations, parsing with the legacy aliases, the read
 * view, and what a login turns them into. Also the CIDR checks logins make against the caller's
 * address.
 */
import { BlockList, isIP } from 'node:net';
import { InvalidRequest } from '../errors';
import type { FieldSchema } from '../framework';
import type { MountEntry } from '../mounts';
import type { IssueParams } from './issue';

export type TokenTypeSetting = 'default' | 'service' | 'batch';

export interface TokenParams {
  token_policies: string[];
  token_ttl: number;
  token_max_ttl: number;
  token_explicit_max_ttl: number;
  token_period: number;
  token_num_uses: number;
  token_no_default_policy: boolean;
  token_bound_cidrs: string[];
  token_type: TokenTypeSetting;
}

export function defaultTokenParams(): TokenParams {
  return {
    token_policies: [],
    token_ttl: 0,
    token_max_ttl: 0,
    token_explicit_max_ttl: 0,
    token_period: 0,
    token_num_uses: 0,
    token_no_default_policy: false,
    token_bound_cidrs: [],
    token_type: 'default',
  };
}

export const TOKEN_FIELDS: Record<keyof TokenParams, FieldSchema> = {
  token_policies: { type: 'strings', description: 'Comma-separated list of policies' },
  token_ttl: { type: 'duration', description: 'The initial ttl of the token to generate' },
  token_max_ttl: { type: 'duration', description: 'The maximum lifetime of the generated token' },
  token_explicit_max_ttl: { type: 'duration', description: 'If set, tokens created via this role carry an explicit maximum TTL.' },
  token_period: { type: 'duration', description: 'If set, tokens created via this role will have no max lifetime; instead, their renewal period will be fixed to this value.' },
  token_num_uses: { type: 'int', description: 'The maximum number of times a token may be used, a value of zero means unlimited' },
  token_no_default_policy: { type: 'bool', description: "If true, the 'default' policy will not automatically be added to generated tokens" },
  token_bound_cidrs: { type: 'strings', description: 'Comma separated string or JSON list of CIDR blocks.' },
  token_type: { type: 'string', description: 'The type of token to generate, service or batch' },
};

/** Legacy names Vault still accepts, each standing for one `token_*` field. */
export type Aliases = Partial<Record<string, keyof TokenParams>>;

/** Field declarations for the legacy aliases, typed like the fields they stand for. */
export function aliasFields(aliases: Aliases): Record<string, FieldSchema> {
  const out: Record<string, FieldSchema> = {};
  for (const [legacy, field] of Object.entries(aliases)) out[legacy] = { ...TOKEN_FIELDS[field!], description: `Use "${field}" instead.` };
  return out;
}

/** Vault's policyutil.ParsePolicies: trimmed, lowercased, deduplicated, sorted; root alone wins. */
export function parsePolicies(list: string[]): string[] {
  const out = [...new Set(list.map((p) => p.trim().toLowerCase()).filter(Boolean))].sort();
  return out.includes('root') ? ['root'] : out;
}

/**
 * Applies the `token_*` fields (and their legacy aliases) present in `fields` to `cur`.
 * Returns the names of the legacy aliases used, so a read can echo them as Vault does.
 */
export function applyTokenFields(cur: TokenParams, fields: Record<string, unknown>, aliases: Aliases = {}): { usedLegacy: Set<keyof TokenParams>; setModern: Set<keyof TokenParams> } {
  const usedLegacy = new Set<keyof TokenParams>();
  const setModern = new Set<keyof TokenParams>();
  const value = (name: keyof TokenParams): unknown => {
    const legacy = Object.entries(aliases).find(([, f]) => f === name)?.[0];
    const modern = fields[name];
    const old = legacy ? fields[legacy] : undefined;
    if (modern !== undefined && old !== undefined) throw new InvalidRequest(`cannot specify both "${name}" and "${legacy}"`);
    if (modern !== undefined) setModern.add(name);
    if (old !== undefined) usedLegacy.add(name);
    return modern ?? old;
  };
  const policies = value('token_policies');
  if (policies !== undefined) cur.token_policies = parsePolicies(policies as string[]);
  for (const k of ['token_ttl', 'token_max_ttl', 'token_explicit_max_ttl', 'token_period'] as const) {
    const v = value(k);
    if (v === undefined) continue;
    if ((v as number) < 0) throw new InvalidRequest(`"${k}" cannot be negative`);
    cur[k] = v as number;
  }
  const uses = value('token_num_uses');
  if (uses !== undefined) {
    if ((uses as number) < 0) throw new InvalidRequest('"token_num_uses" cannot be negative');
    cur.token_num_uses = uses as number;
  }
  const noDefault = value('token_no_default_policy');
  if (noDefault !== undefined) cur.token_no_default_policy = noDefault as boolean;
  const cidrs = value('token_bound_cidrs');
  if (cidrs !== undefined) cur.token_bound_cidrs = validateCidrs(cidrs as string[], 'token_bound_cidrs');
  const type = value('token_type');
  if (type !== undefined) cur.token_type = parseTokenType(String(type));

  if (cur.token_max_ttl > 0 && cur.token_ttl > cur.token_max_ttl) throw new InvalidRequest('"token_ttl" cannot be greater than "token_max_ttl"');
  if (cur.token_type === 'batch' && cur.token_period > 0) throw new InvalidRequest("'token_type' cannot be 'batch' when set to generate periodic tokens");
  if (cur.token_type === 'batch' && cur.token_num_uses > 0) throw new InvalidRequest("'token_type' cannot be 'batch' when set to generate tokens with limited use count");
  return { usedLegacy, setModern };
}

function parseTokenType(t: string): TokenTypeSetting {
  switch (t) {
    case '':
    case 'default':
      return 'default';
    // Vault's AppRole turns these into service/batch with a warning; accepting them everywhere is harmless.
    case 'service':
    case 'default-service':
      return 'service';
    case 'batch':
    case 'default-batch':
      return 'batch';
    default:
      throw new InvalidRequest(`invalid 'token_type' value "${t}"`);
  }
}

/** The read view (Vault's PopulateTokenData). */
export function tokenData(p: TokenParams): Record<string, unknown> {
  return {
    token_bound_cidrs: p.token_bound_cidrs,
    token_explicit_max_ttl: p.token_explicit_max_ttl,
    token_max_ttl: p.token_max_ttl,
    token_no_default_policy: p.token_no_default_policy,
    token_num_uses: p.token_num_uses,
    token_period: p.token_period,
    token_policies: p.token_policies,
    token_ttl: p.token_ttl,
    token_type: p.token_type,
  };
}

/** The token type a login gets: the setting, else the mount's default; a mount may force one. */
export function resolveTokenType(setting: TokenTypeSetting, mount: MountEntry): 'service' | 'batch' {
  const m = String(mount.config.token_type ?? 'default-service');
  if (m === 'service' || m === 'batch') return m;
  if (setting !== 'default') return setting;
  return m === 'default-batch' ? 'batch' : 'service';
}

/** `userpass/` → `userpass`, `people/eu/` → `people-eu`: the prefix of a login token's display name. */
export function mountDisplayPrefix(mount: MountEntry): string {
  return mount.path.replace(/\/+$/, '').replace(/\//g, '-');
}

/** What issueAuth needs from the token parameters of a user or role (Vault's PopulateTokenAuth). */
export function loginIssueParams(p: TokenParams, mount: MountEntry): Pick<IssueParams, 'policies' | 'ttlSeconds' | 'maxTtlSeconds' | 'explicitMaxTtlSeconds' | 'periodSeconds' | 'numUses' | 'noDefaultPolicy' | 'type' | 'orphan' | 'renewable' | 'mount'> {
  const caps = [p.token_max_ttl, p.token_explicit_max_ttl].filter((x) => x > 0);
  return {
    policies: p.token_policies,
    ttlSeconds: p.token_ttl,
    maxTtlSeconds: caps.length ? Math.min(...caps) : 0,
    explicitMaxTtlSeconds: p.token_explicit_max_ttl || undefined,
    periodSeconds: p.token_period || undefined,
    numUses: p.token_num_uses,
    noDefaultPolicy: p.token_no_default_policy,
    type: resolveTokenType(p.token_type, mount),
    // Login tokens have no parent, as in Vault.
    orphan: true,
    renewable: true,
    mount,
  };
}

// ------------------------------------------------------------------------------------ CIDRs

interface Cidr {
  addr: string;
  prefix: number;
  family: 'ipv4' | 'ipv6';
}

function parseCidr(s: string): Cidr | null {
  const [addr, bits, extra] = s.trim().split('/');
  if (extra !== undefined) return null;
  const fam = isIP(addr);
  if (!fam) return null;
  const max = fam === 4 ? 32 : 128;
  const prefix = bits === undefined ? max : /^\d{1,3}$/.test(bits) ? Number(bits) : NaN;
  if (!(prefix >= 0 && prefix <= max)) return null;
  return { addr, prefix, family: fam === 4 ? 'ipv4' : 'ipv6' };
}

/** Trims and validates a list of CIDR blocks (a bare address is a /32 or /128). */
export function validateCidrs(list: string[], field: string): string[] {
  const out = list.map((s) => s.trim()).filter(Boolean);
  for (const c of out) if (!parseCidr(c)) throw new InvalidRequest(`${field}: invalid CIDR block "${c}"`);
  return out;
}

function normaliseAddr(addr: string): { addr: string; family: 'ipv4' | 'ipv6' } | null {
  const plain = addr.startsWith('::ffff:') && isIP(addr.slice(7)) === 4 ? addr.slice(7) : addr;
  const fam = isIP(plain);
  return fam ? { addr: plain, family: fam === 4 ? 'ipv4' : 'ipv6' } : null;
}

/** True if no blocks are set, or `addr` lies in one of them. An unknown address never passes a restriction. */
export function addrAllowed(addr: string | undefined, cidrs: string[]): boolean {
  if (cidrs.length === 0) return true;
  const a = addr ? normaliseAddr(addr) : null;
  if (!a) return false;
  const bl = new BlockList();
  for (const c of cidrs.map(parseCidr)) if (c) bl.addSubnet(c.addr, c.prefix, c.family);
  return bl.check(a.addr, a.family);
}

/** True if every block of `inner` lies inside one block of `outer` (an empty `outer` contains all). */
export function cidrSubset(inner: string[], outer: string[]): boolean {
  if (outer.length === 0) return true;
  const outs = outer.map(parseCidr).filter((c): c is Cidr => c !== null);
  return inner.every((s) => {
    const c = parseCidr(s);
    if (!c) return false;
    // Two CIDR blocks are nested or disjoint: if c is no wider than o, c ⊆ o iff any address of c is in o.
    return outs.some((o) => {
      if (o.family !== c.family || c.prefix < o.prefix) return false;
      const bl = new BlockList();
      bl.addSubnet(o.addr, o.prefix, o.family);
      return bl.check(c.addr, c.family);
    });
  });
}

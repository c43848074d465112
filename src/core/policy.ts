/**
 * ACL evaluation, as Vault's `vault/acl.go` does it. Pure: no storage, no clock.
 *
 * A token's policies are merged into one ACL. Rules are merged per pattern string across
 * policies: capabilities union, except that `deny` on a pattern in any policy replaces the
 * whole set for that pattern (Vault's NewACL). Then, for a request path, exactly ONE rule
 * decides — the most specific that matches — and nothing less specific is consulted:
 *
 *   1. an exact rule (no `*`, no `+` segment) equal to the path; for LIST also the path
 *      without its trailing `/` (so `path "secret/foo"` grants LIST on `secret/foo/`);
 *   2. for LIST on `p/`, the wildcard rules matching `p` (without the slash) are tried first,
 *      so `secret/foo*` governs `LIST secret/foo/` the way it governs `secret/foo`;
 *   3. otherwise among the wildcard rules that match (the longest plain `*` prefix, and every
 *      `+` rule), the highest priority wins (docs, "Policies → Priority matching"), comparing
 *      two matching rules P1 and P2:
 *        a. the rule whose first wildcard (`+` or `*`) comes later wins;
 *        b. a rule not ending in `*` beats one that does;
 *        c. fewer `+` segments win;
 *        d. the longer rule wins;
 *        e. the lexically greater rule wins.
 *
 * `deny` in the deciding rule refuses everything, `sudo` included. Root-protected paths
 * additionally need `sudo` in the deciding rule. The `root` policy allows everything.
 *
 * Parameter constraints and wrapping TTLs are parsed and kept on the rules but not enforced
 * (see policy-parse.ts). Templated paths (`{{identity.entity.id}}`) are skipped: Coffer has no
 * identity store to resolve them, and Vault also drops a template it cannot resolve — taken
 * literally, the braces would match a caller who typed them.
 */
export const CAPABILITIES = ['create', 'read', 'update', 'patch', 'delete', 'list', 'sudo', 'deny', 'subscribe', 'recover'] as const;
export type Capability = (typeof CAPABILITIES)[number];

export interface PathRule {
  /** As written in the policy, minus a leading `/` (so with its trailing `*`, if any). */
  path: string;
  capabilities: Capability[];
  allowedParameters?: Record<string, unknown[]>;
  deniedParameters?: Record<string, unknown[]>;
  requiredParameters?: string[];
  /** Seconds. */
  minWrappingTtl?: number;
  /** Seconds. */
  maxWrappingTtl?: number;
}

export interface Policy {
  name: string;
  rules: PathRule[];
}

/** How a pattern is matched and ranked. */
export interface PatternInfo {
  kind: 'exact' | 'prefix' | 'segment';
  /** The pattern without its trailing `*`. */
  body: string;
  /** Ends in `*`. */
  prefix: boolean;
  /** Index of the first `+` (segment rules) or of the `*` (prefix rules); Infinity for exact. */
  firstWildcard: number;
  /** Number of `+` segments. */
  wildcards: number;
}

/** Classifies a pattern the way Vault's policy parser does. */
export function patternInfo(pattern: string): PatternInfo {
  const segment = pattern === '+' || pattern.includes('/+') || pattern.startsWith('+/');
  const prefix = pattern.endsWith('*');
  const body = prefix ? pattern.slice(0, -1) : pattern;
  if (segment) {
    return { kind: 'segment', body, prefix, firstWildcard: pattern.indexOf('+'), wildcards: body.split('/').filter((s) => s === '+').length };
  }
  if (prefix) return { kind: 'prefix', body, prefix, firstWildcard: body.length, wildcards: 0 };
  return { kind: 'exact', body, prefix: false, firstWildcard: Infinity, wildcards: 0 };
}

/** >0 if `a` has priority over `b` (rules a–e above), <0 if `b` does, 0 if identical. */
export function comparePriority(a: PatternInfo, b: PatternInfo): number {
  if (a.firstWildcard !== b.firstWildcard) return a.firstWildcard > b.firstWildcard ? 1 : -1;
  if (a.prefix !== b.prefix) return a.prefix ? -1 : 1;
  if (a.wildcards !== b.wildcards) return a.wildcards < b.wildcards ? 1 : -1;
  if (a.body.length !== b.body.length) return a.body.length > b.body.length ? 1 : -1;
  if (a.body !== b.body) return a.body > b.body ? 1 : -1;
  return 0;
}

/** True if pattern `a` takes priority over pattern `b` when both match a path. */
export function morePrecise(a: string, b: string): boolean {
  return comparePriority(patternInfo(a), patternInfo(b)) > 0;
}

/** Does wildcard pattern `info` (prefix or segment kind) match `path`? */
export function patternMatches(info: PatternInfo, path: string): boolean {
  if (info.kind === 'exact') return path === info.body;
  if (info.kind === 'prefix') return path.startsWith(info.body);
  const parts = path.split('/');
  const acl = info.body.split('/');
  if (parts.length < acl.length) return false;
  if (!info.prefix && parts.length !== acl.length) return false;
  for (let i = 0; i < acl.length; i++) {
    const a = acl[i];
    // `+` stands for any one segment (Vault accepts an empty one too, e.g. the last segment of
    // a LIST path `secret/foo/`).
    if (a === '+' || a === parts[i]) continue;
    if (info.prefix && i === acl.length - 1 && parts[i].startsWith(a)) continue;
    return false;
  }
  return true;
}

const DENY: ReadonlySet<Capability> = new Set<Capability>(['deny']);

interface WildcardRule {
  info: PatternInfo;
  caps: ReadonlySet<Capability>;
}

export class Acl {
  readonly root: boolean;
  private readonly exact = new Map<string, ReadonlySet<Capability>>();
  /** Keyed by the pattern without `*`. */
  private readonly prefixes = new Map<string, ReadonlySet<Capability>>();
  /** Keyed by the full pattern (a `+…*` rule and a `+…` rule are different rules). */
  private readonly segments = new Map<string, ReadonlySet<Capability>>();
  private readonly segmentRules: WildcardRule[];

  constructor(policies: Policy[]) {
    this.root = policies.some((p) => p.name === 'root');
    for (const p of policies) {
      for (const r of p.rules) {
        const pattern = r.path.startsWith('/') ? r.path.slice(1) : r.path;
        if (pattern.includes('{{')) continue; // templated: see the header
        const info = patternInfo(pattern);
        const table = info.kind === 'exact' ? this.exact : info.kind === 'prefix' ? this.prefixes : this.segments;
        const key = info.kind === 'segment' ? pattern : info.body;
        table.set(key, merge(table.get(key), r.capabilities));
      }
    }
    this.segmentRules = [...this.segments].map(([pattern, caps]) => ({ info: patternInfo(pattern), caps }));
  }

  /**
   * The capabilities this ACL grants on `path`, as Vault's sys/capabilities reports them:
   * `["root"]` for root, `["deny"]` when denied or nothing matches, otherwise sorted
   * alphabetically. Evaluated as a LIST would be, so the trailing-slash fallbacks apply.
   */
  capabilities(path: string): string[] {
    if (this.root) return ['root'];
    const caps = this.lookup(path, 'list');
    if (!caps || caps.has('deny') || caps.size === 0) return ['deny'];
    return [...caps].sort();
  }

  /**
   * May `cap` (the operation: read, list, create, update, patch, delete) be performed on
   * `path`? With `needsSudo`, the deciding rule must also grant `sudo`.
   */
  allows(path: string, cap: Capability, needsSudo = false): boolean {
    if (this.root) return true;
    const caps = this.lookup(path, cap);
    if (!caps || caps.has('deny')) return false;
    if (needsSudo && !caps.has('sudo')) return false;
    return caps.has(cap);
  }

  /** The capability set of the one rule that decides `path` (Vault's AllowOperation). */
  private lookup(rawPath: string, op: Capability): ReadonlySet<Capability> | null {
    const path = rawPath.replace(/^\/+/, '');
    const list = op === 'list';
    const exact = this.exact.get(path) ?? (list ? this.exact.get(trimSlash(path)) : undefined);
    if (exact) return exact;
    if (list && path.endsWith('/')) {
      const caps = this.wildcard(path.slice(0, -1));
      if (caps) return caps;
    }
    return this.wildcard(path);
  }

  private wildcard(path: string): ReadonlySet<Capability> | null {
    let best: WildcardRule | null = null;
    // Among plain prefix rules only the longest can win (a later `*` outranks an earlier one).
    for (const [body, caps] of this.prefixes) {
      if (path.startsWith(body) && (!best || body.length > best.info.body.length)) best = { info: patternInfo(body + '*'), caps };
    }
    for (const r of this.segmentRules) {
      if (patternMatches(r.info, path) && (!best || comparePriority(r.info, best.info) > 0)) best = r;
    }
    return best?.caps ?? null;
  }
}

function trimSlash(p: string): string {
  return p.endsWith('/') ? p.slice(0, -1) : p;
}

/** Vault's per-pattern merge: an existing deny stays; an incoming deny replaces; else union. */
function merge(existing: ReadonlySet<Capability> | undefined, incoming: readonly Capability[]): ReadonlySet<Capability> {
  if (existing?.has('deny')) return existing;
  if (incoming.includes('deny')) return DENY;
  return new Set([...(existing ?? []), ...incoming]);
}

/**
 * Root-protected paths (need `sudo` besides the normal capability), from Vault's
 * `PathsSpecial.Root` of the system backend and the token store. An entry ending in `*`
 * matches by prefix; any other entry matches only exactly, so `GET sys/auth` (list auth
 * methods) is not root-protected while `sys/auth/<path>` is, and `sys/seal` does not cover
 * `sys/seal-status`. `auth/token/revoke-orphan` is listed because Vault's handler checks sudo
 * itself.
 */
export const ROOT_PATHS: readonly string[] = [
  'sys/auth/*',
  'sys/remount',
  'sys/audit',
  'sys/audit/*',
  'sys/raw',
  'sys/raw/*',
  'sys/replication/primary/secondary-token',
  'sys/replication/performance/primary/secondary-token',
  'sys/replication/dr/primary/secondary-token',
  'sys/replication/reindex',
  'sys/replication/dr/reindex',
  'sys/replication/performance/reindex',
  'sys/rotate',
  'sys/config/cors',
  'sys/config/auditing/*',
  'sys/config/ui/headers/*',
  'sys/plugins/catalog/*',
  'sys/plugins/runtimes/catalog/*',
  'sys/revoke-prefix/*',
  'sys/revoke-force/*',
  'sys/leases/revoke-prefix/*',
  'sys/leases/revoke-force/*',
  'sys/leases/lookup/*',
  'sys/storage/raft/snapshot-auto/config/*',
  'sys/leases',
  'sys/internal/inspect/*',
  'sys/seal',
  'sys/step-down',
  'auth/token/revoke-orphan',
  'auth/token/revoke-orphan/*',
  'auth/token/accessors*',
];

export function requiresSudo(path: string, _operation?: string): boolean {
  return ROOT_PATHS.some((p) => (p.endsWith('*') ? path.startsWith(p.slice(0, -1)) : path === p));
}

/** Vault's built-in `default` policy (used until an operator writes their own). */
export const DEFAULT_POLICY: Policy = {
  name: 'default',
  rules: [
    { path: 'auth/token/lookup-self', capabilities: ['read'] },
    { path: 'auth/token/renew-self', capabilities: ['update'] },
    { path: 'auth/token/revoke-self', capabilities: ['update'] },
    { path: 'sys/capabilities-self', capabilities: ['update'] },
    { path: 'sys/internal/ui/resultant-acl', capabilities: ['read'] },
    { path: 'sys/leases/renew', capabilities: ['update'] },
    { path: 'sys/leases/lookup', capabilities: ['update'] },
    { path: 'sys/renew', capabilities: ['update'] },
    { path: 'sys/wrapping/wrap', capabilities: ['update'] },
    { path: 'sys/wrapping/lookup', capabilities: ['update'] },
    { path: 'sys/wrapping/unwrap', capabilities: ['update'] },
    { path: 'cubbyhole/*', capabilities: ['create', 'read', 'update', 'delete', 'list'] },
  ],
};

/** The policy of response-wrapping tokens: they can only be unwrapped, looked up or rewrapped. */
export const RESPONSE_WRAPPING_POLICY: Policy = {
  name: 'response-wrapping',
  rules: [
    { path: 'sys/wrapping/unwrap', capabilities: ['update'] },
    { path: 'sys/wrapping/lookup', capabilities: ['update'] },
    { path: 'sys/wrapping/rewrap', capabilities: ['update'] },
  ],
};


/**
 * ACL evaluation (Vault's rules). A token's policies are merged into one ACL; for a request
 * path the most specific matching rule decides, `deny` anywhere in that rule wins, and
 * root-protected paths additionally need `sudo`. The `root` policy allows everything.
 *
 * Most-specific order (Vault docs, "Policies → Priority matching"), comparing two matching
 * rules P1 and P2:
 *   1. the rule whose first wildcard (`+` or `*`) comes later wins;
 *   2. a rule not ending in `*` beats one that does;
 *   3. fewer `+` segments win;
 *   4. the longer rule wins;
 *   5. the lexically greater rule wins.
 */
export const CAPABILITIES = ['create', 'read', 'update', 'patch', 'delete', 'list', 'sudo', 'deny'] as const;
export type Capability = (typeof CAPABILITIES)[number];

export interface PathRule {
  path: string;
  capabilities: Capability[];
}

export interface Policy {
  name: string;
  rules: PathRule[];
}

interface CompiledRule {
  pattern: string;
  caps: Set<Capability>;
  prefix: boolean;
  segments: string[] | null; // split pattern when it has '+'
}

export class Acl {
  readonly root: boolean;
  private readonly rules: CompiledRule[];

  constructor(policies: Policy[]) {
    this.root = policies.some((p) => p.name === 'root');
    // Merge rules with the same pattern across policies (Vault unions their capabilities;
    // deny stays deny).
    const merged = new Map<string, Set<Capability>>();
    for (const p of policies) {
      for (const r of p.rules) {
        const caps = merged.get(r.path) ?? new Set<Capability>();
        for (const c of r.capabilities) caps.add(c);
        merged.set(r.path, caps);
      }
    }
    this.rules = [...merged].map(([pattern, caps]) => ({
      pattern,
      caps,
      prefix: pattern.endsWith('*'),
      segments: pattern.includes('+') ? (pattern.endsWith('*') ? pattern.slice(0, -1) : pattern).split('/') : null,
    }));
  }

  /** The capabilities this ACL grants on `path` (already including deny resolution). */
  capabilities(path: string): Capability[] {
    if (this.root) return ['root' as Capability];
    const rule = this.bestMatch(path);
    if (!rule || rule.caps.has('deny')) return ['deny'];
    return CAPABILITIES.filter((c) => rule.caps.has(c));
  }

  allows(path: string, cap: Capability, needsSudo = false): boolean {
    if (this.root) return true;
    const rule = this.bestMatch(path);
    if (!rule || rule.caps.has('deny')) return false;
    if (needsSudo && !rule.caps.has('sudo')) return false;
    return rule.caps.has(cap);
  }

  private bestMatch(path: string): CompiledRule | null {
    let best: CompiledRule | null = null;
    for (const r of this.rules) {
      if (matches(r, path) && (!best || morePrecise(r, best))) best = r;
    }
    return best;
  }
}

function matches(r: CompiledRule, path: string): boolean {
  if (!r.segments) return r.prefix ? path.startsWith(r.pattern.slice(0, -1)) : path === r.pattern;
  const parts = path.split('/');
  const segs = r.segments;
  if (r.prefix ? parts.length < segs.length : parts.length !== segs.length) return false;
  for (let i = 0; i < segs.length; i++) {
    const last = i === segs.length - 1;
    if (segs[i] === '+') {
      if (parts[i] === '' && !(r.prefix && last)) return false;
      continue;
    }
    if (r.prefix && last) {
      if (!parts.slice(i).join('/').startsWith(segs[i])) return false;
      return true;
    }
    if (segs[i] !== parts[i]) return false;
  }
  return true;
}

function firstWildcard(p: string): number {
  const plus = p.indexOf('+');
  const star = p.endsWith('*') ? p.length - 1 : -1;
  const c = [plus, star].filter((i) => i >= 0);
  return c.length ? Math.min(...c) : Infinity;
}

/** True if `a` is more precise than `b` (Vault's priority rules). */
export function morePrecise(a: CompiledRule | { pattern: string }, b: CompiledRule | { pattern: string }): boolean {
  const pa = a.pattern;
  const pb = b.pattern;
  const wa = firstWildcard(pa);
  const wb = firstWildcard(pb);
  if (wa !== wb) return wa > wb;
  const sa = pa.endsWith('*');
  const sb = pb.endsWith('*');
  if (sa !== sb) return !sa;
  const plusA = pa.split('+').length - 1;
  const plusB = pb.split('+').length - 1;
  if (plusA !== plusB) return plusA < plusB;
  if (pa.length !== pb.length) return pa.length > pb.length;
  return pa > pb;
}

/** Paths that need `sudo` in addition to the normal capability (Vault's root-protected list). */
const SUDO_PREFIXES = [
  'sys/auth/', 'sys/remount', 'sys/audit', 'sys/raw/', 'sys/rotate', 'sys/config/cors', 'sys/config/auditing/',
  'sys/plugins/catalog/', 'sys/revoke-prefix/', 'sys/revoke-force/', 'sys/leases/revoke-prefix/',
  'sys/leases/revoke-force/', 'sys/replication/performance/primary/secondary-token', 'sys/replication/reindex',
  'auth/token/accessors/', 'sys/seal', 'sys/step-down', 'sys/key-status',
];

export function requiresSudo(path: string, operation: string): boolean {
  if (path === 'auth/token/accessors' || path === 'auth/token/accessors/') return true;
  if (path.startsWith('sys/leases/lookup/') && operation === 'list') return true;
  return SUDO_PREFIXES.some((p) => path === p.replace(/\/$/, '') || path.startsWith(p));
}

/**
 * The mount table and the router. Secrets-engine and auth mounts are replicated (stored at
 * `core/mounts`, `core/auth`), except those marked `local`, which live in local storage
 * (invariant 5). Each mount's data lives under `logical/<uuid>/` (or `auth/<uuid>/`), so a
 * remount or disable never has to rewrite paths inside the engine.
 */
import { randomUUID } from 'node:crypto';
import type { Barrier, BarrierTx } from './barrier';
import { InvalidRequest } from './errors';
import { randomId } from './tokens';

export interface MountConfig {
  default_lease_ttl: number;
  max_lease_ttl: number;
  force_no_cache: boolean;
  listing_visibility?: string;
  [k: string]: unknown;
}

export interface MountEntry {
  path: string; // with trailing slash, e.g. "secret/"
  type: string;
  description: string;
  uuid: string;
  accessor: string;
  config: MountConfig;
  options: Record<string, string>;
  local: boolean;
  seal_wrap: boolean;
  external_entropy_access: boolean;
  /** 'secret' mounts sit at the top level; 'auth' mounts under auth/. */
  table: 'secret' | 'auth';
}

const TABLES = {
  secret: { replicated: 'core/mounts', local: 'core/local-mounts' },
  auth: { replicated: 'core/auth', local: 'core/local-auth' },
} as const;

/** Mounts that always exist and cannot be moved or disabled. */
const BUILTIN: Omit<MountEntry, 'uuid' | 'accessor'>[] = [
  { path: 'sys/', type: 'system', description: 'system endpoints used for control, policy and debugging', config: defaults(), options: {}, local: false, seal_wrap: false, external_entropy_access: false, table: 'secret' },
  { path: 'cubbyhole/', type: 'cubbyhole', description: 'per-token private secret storage', config: defaults(), options: {}, local: true, seal_wrap: false, external_entropy_access: false, table: 'secret' },
  { path: 'token/', type: 'token', description: 'token based credentials', config: defaults(), options: {}, local: false, seal_wrap: false, external_entropy_access: false, table: 'auth' },
];

export const PROTECTED_MOUNTS = new Set(['sys/', 'cubbyhole/', 'auth/token/']);

function defaults(): MountConfig {
  return { default_lease_ttl: 0, max_lease_ttl: 0, force_no_cache: false };
}

export function normalizeMountPath(p: string): string {
  const trimmed = p.replace(/^\/+|\/+$/g, '');
  if (!trimmed) throw new InvalidRequest('mount path cannot be empty');
  if (trimmed.split('/').some((s) => s === '' || s === '.' || s === '..')) throw new InvalidRequest(`invalid mount path "${p}"`);
  return trimmed + '/';
}

export class MountTable {
  private entries: MountEntry[] = [];

  constructor(private readonly barrier: Barrier) {}

  /** Loads both tables from storage (on unseal, and when another process changed them). */
  async load(): Promise<void> {
    const out: MountEntry[] = [];
    for (const table of ['secret', 'auth'] as const) {
      const replicated = (await this.barrier.get<MountEntry[]>(TABLES[table].replicated)) ?? [];
      const local = (await this.barrier.getLocal<MountEntry[]>(TABLES[table].local)) ?? [];
      out.push(...replicated, ...local);
    }
    for (const b of BUILTIN) {
      if (!out.some((e) => e.table === b.table && e.path === b.path)) {
        out.push({ ...b, uuid: stableBuiltinId(b.table, b.path), accessor: `${b.type}_${stableBuiltinId(b.table, b.path).slice(0, 8)}` });
      }
    }
    this.entries = out;
  }

  list(table: 'secret' | 'auth'): MountEntry[] {
    return this.entries.filter((e) => e.table === table).sort((a, b) => a.path.localeCompare(b.path));
  }

  get(table: 'secret' | 'auth', path: string): MountEntry | undefined {
    return this.entries.find((e) => e.table === table && e.path === path);
  }

  /** The mount that serves `path` (longest prefix) and the remainder of the path. */
  route(path: string): { mount: MountEntry; subpath: string; prefix: string } | null {
    let best: { mount: MountEntry; subpath: string; prefix: string } | null = null;
    for (const e of this.entries) {
      const prefix = e.table === 'auth' ? `auth/${e.path}` : e.path;
      const bare = prefix.slice(0, -1);
      if (path === bare || path.startsWith(prefix)) {
        if (!best || prefix.length > best.prefix.length) best = { mount: e, subpath: path.slice(prefix.length), prefix };
      }
    }
    return best;
  }

  async add(tx: BarrierTx, entry: Omit<MountEntry, 'uuid' | 'accessor'>): Promise<MountEntry> {
    const full: MountEntry = { ...entry, uuid: randomUUID(), accessor: `${entry.type}_${randomId(8).toLowerCase()}` };
    const key = full.local ? TABLES[full.table].local : TABLES[full.table].replicated;
    await tx.lock('core/mount-table');
    const current = (full.local ? await tx.getLocal<MountEntry[]>(key) : await tx.get<MountEntry[]>(key)) ?? [];
    const conflict = [...current, ...this.entries.filter((e) => e.table === full.table)].find(
      (e) => e.path === full.path || e.path.startsWith(full.path) || full.path.startsWith(e.path),
    );
    if (conflict) throw new InvalidRequest(`path is already in use at ${full.table === 'auth' ? 'auth/' : ''}${conflict.path}`);
    const next = [...current, full];
    if (full.local) await tx.putLocal(key, next);
    else await tx.put(key, next);
    return full;
  }

  async remove(tx: BarrierTx, entry: MountEntry): Promise<void> {
    const key = entry.local ? TABLES[entry.table].local : TABLES[entry.table].replicated;
    await tx.lock('core/mount-table');
    const current = (entry.local ? await tx.getLocal<MountEntry[]>(key) : await tx.get<MountEntry[]>(key)) ?? [];
    const next = current.filter((e) => e.uuid !== entry.uuid);
    if (entry.local) await tx.putLocal(key, next);
    else await tx.put(key, next);
  }

  async update(tx: BarrierTx, entry: MountEntry): Promise<void> {
    const key = entry.local ? TABLES[entry.table].local : TABLES[entry.table].replicated;
    await tx.lock('core/mount-table');
    const current = (entry.local ? await tx.getLocal<MountEntry[]>(key) : await tx.get<MountEntry[]>(key)) ?? [];
    const next = current.map((e) => (e.uuid === entry.uuid ? entry : e));
    if (!next.some((e) => e.uuid === entry.uuid)) next.push(entry); // a built-in tuned for the first time
    if (entry.local) await tx.putLocal(key, next);
    else await tx.put(key, next);
  }
}

/** Storage prefix of a mount's data. */
export function mountStoragePrefix(e: MountEntry): string {
  return `${e.table === 'auth' ? 'auth' : 'logical'}/${e.uuid}/`;
}

function stableBuiltinId(table: string, path: string): string {
  // Built-ins get a fixed id so every cluster (and every process) agrees on their storage prefix.
  const hex = Buffer.from(`${table}:${path}`).toString('hex').padEnd(32, '0').slice(0, 32);
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`;
}

/** A mount as `sys/mounts` and `sys/auth` show it (auth mounts add `token_type`). */
export function describeMount(m: MountEntry): Record<string, unknown> {
  return {
    accessor: m.accessor,
    config: {
      default_lease_ttl: m.config.default_lease_ttl,
      max_lease_ttl: m.config.max_lease_ttl,
      force_no_cache: m.config.force_no_cache,
      ...(m.table === 'auth' ? { token_type: m.config.token_type ?? 'default-service' } : {}),
      ...(m.config.listing_visibility ? { listing_visibility: m.config.listing_visibility } : {}),
    },
    description: m.description,
    external_entropy_access: m.external_entropy_access,
    local: m.local,
    options: Object.keys(m.options).length ? m.options : null,
    plugin_version: '',
    running_plugin_version: '',
    running_sha256: '',
    seal_wrap: m.seal_wrap,
    type: m.type,
    uuid: m.uuid,
  };
}

/** `.../tune` reads: TTLs resolved (0 means the system default of 32 days). */
export function mountTuneView(m: MountEntry): Record<string, unknown> {
  const systemMax = 32 * 24 * 3600;
  return {
    default_lease_ttl: m.config.default_lease_ttl || systemMax,
    max_lease_ttl: m.config.max_lease_ttl || systemMax,
    force_no_cache: m.config.force_no_cache,
    ...(m.table === 'auth' ? { token_type: m.config.token_type ?? 'default-service' } : {}),
    description: m.description,
    options: Object.keys(m.options).length ? m.options : null,
    ...(m.config.listing_visibility ? { listing_visibility: m.config.listing_visibility } : {}),
  };
}

/**
 * sys/auth: enabling, reading, tuning and disabling auth methods (the `auth` mount table).
 * Mirrors sys/mounts; the differences are the `token_type` mount setting, the built-in
 * `token/` method that can be neither disabled nor enabled again, and that disabling revokes
 * every token issued by the method (through its leases) and erases the method's storage.
 */
import type { BarrierTx } from '../barrier';
import type { Core } from '../core';
import { InvalidRequest } from '../errors';
import type { FieldSchema, RouteDef } from '../framework';
import { describeMount, mountStoragePrefix, mountTuneView, normalizeMountPath, type MountEntry } from '../mounts';
import type { LogicalResponse } from '../request';
import { parseDurationSeconds } from '../units';
import { SYSTEM_MAX_TTL_SECONDS } from '../leases';

/** Auth method types this server can mount (the rest of Vault's catalog is not built in). */
const SUPPORTED_METHODS = new Set(['userpass', 'approle']);
const TOKEN_TYPES = new Set(['default-service', 'default-batch', 'service', 'batch']);

export function authRoutes(core: Core): RouteDef[] {
  const sys = new SysAuth(core);
  const enableFields: Record<string, FieldSchema> = {
    type: { type: 'string', description: 'The type of the backend. Example: "userpass"' },
    description: { type: 'string', description: 'User-friendly description for this credential backend.' },
    config: { type: 'map', description: 'Configuration for this mount, such as default_lease_ttl, max_lease_ttl and token_type.' },
    local: { type: 'bool', description: 'Mark the mount as a local mount, which is not replicated and is unaffected by replication.' },
    seal_wrap: { type: 'bool', description: 'Whether to turn on seal wrapping for the mount.' },
    options: { type: 'map', description: 'The options to pass into the backend. Should be a json object with string keys and values.' },
  };
  const tuneFields: Record<string, FieldSchema> = {
    description: { type: 'string', description: 'User-friendly description for this credential backend.' },
    // `any`: Vault also accepts "system" (back to the system default) besides durations.
    default_lease_ttl: { type: 'any', description: 'The default lease TTL for this mount.' },
    max_lease_ttl: { type: 'any', description: 'The max lease TTL for this mount.' },
    token_type: { type: 'string', description: 'The type of token to issue (service, batch, default-service, default-batch).' },
    listing_visibility: { type: 'string', description: 'Whether to show this mount in the UI-specific listing endpoint ("unauth" or "hidden").' },
    options: { type: 'map', description: 'The options to pass into the backend.' },
  };
  return [
    { pattern: 'auth', summary: 'List the currently enabled credential backends.', operations: { read: async () => ({ data: sys.mountMap() }) } },
    {
      // Declared before `auth/:path+`, which would otherwise swallow it (first match wins).
      // One segment only: the route framework takes `:name+` as a rest parameter only at the
      // end of a pattern, so a nested mount path (`auth/a/b/tune`) reaches `auth/:path+`,
      // which hands it on to tune (see tuneSuffix).
      pattern: 'auth/:path/tune',
      summary: 'Tune configuration parameters for a given auth path.',
      sudo: true,
      fields: tuneFields,
      operations: {
        read: async (ctx) => ({ data: mountTuneView(sys.existing(ctx.params.path)) }),
        update: async (ctx) => sys.tune(sys.existing(ctx.params.path), ctx.fields),
      },
    },
    {
      pattern: 'auth/:path+',
      summary: 'Enables a new auth method.',
      sudo: true,
      fields: enableFields,
      operations: {
        read: async (ctx) => {
          const tune = tuneSuffix(ctx.params.path);
          if (tune) return { data: mountTuneView(sys.existing(tune)) };
          const path = normalizeMountPath(ctx.params.path);
          const m = core.mounts.get('auth', path);
          if (!m) throw new InvalidRequest(`No auth engine at ${path}`);
          return { data: describeMount(m) };
        },
        update: async (ctx) => {
          const tune = tuneSuffix(ctx.params.path);
          if (tune) return sys.tune(sys.existing(tune), ctx.fields);
          return sys.enable(normalizeMountPath(ctx.params.path), ctx.fields);
        },
        delete: async (ctx) => sys.disable(normalizeMountPath(ctx.params.path)),
      },
    },
  ];
}

/** `a/b/tune` → `a/b`: a tune request for a nested mount path; null for anything else. */
function tuneSuffix(path: string): string | null {
  const m = /^(.+)\/tune\/?$/.exec(path);
  return m ? m[1] : null;
}

class SysAuth {
  constructor(private readonly core: Core) {}

  mountMap(): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const m of this.core.mounts.list('auth')) out[m.path] = describeMount(m);
    return out;
  }

  existing(path: string): MountEntry {
    const p = normalizeMountPath(path);
    const m = this.core.mounts.get('auth', p);
    if (!m) throw new InvalidRequest(`cannot fetch sysview for path "auth/${p}"`);
    return m;
  }

  async enable(path: string, f: Record<string, any>): Promise<LogicalResponse> {
    const type = String(f.type ?? '').trim();
    if (!type) throw new InvalidRequest('backend type must be specified as a string');
    if (type === 'token') throw new InvalidRequest('token credential backend cannot be instantiated');
    if (path === 'token/') throw new InvalidRequest('path is already in use at auth/token/');
    if (!SUPPORTED_METHODS.has(type)) throw new InvalidRequest(`plugin not found in the catalog: ${type}`);
    const cfg = (f.config ?? {}) as Record<string, unknown>;
    const tokenType = String(cfg.token_type ?? 'default-service');
    if (!TOKEN_TYPES.has(tokenType)) throw new InvalidRequest(`invalid value for "token_type": ${tokenType}`);
    const ttls = checkTtls(parseTtl(cfg.default_lease_ttl, 'default_lease_ttl') ?? 0, parseTtl(cfg.max_lease_ttl, 'max_lease_ttl') ?? 0);
    const options: Record<string, string> = {};
    for (const [k, v] of Object.entries((f.options ?? {}) as Record<string, unknown>)) options[k] = String(v);
    const { lastLsn } = await this.core.barrier.transaction((tx) =>
      this.core.mounts.add(tx, {
        path,
        type,
        description: String(f.description ?? ''),
        config: {
          default_lease_ttl: ttls.default_lease_ttl,
          max_lease_ttl: ttls.max_lease_ttl,
          force_no_cache: Boolean(cfg.force_no_cache),
          token_type: tokenType,
          ...(cfg.listing_visibility ? { listing_visibility: String(cfg.listing_visibility) } : {}),
        },
        options,
        local: Boolean(f.local),
        seal_wrap: Boolean(f.seal_wrap),
        external_entropy_access: false,
        table: 'auth',
      }),
    );
    await this.core.reloadMounts();
    return { status: 204, walLsn: lastLsn };
  }

  /**
   * Revokes every token the method issued (each login has a lease under `auth/<path>`), then
   * removes the mount and its data in one transaction. Revocation comes first, as in Vault: if
   * it fails, the method stays enabled and the call can be retried.
   */
  async disable(path: string): Promise<LogicalResponse> {
    if (path === 'token/') throw new InvalidRequest('token credential backend cannot be disabled');
    const m = this.core.mounts.get('auth', path);
    if (!m) return { status: 204 };
    const prefix = `auth/${path}`;
    for (const id of await this.core.leases.repo.idsWithPrefix(prefix)) {
      const lease = await this.core.leases.repo.get(id);
      // Revoking the token also revokes its leases (and its children's).
      if (lease?.tokenHmac && (await this.core.tokens.repo.byHmac(lease.tokenHmac))) await this.core.tokens.revoke(lease.tokenHmac);
    }
    await this.core.leases.revokePrefix(prefix);
    const { lastLsn } = await this.core.barrier.transaction(async (tx) => {
      await this.core.mounts.remove(tx, m);
      await clearPrefix(tx, mountStoragePrefix(m));
    });
    await this.core.reloadMounts();
    return { status: 204, walLsn: lastLsn };
  }

  async tune(m: MountEntry, f: Record<string, any>): Promise<LogicalResponse> {
    const next: MountEntry = { ...m, config: { ...m.config }, options: { ...m.options } };
    if (f.description !== undefined) next.description = String(f.description);
    const d = parseTtl(f.default_lease_ttl, 'default_lease_ttl');
    const x = parseTtl(f.max_lease_ttl, 'max_lease_ttl');
    Object.assign(next.config, checkTtls(d ?? m.config.default_lease_ttl, x ?? m.config.max_lease_ttl));
    if (f.token_type !== undefined) {
      const t = String(f.token_type);
      if (!TOKEN_TYPES.has(t)) throw new InvalidRequest(`invalid value for "token_type": ${t}`);
      if (m.type === 'token' && t !== 'default-service') throw new InvalidRequest('token_type cannot be set for the token auth method');
      next.config.token_type = t;
    }
    if (f.listing_visibility !== undefined) {
      const v = String(f.listing_visibility);
      if (!['', 'unauth', 'hidden'].includes(v)) throw new InvalidRequest(`invalid listing_visibility ${v}`);
      next.config.listing_visibility = v;
    }
    if (f.options && typeof f.options === 'object') {
      for (const [k, v] of Object.entries(f.options as Record<string, unknown>)) next.options[k] = String(v);
    }
    const { lastLsn } = await this.core.barrier.transaction((tx) => this.core.mounts.update(tx, next));
    await this.core.reloadMounts();
    return { status: 204, walLsn: lastLsn };
  }
}

/** Deletes every entry under `prefix`, replicated and local (a mount's data lives in both). */
async function clearPrefix(tx: BarrierTx, prefix: string): Promise<void> {
  for (const child of await tx.list(prefix)) {
    if (child.endsWith('/')) await clearPrefix(tx, prefix + child);
    else await tx.delete(prefix + child);
  }
  const clearLocal = async (p: string): Promise<void> => {
    for (const child of await tx.listLocal(p)) {
      if (child.endsWith('/')) await clearLocal(p + child);
      else await tx.deleteLocal(p + child);
    }
  };
  await clearLocal(prefix);
}

/** A TTL parameter: a duration, a number of seconds, or "system"/"" for the system default (0). */
function parseTtl(v: unknown, name: string): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (v === '' || v === 'system') return 0;
  try {
    const s = Math.floor(parseDurationSeconds(v as string | number));
    if (s < 0) throw new Error('cannot be negative');
    return s;
  } catch (err) {
    throw new InvalidRequest(`${name}: ${(err as Error).message}`);
  }
}

function checkTtls(def: number, max: number): { default_lease_ttl: number; max_lease_ttl: number } {
  if (def > 0 && max > 0 && def > max) throw new InvalidRequest('default_lease_ttl cannot be greater than max_lease_ttl');
  if (def > SYSTEM_MAX_TTL_SECONDS && max === 0) throw new InvalidRequest('default_lease_ttl cannot be greater than the system max lease TTL');
  return { default_lease_ttl: def, max_lease_ttl: max };
}


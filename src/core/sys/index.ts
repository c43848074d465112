/**
 * The logical part of the system backend (`sys/...` paths answered with the standard
 * envelope). The raw endpoints (init, seal, unseal, health, leader) are served by http/.
 */
import type { Core } from '../core';
import { InvalidRequest, NotFound } from '../errors';
import { describeMount, mountTuneView, normalizeMountPath, PROTECTED_MOUNTS, type MountEntry } from '../mounts';
import { openApiPaths, RouteTable, type RouteDef } from '../framework';
import { VERSION } from '../../version';
import { authRoutes } from './auth';
import { leasesRoutes } from './leases';
import { policyRoutes } from './policies';
import { wrappingRoutes } from './wrapping';
import type { LogicalResponse } from '../request';

const SUPPORTED_ENGINES = new Set(['kv']);

export class SysBackend {
  table: RouteTable;

  constructor(private readonly core: Core) {
    this.table = new RouteTable([...this.routeDefs(), ...policyRoutes(core), ...authRoutes(core), ...leasesRoutes(core), ...wrappingRoutes(core)]);
  }

  /** Routes contributed from outside core (replication), wired by the composition root. */
  addRoutes(defs: RouteDef[]): void {
    this.table = new RouteTable([...defs, ...this.table.defs]);
  }

  private routeDefs(): RouteDef[] {
    const mountFields = {
      type: { type: 'string', description: 'The type of the backend. Example: "kv"' },
      description: { type: 'string', description: 'User-friendly description for this mount.' },
      config: { type: 'map', description: 'Configuration for this mount, such as default_lease_ttl and max_lease_ttl.' },
      options: { type: 'map', description: 'The options to pass into the backend. Should be a json object with string keys and values.' },
      local: { type: 'bool', description: 'Mark the mount as a local mount, which is not replicated and is unaffected by replication.' },
      seal_wrap: { type: 'bool', description: 'Whether to turn on seal wrapping for the mount.' },
    } as const;
    return [
      { pattern: 'mounts', summary: 'List the currently mounted backends.', operations: { read: async () => ({ data: this.mountMap('secret') }) } },
      {
        pattern: 'mounts/:path+/tune',
        summary: 'Tune backend configuration parameters for this mount.',
        fields: { description: { type: 'string' }, default_lease_ttl: { type: 'duration' }, max_lease_ttl: { type: 'duration' }, options: { type: 'map' } },
        operations: {
          read: async (ctx) => ({ data: { ...mountTuneView(this.existingMount(ctx.params.path)) } }),
          update: async (ctx) => this.tuneMount(this.existingMount(ctx.params.path), ctx.fields),
        },
      },
      {
        pattern: 'mounts/:path+',
        summary: 'Mount a new backend at a new path.',
        fields: mountFields as never,
        operations: {
          read: async (ctx) => {
            const m = this.core.mounts.get('secret', normalizeMountPath(ctx.params.path));
            if (!m) throw new NotFound();
            return { data: describeMount(m) };
          },
          update: async (ctx) => this.enable(normalizeMountPath(ctx.params.path), ctx.fields),
          delete: async (ctx) => this.disable(normalizeMountPath(ctx.params.path), this.core.mounts.get('secret', normalizeMountPath(ctx.params.path))),
        },
      },
      { pattern: 'rotate', summary: 'Rotates the backend encryption key used to persist data.', sudo: true, operations: { update: () => this.rotate() } },
      { pattern: 'key-status', summary: 'Provides information about the backend encryption key.', operations: { read: async () => this.keyStatus() } },
      {
        pattern: 'internal/specs/openapi',
        summary: 'Generate an OpenAPI 3 document of all mounted paths.',
        unauthenticated: true,
        operations: { read: async () => ({ data: this.openApi() }) },
      },
      {
        pattern: 'internal/ui/mounts/:path*',
        summary: 'Information about a mount, for the CLI\'s KV preflight.',
        unauthenticated: true,
        operations: { read: async (ctx) => (ctx.params.path ? this.uiMount(ctx.params.path) : { data: { secret: this.mountMap('secret'), auth: this.mountMap('auth') } }) },
      },
    ];
  }

  /** The OpenAPI document, generated from the same route tables that validate requests. */
  private openApi(): Record<string, unknown> {
    let paths: Record<string, unknown> = {};
    for (const table of ['secret', 'auth'] as const) {
      for (const m of this.core.mounts.list(table)) {
        const routes = this.core.routesFor(m);
        if (routes) paths = { ...paths, ...openApiPaths(table === 'auth' ? `auth/${m.path}` : m.path, routes) };
      }
    }
    return {
      openapi: '3.0.2',
      info: { title: 'Coffer API', description: 'HTTP API that gives you full access to Coffer (Vault-compatible).', version: VERSION, license: { name: 'MPL-2.0' } },
      paths,
    };
  }

  private existingMount(path: string): MountEntry {
    const m = this.core.mounts.get('secret', normalizeMountPath(path));
    if (!m) throw new InvalidRequest(`cannot fetch sysview for path "${normalizeMountPath(path)}"`);
    return m;
  }

  private mountMap(table: 'secret' | 'auth'): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (const m of this.core.mounts.list(table)) out[m.path] = describeMount(m);
    return out;
  }

  private async enable(path: string, d: Record<string, unknown>): Promise<LogicalResponse> {
    const type = String(d.type ?? '');
    if (!type) throw new InvalidRequest('missing mount type');
    if (PROTECTED_MOUNTS.has(path)) throw new InvalidRequest(`cannot mount at protected path "${path}"`);
    let engine = type;
    const options: Record<string, string> = {};
    if (type === 'kv-v2') {
      engine = 'kv';
      options.version = '2';
    }
    if (!SUPPORTED_ENGINES.has(engine)) throw new InvalidRequest(`plugin not found in the catalog: ${type}`);
    const opts = (d.options ?? {}) as Record<string, unknown>;
    if (typeof opts !== 'object' || Array.isArray(opts)) throw new InvalidRequest('options must be a map');
    for (const [k, v] of Object.entries(opts)) options[k] = String(v);
    if (engine === 'kv') {
      options.version = options.version ?? '1';
      if (!['1', '2'].includes(options.version)) throw new InvalidRequest('kv version must be "1" or "2"');
    }
    const cfg = (d.config ?? {}) as Record<string, unknown>;
    const { lastLsn } = await this.core.barrier.transaction((tx) =>
      this.core.mounts.add(tx, {
        path,
        type: engine,
        description: String(d.description ?? ''),
        config: { default_lease_ttl: Number(cfg.default_lease_ttl ?? 0) || 0, max_lease_ttl: Number(cfg.max_lease_ttl ?? 0) || 0, force_no_cache: Boolean(cfg.force_no_cache) },
        options,
        local: d.local === true || d.local === 'true',
        seal_wrap: Boolean(d.seal_wrap),
        external_entropy_access: false,
        table: 'secret',
      }),
    );
    await this.core.reloadMounts();
    return { status: 204, walLsn: lastLsn };
  }

  private async disable(path: string, existing: MountEntry | undefined): Promise<LogicalResponse> {
    if (PROTECTED_MOUNTS.has(path)) throw new InvalidRequest(`cannot unmount "${path}"`);
    if (!existing) return { status: 204 };
    const { lastLsn } = await this.core.barrier.transaction((tx) => this.core.mounts.remove(tx, existing));
    await this.core.reloadMounts();
    return { status: 204, walLsn: lastLsn };
  }

  private async tuneMount(m: MountEntry, d: Record<string, unknown>): Promise<LogicalResponse> {
    const next: MountEntry = { ...m, config: { ...m.config }, options: { ...m.options } };
    if (d.description !== undefined) next.description = String(d.description);
    if (d.default_lease_ttl !== undefined) next.config.default_lease_ttl = Number(d.default_lease_ttl);
    if (d.max_lease_ttl !== undefined) next.config.max_lease_ttl = Number(d.max_lease_ttl);
    if (d.options && typeof d.options === 'object') {
      for (const [k, v] of Object.entries(d.options as Record<string, unknown>)) next.options[k] = String(v);
      if (m.type === 'kv' && m.options.version === '2' && next.options.version === '1') {
        throw new InvalidRequest('cannot downgrade a versioned K/V mount');
      }
    }
    const { lastLsn } = await this.core.barrier.transaction((tx) => this.core.mounts.update(tx, next));
    await this.core.reloadMounts();
    return { status: 204, walLsn: lastLsn };
  }

  private async rotate(): Promise<LogicalResponse> {
    await this.core.rotate();
    return { status: 204 };
  }

  private keyStatus(): LogicalResponse {
    const k = this.core.barrier.currentKeyring.active;
    return { data: { term: k.term, install_time: k.installedAt, encryptions: 0 } };
  }

  /** The CLI's KV preflight: which mount serves a path, and its type/options. */
  private uiMount(path: string): LogicalResponse {
    const route = this.core.mounts.route(path.endsWith('/') || !path ? path : path + '/') ?? this.core.mounts.route(path);
    if (!route || route.mount.table !== 'secret') throw new InvalidRequest(`preflight capability check returned 403, please ensure client's policies grant access to path "${path}/"`);
    return { data: { ...describeMount(route.mount), path: route.prefix } };
  }
}


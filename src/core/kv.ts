/**
 * The KV secrets engine, version 1 (plain key/value) and version 2 (versioned, with metadata,
 * check-and-set, soft delete, undelete and destroy), laid out as Vault documents it.
 *
 * v2 storage under the mount prefix:
 *   config                      engine-wide defaults
 *   metadata/<key>              versions, timestamps, custom metadata
 *   versions/<sha256(key)>/<n>  the data of version n (hashed so any key is one path segment)
 * Every change to one key is one read-modify-write of its metadata entry (StorageView.modify),
 * so concurrent writers get distinct versions and check-and-set is exact.
 */
import { createHash } from 'node:crypto';
import type { Barrier, BarrierTx, Modification, StorageView } from './barrier';
import type { Clock } from './clock';
import { CasMismatch, InvalidRequest, NotFound, UnsupportedMediaType, UnsupportedOperation, UnsupportedPath } from './errors';
import type { MountEntry } from './mounts';
import { mountStoragePrefix } from './mounts';
import type { LogicalResponse, RequestContext } from './request';
import { RouteTable, type RouteContext, type RouteDef } from './framework';
import type { VersionedRead } from './ports';

interface VersionMeta {
  created_time: string;
  deletion_time: string;
  destroyed: boolean;
}

interface KeyMetadata {
  created_time: string;
  updated_time: string;
  current_version: number;
  oldest_version: number;
  max_versions: number;
  cas_required: boolean;
  delete_version_after: string;
  custom_metadata: Record<string, string> | null;
  versions: Record<string, VersionMeta>;
}

interface EngineConfig {
  max_versions: number;
  cas_required: boolean;
  delete_version_after: string;
}

const DEFAULT_CONFIG: EngineConfig = { max_versions: 0, cas_required: false, delete_version_after: '0s' };
const VERSIONED_PATH_WARNING =
  'Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints to use. If using the Vault CLI, use \'vault kv get\' for this operation.';

export function isKvV2(m: MountEntry): boolean {
  return m.type === 'kv' && String(m.options?.version ?? '1') === '2';
}

/** The KV engine: one route table per mount, each over that mount's storage. */
export class KvEngine {
  private readonly tables = new Map<string, RouteTable>();

  constructor(
    private readonly barrier: Barrier,
    private readonly clock: Clock,
  ) {}

  /** The route table of one KV mount (v1 or v2), cached per mount. */
  routes(mount: MountEntry): RouteTable {
    const key = `${mount.uuid}:${isKvV2(mount) ? 2 : 1}:${mount.local}`;
    let t = this.tables.get(key);
    if (!t) {
      t = new KvMount(this.barrier.view(mount.local), this.clock, mount.local).routes(mountStoragePrefix(mount), isKvV2(mount));
      this.tables.set(key, t);
    }
    return t;
  }
}

class KvMount {
  constructor(
    private readonly store: StorageView,
    private readonly clock: Clock,
    /** Local storage has no one-statement read to prefetch. */
    private readonly local: boolean,
  ) {}

  routes(base: string, v2: boolean): RouteTable {
    return new RouteTable(v2 ? this.v2Routes(base) : this.v1Routes(base));
  }

  // ---------------------------------------------------------------- v1

  private v1Routes(base: string): RouteDef[] {
    const at = (ctx: RouteContext) => base + 'data/' + ctx.params.path;
    return [
      {
        pattern: ':path*',
        summary: 'Pass-through secret storage (KV version 1).',
        exists: async (ctx) => (await this.store.get(at(ctx))) !== null,
        prefetch: (ctx) => {
          const op = ctx.req.operation;
          if (this.local || !ctx.params.path || ctx.params.path.endsWith('/')) return null;
          if (op === 'read') return { path: at(ctx), prefix: null };
          return op === 'update' || op === 'delete' ? { versioned: [at(ctx)] } : null;
        },
        operations: {
          read: async (ctx) => {
            if (!ctx.params.path || ctx.params.path.endsWith('/')) throw new UnsupportedOperation();
            const data = await this.store.get<Record<string, unknown>>(at(ctx), ctx.prefetched);
            if (!data) throw new NotFound();
            return { data };
          },
          list: async (ctx) => {
            const keys = await this.store.list(at(ctx));
            if (keys.length === 0) throw new NotFound();
            return { data: { keys } };
          },
          update: async (ctx) => {
            if (!ctx.params.path || ctx.params.path.endsWith('/')) throw new InvalidRequest('missing key');
            if (Object.keys(ctx.req.data).length === 0) throw new InvalidRequest('no data provided');
            // A blind write (last writer wins, as in Vault), through the batched path: one
            // statement and one commit shared with concurrent writes, and no retry when
            // another writer got to the key first.
            const data = ctx.req.data;
            const { lastLsn } = await this.store.modify(at(ctx), [], async () => ({ result: undefined, anchor: data, blind: true }), ctx.prefetchedVersions);
            return { status: 204, walLsn: lastLsn };
          },
          delete: async (ctx) => {
            const { lastLsn } = await this.store.modify(at(ctx), [], async () => ({ result: undefined, anchor: null, blind: true }), ctx.prefetchedVersions);
            return { status: 204, walLsn: lastLsn };
          },
        },
      },
    ];
  }

  // ---------------------------------------------------------------- v2

  private v2Routes(base: string): RouteDef[] {
    const keyMetaExists = async (ctx: RouteContext) => (await this.store.get(this.metaPath(base, ctx.params.path))) !== null;
    const versionsOp = (op: 'delete' | 'undelete' | 'destroy', summary: string): RouteDef => ({
      pattern: `${op}/:path+`,
      summary,
      fields: { versions: { type: 'any', required: true, description: 'The versions to act on.' } },
      operations: { update: (ctx) => this.versionsOp(ctx, base, op, requireKey(ctx.params.path)) },
    });
    return [
      {
        pattern: 'config',
        summary: 'Configures settings for the KV store.',
        fields: {
          max_versions: { type: 'int', description: 'The number of versions to keep for each key.' },
          cas_required: { type: 'bool', description: 'If true, the backend requires the cas parameter on every write.' },
          delete_version_after: { type: 'string', description: 'If set, versions are deleted after this duration.' },
        },
        operations: { read: (ctx) => this.config(ctx, base), update: (ctx) => this.config(ctx, base) },
      },
      {
        pattern: 'data/:path+',
        summary: 'Write, Patch, Read, and Delete data in the Key-Value Store.',
        fields: {
          data: { type: 'map', description: 'The contents of the data map will be stored and returned on read.' },
          options: { type: 'map', description: 'Options for writing a KV entry (cas).' },
          version: { type: 'int', description: 'If provided during a read, the value at the version number will be returned.' },
        },
        exists: keyMetaExists,
        prefetch: (ctx) => {
          const key = ctx.params.path;
          const op = ctx.req.operation;
          if (this.local || !key || key.endsWith('/')) return null;
          if (op === 'read') return { path: this.metaPath(base, key), prefix: this.versionsPrefix(base, key) };
          // What modifyKey reads first: the key's metadata and the engine config.
          return op === 'update' || op === 'patch' || op === 'delete' ? { versioned: [this.metaPath(base, key), base + 'config'] } : null;
        },
        operations: {
          read: (ctx) => this.data(ctx, base, requireKey(ctx.params.path)),
          update: (ctx) => this.data(ctx, base, requireKey(ctx.params.path)),
          patch: (ctx) => this.data(ctx, base, requireKey(ctx.params.path)),
          delete: (ctx) => this.data(ctx, base, requireKey(ctx.params.path)),
        },
      },
      {
        pattern: 'metadata/:path*',
        summary: 'Configures settings for the KV store.',
        fields: {
          max_versions: { type: 'int', description: 'The number of versions to keep.' },
          cas_required: { type: 'bool', description: 'If true the key will require the cas parameter to be set on all write requests.' },
          delete_version_after: { type: 'string', description: 'The length of time before a version is deleted.' },
          custom_metadata: { type: 'any', description: 'User-provided key-value pairs that are used to describe arbitrary and version-agnostic information about a secret.' },
        },
        exists: keyMetaExists,
        operations: {
          read: (ctx) => this.metadata(ctx, base, ctx.params.path),
          list: (ctx) => this.metadata(ctx, base, ctx.params.path),
          update: (ctx) => this.metadata(ctx, base, ctx.params.path),
          patch: (ctx) => this.metadata(ctx, base, ctx.params.path),
          delete: (ctx) => this.metadata(ctx, base, ctx.params.path),
        },
      },
      versionsOp('delete', 'Marks one or more versions as deleted in the KV store.'),
      versionsOp('undelete', 'Undeletes one or more versions from the KV store.'),
      versionsOp('destroy', 'Permanently removes one or more versions in the KV store.'),
      {
        pattern: 'subkeys/:path+',
        summary: 'Read the structure of a secret entry from the Key-Value store with the values removed.',
        fields: { version: { type: 'int' }, depth: { type: 'int' } },
        operations: { read: (ctx) => this.subkeys(ctx, base, requireKey(ctx.params.path)) },
      },
      {
        // Anything else on a v2 mount: Vault answers 404 with this warning.
        pattern: ':path*',
        summary: 'Paths outside the versioned K/V API.',
        operations: Object.fromEntries(
          (['read', 'list', 'update', 'delete', 'patch'] as const).map((op) => [op, async () => ({ status: 404, data: null, warnings: [VERSIONED_PATH_WARNING] })]),
        ),
      },
    ];
  }

  private async engineConfig(base: string, tx?: BarrierTx): Promise<EngineConfig> {
    const c = tx ? await tx.get<EngineConfig>(base + 'config') : await this.store.get<EngineConfig>(base + 'config');
    return { ...DEFAULT_CONFIG, ...(c ?? {}) };
  }

  private async config(ctx: RequestContext, base: string): Promise<LogicalResponse> {
    const op = ctx.req.operation;
    if (op === 'read') return { data: { ...(await this.engineConfig(base)) } };
    if (op !== 'create' && op !== 'update') throw new UnsupportedOperation();
    const d = ctx.req.data;
    const { lastLsn } = await this.store.transaction(async (tx) => {
      const cur = await this.engineConfig(base, tx);
      if (d.max_versions !== undefined) cur.max_versions = nonNegInt(d.max_versions, 'max_versions');
      if (d.cas_required !== undefined) cur.cas_required = bool(d.cas_required, 'cas_required');
      if (d.delete_version_after !== undefined) cur.delete_version_after = String(d.delete_version_after);
      await tx.put(base + 'config', cur);
    });
    return { status: 204, walLsn: lastLsn };
  }

  private metaPath(base: string, key: string): string {
    return `${base}metadata/${key}`;
  }

  private versionsPrefix(base: string, key: string): string {
    return `${base}versions/${keyHash(key)}/`;
  }

  /** Zero-padded so path order is version order (the latest version is the last path). */
  private versionPath(base: string, key: string, n: number): string {
    return this.versionsPrefix(base, key) + String(n).padStart(20, '0');
  }

  private async data(ctx: RequestContext, base: string, key: string): Promise<LogicalResponse> {
    const { req } = ctx;
    switch (req.operation) {
      case 'read': {
        // One round trip for the common case: the metadata and the newest stored version.
        const { value: meta, last } = await this.store.getWithLast<KeyMetadata, Record<string, unknown>>(this.metaPath(base, key), this.versionsPrefix(base, key), ctx.prefetched);
        if (!meta) throw new NotFound();
        const n = req.query.version && req.query.version !== '0' ? positiveInt(req.query.version, 'version') : meta.current_version;
        const vm = meta.versions[String(n)];
        if (!vm) throw new NotFound();
        const metadata = versionResponse(meta, n, vm);
        if (vm.deletion_time || vm.destroyed) return { status: 404, data: { data: null, metadata } };
        const path = this.versionPath(base, key, n);
        const data = last?.path === path ? last.value : await this.store.get<Record<string, unknown>>(path);
        return { data: { data: data ?? null, metadata } };
      }
      case 'create':
      case 'update': {
        const body = req.data.data;
        if (!isObject(body)) throw new InvalidRequest('no data provided');
        const cas = isObject(req.data.options) && req.data.options.cas !== undefined ? nonNegInt(req.data.options.cas, 'cas') : undefined;
        return this.writeVersion(base, key, () => body, cas, false, ctx.prefetchedVersions);
      }
      case 'patch': {
        if (!String(req.headers['content-type'] ?? '').startsWith('application/merge-patch+json')) {
          throw new UnsupportedMediaType('PATCH requires Content-Type: application/merge-patch+json');
        }
        const patch = req.data.data;
        if (!isObject(patch)) throw new InvalidRequest('no data provided');
        const cas = isObject(req.data.options) && req.data.options.cas !== undefined ? nonNegInt(req.data.options.cas, 'cas') : undefined;
        return this.writeVersion(base, key, (current) => {
          if (!current) throw new NotFound();
          return mergePatch(current, patch) as Record<string, unknown>;
        }, cas, true, ctx.prefetchedVersions);
      }
      case 'delete': {
        const { lastLsn } = await this.modifyKey(base, key, async (meta) => {
          const vm = meta?.versions[String(meta.current_version)];
          if (!meta || !vm || vm.deletion_time || vm.destroyed) return { result: undefined };
          vm.deletion_time = this.now();
          meta.updated_time = vm.deletion_time;
          return { result: undefined, anchor: meta };
        }, ctx.prefetchedVersions);
        return { status: 204, walLsn: lastLsn };
      }
      default:
        throw new UnsupportedOperation();
    }
  }

  /**
   * Every change to one key is a read-modify-write of its metadata (StorageView.modify): the
   * metadata entry is the anchor, so concurrent writers of a key get distinct versions and
   * check-and-set is exact. `compute` may run more than once; it must only compute.
   */
  private modifyKey<R>(
    base: string,
    key: string,
    compute: (meta: KeyMetadata | null, cfg: EngineConfig) => Promise<Modification<R>>,
    prefetched?: VersionedRead | null,
  ): Promise<{ result: R; lastLsn: number }> {
    return this.store.modify(
      this.metaPath(base, key),
      [base + 'config'],
      ([meta, cfg]) => compute(meta as KeyMetadata | null, { ...DEFAULT_CONFIG, ...((cfg as EngineConfig | null) ?? {}) }),
      prefetched,
    );
  }

  /** Adds a version computed from the current one, honouring cas and max_versions. */
  private async writeVersion(
    base: string,
    key: string,
    next: (current: Record<string, unknown> | null) => Record<string, unknown>,
    cas: number | undefined,
    needsCurrent = false,
    prefetched?: VersionedRead | null,
  ): Promise<LogicalResponse> {
    const { result, lastLsn } = await this.modifyKey(base, key, async (storedMeta, cfg) => {
      const now = this.now();
      const meta: KeyMetadata = storedMeta ?? {
        created_time: now,
        updated_time: now,
        current_version: 0,
        oldest_version: 0,
        max_versions: 0,
        cas_required: false,
        delete_version_after: '0s',
        custom_metadata: null,
        versions: {},
      };
      if ((meta.cas_required || cfg.cas_required) && cas === undefined) {
        throw new InvalidRequest('check-and-set parameter required for this call');
      }
      if (cas !== undefined && cas !== meta.current_version) throw new CasMismatch();
      let current: Record<string, unknown> | null = null;
      if (needsCurrent) {
        const vm = meta.versions[String(meta.current_version)];
        if (vm && !vm.deletion_time && !vm.destroyed) current = await this.store.get(this.versionPath(base, key, meta.current_version));
      }
      const data = next(current);
      const n = meta.current_version + 1;
      meta.current_version = n;
      meta.updated_time = now;
      if (meta.oldest_version === 0) meta.oldest_version = 1;
      meta.versions[String(n)] = { created_time: now, deletion_time: '', destroyed: false };
      // Prune beyond max_versions (key setting, else engine setting, else Vault's default 10).
      const max = meta.max_versions || cfg.max_versions || 10;
      const deletes: string[] = [];
      while (n - meta.oldest_version + 1 > max) {
        delete meta.versions[String(meta.oldest_version)];
        deletes.push(this.versionPath(base, key, meta.oldest_version));
        meta.oldest_version += 1;
      }
      // The new version, the pruned ones and the metadata in one statement (each with its WAL row).
      return { result: versionResponse(meta, n, meta.versions[String(n)]), anchor: meta, puts: [[this.versionPath(base, key, n), data]], deletes };
    }, prefetched);
    return { data: result, walLsn: lastLsn };
  }

  private async metadata(ctx: RequestContext, base: string, key: string): Promise<LogicalResponse> {
    const { req } = ctx;
    if (req.operation === 'list') {
      const keys = await this.store.list(`${base}metadata/${key}`);
      if (keys.length === 0) throw new NotFound();
      return { data: { keys } };
    }
    requireKey(key);
    const metaPath = this.metaPath(base, key);
    switch (req.operation) {
      case 'read': {
        const meta = await this.store.get<KeyMetadata>(metaPath);
        if (!meta) throw new NotFound();
        return { data: { ...meta, custom_metadata: meta.custom_metadata } };
      }
      case 'create':
      case 'update':
      case 'patch': {
        const d = req.data;
        const { lastLsn } = await this.modifyKey(base, key, async (stored) => {
          const now = this.now();
          const meta: KeyMetadata = stored ?? {
            created_time: now, updated_time: now, current_version: 0, oldest_version: 0, max_versions: 0,
            cas_required: false, delete_version_after: '0s', custom_metadata: null, versions: {},
          };
          if (d.max_versions !== undefined) meta.max_versions = nonNegInt(d.max_versions, 'max_versions');
          if (d.cas_required !== undefined) meta.cas_required = bool(d.cas_required, 'cas_required');
          if (d.delete_version_after !== undefined) meta.delete_version_after = String(d.delete_version_after);
          if (d.custom_metadata !== undefined) {
            if (d.custom_metadata !== null && !isObject(d.custom_metadata)) throw new InvalidRequest('custom_metadata must be a map of strings');
            const cm = (d.custom_metadata ?? {}) as Record<string, unknown>;
            const merged: Record<string, string> = req.operation === 'patch' ? { ...(meta.custom_metadata ?? {}) } : {};
            for (const [k, v] of Object.entries(cm)) {
              if (v === null && req.operation === 'patch') delete merged[k];
              else merged[k] = String(v);
            }
            meta.custom_metadata = merged;
          }
          meta.updated_time = now;
          return { result: undefined, anchor: meta };
        });
        return { status: 204, walLsn: lastLsn };
      }
      case 'delete': {
        const { lastLsn } = await this.modifyKey(base, key, async (meta) => {
          if (!meta) return { result: undefined };
          return { result: undefined, anchor: null, deletes: Object.keys(meta.versions).map((n) => this.versionPath(base, key, Number(n))) };
        });
        return { status: 204, walLsn: lastLsn };
      }
      default:
        throw new UnsupportedOperation();
    }
  }

  private async versionsOp(ctx: RequestContext, base: string, op: 'delete' | 'undelete' | 'destroy', key: string): Promise<LogicalResponse> {
    const raw = ctx.req.data.versions;
    const list = Array.isArray(raw) ? raw : typeof raw === 'string' ? raw.split(',') : raw === undefined ? [] : [raw];
    const versions = list.map((v) => positiveInt(v, 'versions'));
    if (versions.length === 0) throw new InvalidRequest('no versions provided');
    const { lastLsn } = await this.modifyKey(base, key, async (meta) => {
      if (!meta) return { result: undefined };
      const now = this.now();
      const deletes: string[] = [];
      for (const n of versions) {
        const vm = meta.versions[String(n)];
        if (!vm || vm.destroyed) continue;
        if (op === 'delete' && !vm.deletion_time) vm.deletion_time = now;
        if (op === 'undelete') vm.deletion_time = '';
        if (op === 'destroy') {
          vm.destroyed = true;
          deletes.push(this.versionPath(base, key, n));
        }
      }
      meta.updated_time = now;
      return { result: undefined, anchor: meta, deletes: [...new Set(deletes)] };
    });
    return { status: 204, walLsn: lastLsn };
  }

  private async subkeys(ctx: RequestContext, base: string, key: string): Promise<LogicalResponse> {
    const meta = await this.store.get<KeyMetadata>(this.metaPath(base, key));
    if (!meta) throw new NotFound();
    const n = ctx.req.query.version && ctx.req.query.version !== '0' ? positiveInt(ctx.req.query.version, 'version') : meta.current_version;
    const vm = meta.versions[String(n)];
    if (!vm) throw new NotFound();
    const metadata = versionResponse(meta, n, vm);
    if (vm.deletion_time || vm.destroyed) return { status: 404, data: { subkeys: null, metadata } };
    const depth = ctx.req.query.depth ? nonNegInt(ctx.req.query.depth, 'depth') : 0;
    const data = (await this.store.get<Record<string, unknown>>(this.versionPath(base, key, n))) ?? {};
    return { data: { subkeys: subkeysOf(data, depth, 1), metadata } };
  }

  private now(): string {
    return this.clock.now().toISOString();
  }
}

/**
 * sha256(key) in hex, remembered for recently used keys: a read needs it three times (plan,
 * read, version path). Keys are paths, not secrets.
 */
const keyHashes = new Map<string, string>();
function keyHash(key: string): string {
  let h = keyHashes.get(key);
  if (h === undefined) {
    h = createHash('sha256').update(key).digest('hex');
    if (keyHashes.size >= 10_000) keyHashes.clear();
    keyHashes.set(key, h);
  }
  return h;
}

function versionResponse(meta: KeyMetadata, n: number, vm: VersionMeta) {
  return {
    created_time: vm.created_time,
    custom_metadata: meta.custom_metadata,
    deletion_time: vm.deletion_time,
    destroyed: vm.destroyed,
    version: n,
  };
}

function subkeysOf(v: Record<string, unknown>, maxDepth: number, depth: number): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [k, child] of Object.entries(v)) {
    out[k] = isObject(child) && (maxDepth === 0 || depth < maxDepth) ? subkeysOf(child, maxDepth, depth + 1) : null;
  }
  return out;
}

/** RFC 7386 JSON merge patch. */
export function mergePatch(target: unknown, patch: unknown): unknown {
  if (!isObject(patch)) return patch;
  const out: Record<string, unknown> = isObject(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    else out[k] = mergePatch(out[k], v);
  }
  return out;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function requireKey(key: string): string {
  if (!key || key.endsWith('/')) throw new UnsupportedPath('missing or invalid key');
  return key;
}

function nonNegInt(v: unknown, name: string): number {
  const n = typeof v === 'string' && v.trim() !== '' ? Number(v) : v;
  if (typeof n !== 'number' || !Number.isInteger(n) || n < 0) throw new InvalidRequest(`${name} must be a non-negative integer`);
  return n;
}

function positiveInt(v: unknown, name: string): number {
  const n = nonNegInt(v, name);
  if (n === 0) throw new InvalidRequest(`${name} must be a positive integer`);
  return n;
}

function bool(v: unknown, name: string): boolean {
  if (typeof v === 'boolean') return v;
  if (v === 'true' || v === '1' || v === 1) return true;
  if (v === 'false' || v === '0' || v === 0) return false;
  throw new InvalidRequest(`${name} must be a boolean`);
}

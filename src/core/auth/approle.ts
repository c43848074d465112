/**
 * The AppRole auth method.
 *
 * Storage under the mount's prefix (replicated unless noted):
 *   salt                                   the mount's HMAC key for the role-id index
 *   role/<name>                            the role, with its own HMAC key for secret IDs
 *   role-id/<hmac(salt, role_id)>          → role name (the login lookup)
 *   secret-id/<name>/<hmac(role key, id)>  one secret ID: uses left, expiry, metadata, CIDRs
 *   secret-id-accessor/<name>/<accessor>   → the secret ID's HMAC (lookup/destroy by accessor)
 * Roles created with `local_secret_ids` keep the last two in local (never replicated) storage.
 *
 * Neither a secret ID nor a role ID is stored in the clear, not even inside the encrypted
 * values: storage paths are plaintext in Postgres, and a database dump must not yield a
 * credential. Every read-modify-write runs in one barrier transaction under `tx.lock` of the
 * key it changes, so concurrent logins with a limited-use secret ID consume distinct uses.
 */
import { createHmac, randomBytes, randomUUID } from 'node:crypto';
import type { BarrierTx } from '../barrier';
import { InvalidRequest, NotFound } from '../errors';
import { PerMountBackend } from './per-mount';
import type { FieldSchema, RouteContext, RouteDef } from '../framework';
import { SYSTEM_MAX_TTL_SECONDS } from '../leases';
import { mountStoragePrefix, type MountEntry } from '../mounts';
import type { LogicalResponse } from '../request';
import { issueAuth } from './issue';
import { addrAllowed, aliasFields, applyTokenFields, cidrSubset, defaultTokenParams, loginIssueParams, mountDisplayPrefix, TOKEN_FIELDS, tokenData, validateCidrs, type Aliases, type TokenParams } from './token-params';

interface RoleEntry extends TokenParams {
  name: string;
  role_id: string;
  /** Per-role HMAC key (base64) for secret IDs. */
  hmac_key: string;
  bind_secret_id: boolean;
  secret_id_bound_cidrs: string[];
  secret_id_num_uses: number;
  secret_id_ttl: number;
  local_secret_ids: boolean;
  legacy: (keyof TokenParams)[];
}

interface SecretIdEntry {
  secret_id_accessor: string;
  secret_id_num_uses: number;
  secret_id_ttl: number;
  creation_time: string;
  /** Go's zero time when the secret ID never expires, as Vault reports it. */
  expiration_time: string;
  last_updated_time: string;
  metadata: Record<string, string>;
  cidr_list: string[];
  token_bound_cidrs: string[];
}

const ZERO_TIME = '0001-01-01T00:00:00Z';
/** Vault's answer for an unknown role ID, unknown or expired secret ID alike (no oracle). */
const BAD_CREDENTIALS = 'invalid role or secret ID';
const ALIASES: Aliases = { policies: 'token_policies', period: 'token_period' };
const LEGACY_NAME: Partial<Record<keyof TokenParams, string>> = Object.fromEntries(Object.entries(ALIASES).map(([k, v]) => [v, k]));

/** Reads and writes of secret-ID entries, in replicated or local storage depending on the role. */
interface SidStore {
  get<T>(path: string): Promise<T | null>;
  put(path: string, v: unknown): Promise<void>;
  delete(path: string): Promise<void>;
  list(prefix: string): Promise<string[]>;
}

function sidStore(tx: BarrierTx, role: RoleEntry): SidStore {
  return role.local_secret_ids
    ? { get: (p) => tx.getLocal(p), put: (p, v) => tx.putLocal(p, v), delete: (p) => tx.deleteLocal(p), list: (p) => tx.listLocal(p) }
    : { get: (p) => tx.get(p), put: (p, v) => tx.put(p, v), delete: async (p) => void (await tx.delete(p)), list: (p) => tx.list(p) };
}

function hmacHex(keyB64: string, value: string): string {
  return createHmac('sha256', Buffer.from(keyB64, 'base64')).update(value).digest('hex');
}

export class AppRoleBackend extends PerMountBackend {
  private get barrier() {
    return this.core.barrier;
  }

  protected routeDefs(mount: MountEntry): RouteDef[] {
    const b = new Paths(mountStoragePrefix(mount));
    const secretIdFields: Record<string, FieldSchema> = {
      metadata: { type: 'any', description: 'Metadata to be tied to the SecretID, as a JSON-formatted string of string keys and values.' },
      cidr_list: { type: 'strings', description: 'Comma separated string or list of CIDR blocks enforcing secret IDs to be used from specific set of IP addresses.' },
      token_bound_cidrs: { type: 'strings', description: 'Comma separated string or list of CIDR blocks. If set, specifies the blocks of IP addresses which can use the returned token.' },
      num_uses: { type: 'int', description: 'Number of times this SecretID can be used, after which the SecretID expires.' },
      ttl: { type: 'duration', description: 'Duration in seconds after which this SecretID expires.' },
    };
    const accessorField = { secret_id_accessor: { type: 'string', description: 'Accessor of the SecretID' } } as const;
    const secretIdField = { secret_id: { type: 'string', description: 'SecretID attached to the role.' } } as const;
    return [
      {
        pattern: 'role',
        summary: 'Lists all the roles registered with the backend.',
        operations: {
          list: async () => {
            const keys = await this.barrier.list(b.roleDir);
            if (keys.length === 0) throw new NotFound();
            return { data: { keys } };
          },
        },
      },
      {
        pattern: 'role/:role_name',
        summary: 'Register an role with the backend.',
        fields: {
          bind_secret_id: { type: 'bool', description: "Impose secret_id to be presented when logging in using this role. Defaults to 'true'." },
          secret_id_bound_cidrs: { type: 'strings', description: 'Comma separated string or list of CIDR blocks. If set, specifies the blocks of IP addresses which can perform the login operation.' },
          secret_id_num_uses: { type: 'int', description: 'Number of times a SecretID can access the role, after which the SecretID will expire.' },
          secret_id_ttl: { type: 'duration', description: 'Duration in seconds after which the issued SecretID should expire.' },
          role_id: { type: 'string', description: 'Identifier of the role. Defaults to a UUID.' },
          local_secret_ids: { type: 'bool', description: 'If set, the secret IDs generated using this role will be cluster local.' },
          ...TOKEN_FIELDS,
          ...aliasFields(ALIASES),
        },
        exists: async (ctx) => (await this.barrier.get(b.role(roleName(ctx)))) !== null,
        operations: {
          read: async (ctx) => ({ data: roleView(await this.mustRole(b, roleName(ctx), () => new NotFound())) }),
          update: (ctx) => this.writeRole(b, roleName(ctx), ctx.fields),
          delete: (ctx) => this.deleteRole(b, roleName(ctx)),
        },
      },
      {
        pattern: 'role/:role_name/role-id',
        summary: 'Returns the role ID of the role, or sets a custom one.',
        fields: { role_id: { type: 'string', description: 'Identifier of the role.' } },
        operations: {
          read: async (ctx) => ({ data: { role_id: (await this.mustRole(b, roleName(ctx), () => new NotFound())).role_id } }),
          update: async (ctx) => {
            if (!String(ctx.fields.role_id ?? '').trim()) throw new InvalidRequest('missing role_id');
            return this.writeRole(b, roleName(ctx), { role_id: ctx.fields.role_id }, { mustExist: true });
          },
        },
      },
      {
        pattern: 'role/:role_name/secret-id',
        summary: 'Generate a SecretID against this role, or list the accessors of its SecretIDs.',
        fields: secretIdFields,
        operations: {
          update: (ctx) => this.createSecretId(mount, b, roleName(ctx), randomUUID(), ctx.fields),
          list: (ctx) => this.listAccessors(b, roleName(ctx)),
        },
      },
      {
        pattern: 'role/:role_name/custom-secret-id',
        summary: 'Assign a SecretID of choice against the role.',
        fields: { ...secretIdFields, ...secretIdField },
        operations: {
          update: (ctx) => {
            const id = String(ctx.fields.secret_id ?? '').trim();
            if (!id) throw new InvalidRequest('missing secret_id');
            return this.createSecretId(mount, b, roleName(ctx), id, ctx.fields);
          },
        },
      },
      {
        pattern: 'role/:role_name/secret-id/lookup',
        summary: 'Read the properties of a secret ID.',
        fields: secretIdField,
        operations: { update: (ctx) => this.lookupSecretId(b, roleName(ctx), { secretId: required(ctx, 'secret_id') }) },
      },
      {
        pattern: 'role/:role_name/secret-id/destroy',
        summary: 'Invalidate a secret ID.',
        fields: secretIdField,
        operations: {
          update: (ctx) => this.destroySecretId(b, roleName(ctx), { secretId: required(ctx, 'secret_id') }),
          delete: (ctx) => this.destroySecretId(b, roleName(ctx), { secretId: required(ctx, 'secret_id') }),
        },
      },
      {
        pattern: 'role/:role_name/secret-id-accessor/lookup',
        summary: 'Read the properties of a secret ID by its accessor.',
        fields: accessorField,
        operations: { update: (ctx) => this.lookupSecretId(b, roleName(ctx), { accessor: required(ctx, 'secret_id_accessor') }) },
      },
      {
        pattern: 'role/:role_name/secret-id-accessor/destroy',
        summary: 'Invalidate a secret ID by its accessor.',
        fields: accessorField,
        operations: {
          update: (ctx) => this.destroySecretId(b, roleName(ctx), { accessor: required(ctx, 'secret_id_accessor') }),
          delete: (ctx) => this.destroySecretId(b, roleName(ctx), { accessor: required(ctx, 'secret_id_accessor') }),
        },
      },
      {
        pattern: 'login',
        summary: 'Issue a token based on the credentials supplied.',
        unauthenticated: true,
        fields: {
          role_id: { type: 'string', description: 'Unique identifier of the Role.' },
          secret_id: { type: 'string', description: 'SecretID belonging to the App role.' },
        },
        operations: { update: (ctx) => this.login(mount, b, ctx) },
      },
    ];
  }

  private async mustRole(b: Paths, name: string, missing: () => Error, tx?: BarrierTx): Promise<RoleEntry> {
    const role = tx ? await tx.get<RoleEntry>(b.role(name)) : await this.barrier.get<RoleEntry>(b.role(name));
    if (!role) throw missing();
    return role;
  }

  // ------------------------------------------------------------------------------- roles

  private async writeRole(b: Paths, name: string, f: Record<string, any>, o: { mustExist?: boolean } = {}): Promise<LogicalResponse> {
    const { lastLsn } = await this.barrier.transaction(async (tx) => {
      await tx.lock(b.role(name));
      const cur = await tx.get<RoleEntry>(b.role(name));
      if (!cur && o.mustExist) throw new InvalidRequest(`role "${name}" does not exist`);
      const next: RoleEntry = cur
        ? { ...cur, legacy: [...cur.legacy] }
        : {
            ...defaultTokenParams(),
            name,
            role_id: randomUUID(),
            hmac_key: randomBytes(32).toString('base64'),
            bind_secret_id: true,
            secret_id_bound_cidrs: [],
            secret_id_num_uses: 0,
            secret_id_ttl: 0,
            local_secret_ids: Boolean(f.local_secret_ids),
            legacy: [],
          };
      if (cur && f.local_secret_ids !== undefined && f.local_secret_ids !== cur.local_secret_ids) {
        throw new InvalidRequest('local_secret_ids can only be modified during role creation');
      }
      const { usedLegacy, setModern } = applyTokenFields(next, f, ALIASES);
      next.legacy = [...new Set([...next.legacy.filter((k) => !setModern.has(k)), ...usedLegacy])];
      if (f.role_id !== undefined) next.role_id = String(f.role_id).trim();
      if (!next.role_id) throw new InvalidRequest('invalid role_id supplied, or failed to generate a role_id');
      if (f.bind_secret_id !== undefined) next.bind_secret_id = f.bind_secret_id;
      if (f.secret_id_bound_cidrs !== undefined) next.secret_id_bound_cidrs = validateCidrs(f.secret_id_bound_cidrs, 'secret_id_bound_cidrs');
      if (f.secret_id_num_uses !== undefined) {
        if (f.secret_id_num_uses < 0) throw new InvalidRequest('secret_id_num_uses cannot be negative');
        next.secret_id_num_uses = f.secret_id_num_uses;
      }
      if (f.secret_id_ttl !== undefined) next.secret_id_ttl = f.secret_id_ttl;
      if (!next.bind_secret_id && next.secret_id_bound_cidrs.length === 0 && next.token_bound_cidrs.length === 0) {
        throw new InvalidRequest('at least one constraint should be enabled on the role');
      }
      // The role-id index: unique across the mount, moved when the role ID changes.
      const salt = await this.mountSalt(tx, b);
      await tx.lock(b.roleIdDir);
      const idx = b.roleId(salt, next.role_id);
      const owner = await tx.get<{ name: string }>(idx);
      if (owner && owner.name !== name) throw new InvalidRequest('role_id already in use');
      if (cur && cur.role_id !== next.role_id) await tx.delete(b.roleId(salt, cur.role_id));
      if (!owner) await tx.put(idx, { name });
      await tx.put(b.role(name), next);
    });
    return { status: 204, walLsn: lastLsn };
  }

  /** The mount's HMAC key for role IDs, created with the first role. */
  private async mountSalt(tx: BarrierTx, b: Paths): Promise<string> {
    await tx.lock(b.salt);
    const cur = await tx.get<{ key: string }>(b.salt);
    if (cur) return cur.key;
    const key = randomBytes(32).toString('base64');
    await tx.put(b.salt, { key });
    return key;
  }

  private async deleteRole(b: Paths, name: string): Promise<LogicalResponse> {
    const { lastLsn } = await this.barrier.transaction(async (tx) => {
      await tx.lock(b.role(name));
      const role = await tx.get<RoleEntry>(b.role(name));
      if (!role) return;
      const s = sidStore(tx, role);
      for (const h of await s.list(b.secretIdDir(name))) {
        // Under each secret ID's lock, so a login consuming a use cannot write it back.
        await tx.lock(b.secretIdDir(name) + h);
        await s.delete(b.secretIdDir(name) + h);
      }
      for (const a of await s.list(b.accessorDir(name))) await s.delete(b.accessorDir(name) + a);
      const salt = await tx.get<{ key: string }>(b.salt);
      if (salt) await tx.delete(b.roleId(salt.key, role.role_id));
      await tx.delete(b.role(name));
    });
    return { status: 204, walLsn: lastLsn };
  }

  // ------------------------------------------------------------------------ secret IDs

  private async createSecretId(mount: MountEntry, b: Paths, name: string, secretId: string, f: Record<string, any>): Promise<LogicalResponse> {
    const metadata = parseMetadata(f.metadata);
    const mountMax = this.current(mount).config.max_lease_ttl || SYSTEM_MAX_TTL_SECONDS;
    const { result, lastLsn } = await this.barrier.transaction(async (tx) => {
      await tx.lock(b.role(name));
      const role = await this.mustRole(b, name, () => new InvalidRequest(`role "${name}" does not exist`), tx);
      if (!role.bind_secret_id) throw new InvalidRequest('bind_secret_id is not set on the role');
      const cidrList = validateCidrs(f.cidr_list ?? [], 'cidr_list');
      if (!cidrSubset(cidrList, role.secret_id_bound_cidrs)) {
        throw new InvalidRequest(`failed to verify the CIDR restrictions set on the secret ID: CIDR blocks on the secret ID are not a subset of those on the role`);
      }
      const tokenCidrs = validateCidrs(f.token_bound_cidrs ?? [], 'token_bound_cidrs');
      if (!cidrSubset(tokenCidrs, role.token_bound_cidrs)) {
        throw new InvalidRequest('failed to verify the token bound CIDR restrictions set on the secret ID: not a subset of those on the role');
      }
      const numUses: number = f.num_uses ?? role.secret_id_num_uses;
      if (numUses < 0) throw new InvalidRequest('num_uses cannot be negative');
      if (role.secret_id_num_uses > 0 && (numUses === 0 || numUses > role.secret_id_num_uses)) {
        throw new InvalidRequest("num_uses cannot be higher than the role's secret_id_num_uses");
      }
      let ttl: number = f.ttl ?? role.secret_id_ttl;
      if (ttl < 0) throw new InvalidRequest('ttl cannot be negative');
      if (role.secret_id_ttl > 0 && (ttl === 0 || ttl > role.secret_id_ttl)) throw new InvalidRequest("ttl cannot be longer than the role's secret_id_ttl");
      // Vault caps a secret ID's life at the mount's max lease TTL.
      if (ttl > mountMax) ttl = mountMax;

      const s = sidStore(tx, role);
      const h = hmacHex(role.hmac_key, secretId);
      await tx.lock(b.secretId(name, h));
      if (await s.get(b.secretId(name, h))) throw new InvalidRequest('SecretID is already registered');
      const now = this.core.opts.clock.now();
      const entry: SecretIdEntry = {
        secret_id_accessor: randomUUID(),
        secret_id_num_uses: numUses,
        secret_id_ttl: ttl,
        creation_time: now.toISOString(),
        expiration_time: ttl > 0 ? new Date(now.getTime() + ttl * 1000).toISOString() : ZERO_TIME,
        last_updated_time: now.toISOString(),
        metadata,
        cidr_list: cidrList,
        token_bound_cidrs: tokenCidrs,
      };
      await s.put(b.accessor(name, entry.secret_id_accessor), { secret_id_hmac: h });
      await s.put(b.secretId(name, h), entry);
      return entry;
    });
    return {
      data: { secret_id: secretId, secret_id_accessor: result.secret_id_accessor, secret_id_ttl: result.secret_id_ttl, secret_id_num_uses: result.secret_id_num_uses },
      walLsn: lastLsn,
    };
  }

  private async listAccessors(b: Paths, name: string): Promise<LogicalResponse> {
    const role = await this.mustRole(b, name, () => new InvalidRequest(`role "${name}" does not exist`));
    const keys = role.local_secret_ids ? await this.barrier.listLocal(b.accessorDir(name)) : await this.barrier.list(b.accessorDir(name));
    if (keys.length === 0) throw new NotFound();
    return { data: { keys } };
  }

  /** The HMAC of a secret ID, given either the ID or its accessor; null if the accessor is unknown. */
  private async resolveHmac(s: SidStore, b: Paths, role: RoleEntry, by: { secretId?: string; accessor?: string }): Promise<string | null> {
    if (by.secretId !== undefined) return hmacHex(role.hmac_key, by.secretId);
    const a = await s.get<{ secret_id_hmac: string }>(b.accessor(role.name, by.accessor!));
    return a?.secret_id_hmac ?? null;
  }

  private async lookupSecretId(b: Paths, name: string, by: { secretId?: string; accessor?: string }): Promise<LogicalResponse> {
    // A transaction only for a consistent pair of reads (accessor → entry); nothing is written.
    const { result } = await this.barrier.transaction(async (tx) => {
      const role = await this.mustRole(b, name, () => new InvalidRequest(`role "${name}" does not exist`), tx);
      const s = sidStore(tx, role);
      const h = await this.resolveHmac(s, b, role, by);
      if (h === null) throw new NotFound(`failed to find accessor entry for secret_id_accessor: "${by.accessor}"`);
      const e = await s.get<SecretIdEntry>(b.secretId(name, h));
      return e && !this.expired(e) ? e : null;
    });
    // Vault answers an unknown secret ID with an empty 204.
    if (!result) return { status: 204 };
    return { data: { ...result } };
  }

  private async destroySecretId(b: Paths, name: string, by: { secretId?: string; accessor?: string }): Promise<LogicalResponse> {
    const { lastLsn } = await this.barrier.transaction(async (tx) => {
      const role = await this.mustRole(b, name, () => new InvalidRequest(`role "${name}" does not exist`), tx);
      const s = sidStore(tx, role);
      const h = await this.resolveHmac(s, b, role, by);
      if (h === null) throw new NotFound(`failed to find accessor entry for secret_id_accessor: "${by.accessor}"`);
      await tx.lock(b.secretId(name, h));
      const e = await s.get<SecretIdEntry>(b.secretId(name, h));
      if (!e) return;
      await s.delete(b.accessor(name, e.secret_id_accessor));
      await s.delete(b.secretId(name, h));
    });
    return { status: 204, walLsn: lastLsn };
  }

  private expired(e: SecretIdEntry): boolean {
    return e.expiration_time !== ZERO_TIME && new Date(e.expiration_time).getTime() <= this.core.opts.clock.now().getTime();
  }

  // ------------------------------------------------------------------------------ login

  private async login(mount: MountEntry, b: Paths, ctx: RouteContext): Promise<LogicalResponse> {
    const roleIdIn = String(ctx.fields.role_id ?? '').trim();
    if (!roleIdIn) throw new InvalidRequest('missing role_id');
    const salt = await this.barrier.get<{ key: string }>(b.salt);
    const idx = salt ? await this.barrier.get<{ name: string }>(b.roleId(salt.key, roleIdIn)) : null;
    const role = idx ? await this.barrier.get<RoleEntry>(b.role(idx.name)) : null;
    if (!role || role.role_id !== roleIdIn) throw new InvalidRequest(BAD_CREDENTIALS);
    const addr = ctx.req.remoteAddr;
    // Checked before a secret ID use is consumed, so a caller from the wrong network burns none.
    if (!addrAllowed(addr, role.secret_id_bound_cidrs)) throw new InvalidRequest(`source address "${addr ?? ''}" unauthorized by CIDR restrictions on the role`);

    let metadata: Record<string, string> = {};
    let walLsn: number | undefined;
    if (role.bind_secret_id) {
      const secretId = String(ctx.fields.secret_id ?? '').trim();
      if (!secretId) throw new InvalidRequest('missing secret_id');
      const h = hmacHex(role.hmac_key, secretId);
      const path = b.secretId(role.name, h);
      // One transaction under the secret ID's lock: check, then consume one use (deleting the
      // entry on its last). Failures are returned, not thrown, so an expired entry's deletion
      // commits.
      const { result, lastLsn } = await this.barrier.transaction(async (tx): Promise<{ ok: true; entry: SecretIdEntry } | { ok: false; error: string }> => {
        const s = sidStore(tx, role);
        await tx.lock(path);
        const e = await s.get<SecretIdEntry>(path);
        if (!e) return { ok: false, error: BAD_CREDENTIALS };
        if (this.expired(e)) {
          await s.delete(b.accessor(role.name, e.secret_id_accessor));
          await s.delete(path);
          return { ok: false, error: BAD_CREDENTIALS };
        }
        if (!addrAllowed(addr, e.cidr_list)) return { ok: false, error: `source address "${addr ?? ''}" unauthorized through CIDR restrictions on the secret ID` };
        if (e.secret_id_num_uses === 1) {
          await s.delete(b.accessor(role.name, e.secret_id_accessor));
          await s.delete(path);
        } else if (e.secret_id_num_uses > 1) {
          await s.put(path, { ...e, secret_id_num_uses: e.secret_id_num_uses - 1, last_updated_time: this.core.opts.clock.now().toISOString() });
        }
        return { ok: true, entry: e };
      });
      if (!result.ok) throw new InvalidRequest(result.error);
      metadata = { ...result.entry.metadata };
      walLsn = lastLsn || undefined;
    }

    const m = this.current(mount);
    const path = `auth/${m.path}login`;
    const { auth } = await issueAuth(this.core, {
      ...loginIssueParams(role, m),
      displayName: mountDisplayPrefix(m),
      path,
      // Always include the role name, for later filtering (as Vault does).
      meta: { ...metadata, role_name: role.name },
      leasePath: path,
    });
    return { auth, walLsn };
  }
}

/** Storage paths of one AppRole mount. */
class Paths {
  constructor(readonly base: string) {}
  get salt() {
    return `${this.base}salt`;
  }
  get roleDir() {
    return `${this.base}role/`;
  }
  role(name: string) {
    return `${this.base}role/${name}`;
  }
  get roleIdDir() {
    return `${this.base}role-id/`;
  }
  roleId(saltB64: string, roleId: string) {
    return `${this.base}role-id/${hmacHex(saltB64, roleId)}`;
  }
  secretIdDir(role: string) {
    return `${this.base}secret-id/${role}/`;
  }
  secretId(role: string, hmac: string) {
    return `${this.base}secret-id/${role}/${hmac}`;
  }
  accessorDir(role: string) {
    return `${this.base}secret-id-accessor/${role}/`;
  }
  accessor(role: string, accessor: string) {
    return `${this.base}secret-id-accessor/${role}/${accessor}`;
  }
}

function roleName(ctx: RouteContext): string {
  const name = ctx.params.role_name.toLowerCase();
  if (!/^[\w][\w.@-]*$/.test(name) || name.length > 4096) throw new InvalidRequest(`invalid role name "${ctx.params.role_name}"`);
  return name;
}

function required(ctx: RouteContext, field: string): string {
  const v = String(ctx.fields[field] ?? '').trim();
  if (!v) throw new InvalidRequest(`missing ${field}`);
  return v;
}

/** `metadata` is a JSON string of string keys and values (an object is accepted too). */
function parseMetadata(raw: unknown): Record<string, string> {
  if (raw === undefined || raw === null || raw === '') return {};
  let obj: unknown = raw;
  if (typeof raw === 'string') {
    try {
      obj = JSON.parse(raw);
    } catch (err) {
      throw new InvalidRequest(`failed to parse metadata: ${(err as Error).message}`);
    }
  }
  if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) throw new InvalidRequest('failed to parse metadata: expected a JSON object');
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(obj)) {
    if (typeof v !== 'string') throw new InvalidRequest(`failed to parse metadata: value of "${k}" is not a string`);
    out[k] = v;
  }
  return out;
}

function roleView(r: RoleEntry): Record<string, unknown> {
  const data: Record<string, unknown> = {
    bind_secret_id: r.bind_secret_id,
    secret_id_bound_cidrs: r.secret_id_bound_cidrs,
    secret_id_num_uses: r.secret_id_num_uses,
    secret_id_ttl: r.secret_id_ttl,
    local_secret_ids: r.local_secret_ids,
    ...tokenData(r),
  };
  for (const k of r.legacy) {
    const legacy = LEGACY_NAME[k];
    if (legacy) data[legacy] = r[k];
  }
  return data;
}

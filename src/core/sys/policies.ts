/**
 * sys/policy, sys/policies/acl and sys/capabilities* routes (Vault's `policyPaths` and
 * `handleCapabilities*` in `vault/logical_system.go`).
 *
 * Policies are replicated data, stored through the barrier at `core/policies/acl/<name>` as
 * `{ name, raw, rules }`: `raw` is the text as Vault returns it on read (after base64
 * decoding), `rules` the parsed form Core.aclFor evaluates. Nothing is cached in memory, so a
 * policy written by another process (or shipped by replication) applies on the next request:
 * requests read a token's policies from storage with the token (Core only memoises the
 * decoding of a stored value, keyed by its ciphertext, which every write changes).
 */
import type { Core } from '../core';
import { DEFAULT_POLICY } from '../policy';
import { InvalidRequest, NotFound } from '../errors';
import type { FieldSchema, RouteContext, RouteDef } from '../framework';
import { decodePolicyText, parsePolicy, policyToHcl, sanitizePolicyName } from '../policy-parse';
import type { PathRule } from '../policy';
import type { TokenRecord } from '../ports';
import type { LogicalResponse } from '../request';

export const POLICY_STORAGE_PREFIX = 'core/policies/acl/';

/** The stored form of an ACL policy. */
export interface StoredPolicy {
  name: string;
  raw: string;
  rules: PathRule[];
}

/** Names Vault refuses to write or delete (the last two are its internal token policies). */
const IMMUTABLE = new Set(['root', 'response-wrapping', 'control-group']);
/** Hidden from lists, as in Vault. */
const NON_ASSIGNABLE = new Set(['response-wrapping', 'control-group']);

const RULES_DESCRIPTION = 'The rules of the policy.';

const capabilityFields = {
  path: { type: 'strings', description: "Use 'paths' instead." },
  paths: { type: 'strings', description: 'Paths on which capabilities are being queried.' },
} satisfies Record<string, FieldSchema>;

export function policyRoutes(core: Core): RouteDef[] {
  const policies = new PolicyStore(core);
  return [
    {
      pattern: 'policy',
      summary: 'List the configured access control policies.',
      operations: { read: () => policies.listResponse(true), list: () => policies.listResponse(true) },
    },
    {
      pattern: 'policy/:name+',
      summary: 'Read, modify, or delete an access control policy (legacy API; use sys/policies/acl).',
      fields: {
        policy: { type: 'string', description: RULES_DESCRIPTION },
        rules: { type: 'string', description: `${RULES_DESCRIPTION} Deprecated: use 'policy'.` },
      },
      operations: {
        read: (ctx) => policies.readResponse(ctx.params.name, 'rules'),
        update: (ctx) => policies.write(ctx.params.name, ctx.fields, true),
        delete: (ctx) => policies.remove(ctx.params.name),
      },
    },
    {
      pattern: 'policies/acl',
      summary: 'List the configured access control policies.',
      operations: { list: () => policies.listResponse(false) },
    },
    {
      pattern: 'policies/acl/:name+',
      summary: 'Read, modify, or delete an access control policy.',
      fields: { policy: { type: 'string', description: `${RULES_DESCRIPTION} HCL or JSON, optionally base64-encoded.` } },
      operations: {
        read: (ctx) => policies.readResponse(ctx.params.name, 'policy'),
        update: (ctx) => policies.write(ctx.params.name, ctx.fields, false),
        delete: (ctx) => policies.remove(ctx.params.name),
      },
    },
    {
      pattern: 'capabilities-self',
      summary: "Fetches the capabilities of the caller's token on the given paths.",
      fields: capabilityFields,
      operations: {
        update: async (ctx) => {
          if (!ctx.token) throw new InvalidRequest('no token found');
          return capabilitiesResponse(core, ctx.token, ctx);
        },
      },
    },
    {
      pattern: 'capabilities',
      summary: 'Fetches the capabilities of the given token on the given paths.',
      fields: { token: { type: 'string', description: 'Token for which capabilities are being queried.' }, ...capabilityFields },
      operations: {
        update: async (ctx) => {
          const token = String(ctx.fields.token ?? '');
          if (!token) throw new InvalidRequest('no token found');
          const rec = await core.tokens.lookup(token);
          if (!rec) throw new InvalidRequest('invalid token');
          return capabilitiesResponse(core, rec, ctx);
        },
      },
    },
    {
      pattern: 'capabilities-accessor',
      summary: 'Fetches the capabilities of the token associated with the given accessor on the given paths.',
      fields: { accessor: { type: 'string', description: 'Accessor of the token for which capabilities are being queried.' }, ...capabilityFields },
      operations: {
        update: async (ctx) => {
          const accessor = String(ctx.fields.accessor ?? '');
          if (!accessor) throw new InvalidRequest('missing accessor');
          const rec = await core.tokens.repo.byAccessor(accessor);
          // byAccessor does not filter expired tokens; an expired one is as good as gone.
          if (!rec || (rec.expiresAt && rec.expiresAt.getTime() <= core.opts.clock.now().getTime())) throw new InvalidRequest('invalid accessor');
          return capabilitiesResponse(core, rec, ctx);
        },
      },
    },
  ];
}

/**
 * `{ "<path>": [caps], ... }`, plus `capabilities` when exactly one path was asked (Vault
 * keeps that key for old clients and only in the single-path case).
 */
async function capabilitiesResponse(core: Core, token: TokenRecord, ctx: RouteContext): Promise<LogicalResponse> {
  const fromPaths = (ctx.fields.paths ?? []) as string[];
  const paths = fromPaths.length ? fromPaths : ((ctx.fields.path ?? []) as string[]);
  if (!paths.length) throw new InvalidRequest('paths must be supplied');
  if (paths.some((p) => !p)) throw new InvalidRequest('missing path');
  const acl = await core.aclFor(token);
  const data: Record<string, unknown> = {};
  for (const p of paths) data[p] = acl.capabilities(p);
  if (paths.length === 1) data.capabilities = data[paths[0]];
  return { data };
}

class PolicyStore {
  constructor(private readonly core: Core) {}

  async listResponse(legacy: boolean): Promise<LogicalResponse> {
    const names = new Set((await this.storedNames()).filter((n) => !NON_ASSIGNABLE.has(n)));
    // Vault writes `default` to storage at setup; Coffer serves it built in until it is updated.
    names.add('default');
    const keys = [...names].sort();
    keys.push('root'); // Vault appends the special root policy last
    return { data: legacy ? { keys, policies: keys } : { keys } };
  }

  async readResponse(rawName: string, textKey: 'policy' | 'rules'): Promise<LogicalResponse> {
    const name = sanitizePolicyName(rawName);
    if (name === 'root') return { data: { name, [textKey]: '' } };
    const stored = await this.core.barrier.get<StoredPolicy>(storagePath(name));
    if (stored) return { data: { name, [textKey]: stored.raw } };
    if (name === 'default') return { data: { name, [textKey]: policyToHcl(DEFAULT_POLICY.rules) } };
    throw new NotFound();
  }

  async write(rawName: string, fields: Record<string, unknown>, legacy: boolean): Promise<LogicalResponse> {
    const name = validName(rawName);
    const warnings: string[] = [];
    let text = String(fields.policy ?? '');
    if (!text && legacy && fields.rules !== undefined) {
      text = String(fields.rules);
      warnings.push("'rules' is deprecated, please use 'policy' instead");
    }
    if (!text) throw new InvalidRequest("'policy' parameter not supplied or empty");
    const raw = decodePolicyText(text);
    const parsed = await parsePolicy(name, raw);
    if (IMMUTABLE.has(name)) throw new InvalidRequest(`cannot update ${JSON.stringify(name)} policy`);
    // Fail closed: a constraint the ACL does not enforce yet would grant more than its author
    // meant, so such a policy is refused rather than stored.
    const unenforced = parsed.rules.find(
      (r) => r.allowedParameters || r.deniedParameters || r.requiredParameters || r.minWrappingTtl !== undefined || r.maxWrappingTtl !== undefined,
    );
    if (unenforced) {
      throw new InvalidRequest(
        `path "${unenforced.path}": allowed_parameters, denied_parameters, required_parameters and min/max_wrapping_ttl are not enforced by Coffer yet; remove them or split the path`,
      );
    }
    const entry: StoredPolicy = { name, raw, rules: parsed.rules };
    const { lastLsn } = await this.core.barrier.transaction((tx) => tx.put(storagePath(name), entry));
    return { status: 204, walLsn: lastLsn, ...(warnings.length ? { warnings } : {}) };
  }

  async remove(rawName: string): Promise<LogicalResponse> {
    const name = validName(rawName);
    if (IMMUTABLE.has(name)) throw new InvalidRequest(`cannot delete ${JSON.stringify(name)} policy`);
    if (name === 'default') throw new InvalidRequest('cannot delete default policy');
    const { lastLsn } = await this.core.barrier.transaction((tx) => tx.delete(storagePath(name)));
    return { status: 204, ...(lastLsn ? { walLsn: lastLsn } : {}) };
  }

  /** Every stored policy name; names may contain `/`, which storage lists as folders. */
  private async storedNames(prefix = ''): Promise<string[]> {
    const out: string[] = [];
    for (const key of await this.core.barrier.list(POLICY_STORAGE_PREFIX + prefix)) {
      if (key.endsWith('/')) out.push(...(await this.storedNames(prefix + key)));
      else out.push(prefix + key);
    }
    return out;
  }
}

function storagePath(name: string): string {
  return POLICY_STORAGE_PREFIX + name;
}

/**
 * Lowercased and trimmed like Vault. Vault's `name` takes any rest of the path; empty segments
 * are refused here because they would become storage folders that list as another name.
 */
function validName(rawName: string): string {
  const name = sanitizePolicyName(rawName);
  if (!name) throw new InvalidRequest('policy name must be provided in the URL');
  if (name.split('/').some((s) => s === '')) throw new InvalidRequest(`invalid policy name ${JSON.stringify(rawName)}`);
  return name;
}

/**
 * Route tables for backends, in the manner of Vault's `framework.Path`: each backend declares
 * its paths, the operations each supports, and the fields each accepts. The same declaration
 * validates requests (fields → zod) and generates the OpenAPI document, so the two cannot
 * drift apart.
 *
 * Patterns are relative to the mount: literal segments, `:name` for one segment, and a final
 * `:name*` for the rest of the path (possibly empty) or `:name+` (non-empty).
 */
import { z } from 'zod';
import { InvalidRequest, UnsupportedOperation, UnsupportedPath } from './errors';
import type { ReadPlan, WritePlan } from './ports';
import type { LogicalResponse, Operation, RequestContext } from './request';
import { parseDurationSeconds } from './units';

export type FieldType = 'string' | 'int' | 'bool' | 'duration' | 'map' | 'array' | 'strings' | 'any';

export interface FieldSchema {
  type: FieldType;
  description?: string;
  required?: boolean;
  default?: unknown;
}

export interface RouteContext extends RequestContext {
  params: Record<string, string>;
  /** Body (writes) or query (reads) fields, validated and coerced per the route's schema. */
  fields: Record<string, any>;
}

export type Handler = (ctx: RouteContext) => Promise<LogicalResponse>;

export interface RouteDef {
  pattern: string;
  summary: string;
  operations: Partial<Record<Operation, Handler>>;
  fields?: Record<string, FieldSchema>;
  /** Root-protected: the caller also needs `sudo` on the path. */
  sudo?: boolean;
  unauthenticated?: boolean;
  /** Decides create vs update for the ACL (Vault's existence check). Without it, writes are `update`. */
  exists?: (ctx: RouteContext) => Promise<boolean>;
  /**
   * For a read: the entries its handler reads first (`getWithLast`, or `get` for a plan without
   * a prefix); for a write: the entries its `modify` reads first, with their row versions; or
   * null. Core fetches them in the statement that looks up the caller's token (one round trip
   * instead of two) and hands them, still encrypted, to the handler as `ctx.prefetched` (read)
   * or `ctx.prefetchedVersions` (write) once the request is authorised.
   */
  prefetch?: (ctx: RouteContext) => ReadPlan | WritePlan | null;
}

interface Compiled {
  def: RouteDef;
  /** Segments before the rest parameter (or all of them when there is none). */
  head: string[];
  /** A multi-segment parameter (`:name*` or `:name+`), anywhere in the pattern. */
  rest: { name: string; nonEmpty: boolean } | null;
  /** Segments after the rest parameter (e.g. `tune` in `mounts/:path+/tune`). */
  tail: string[];
  schema: z.ZodType<Record<string, unknown>>;
}

const boolish = z.union([z.boolean(), z.enum(['true', 'false', '1', '0', 't', 'f']), z.literal(1), z.literal(0)]).transform((v) => v === true || v === 'true' || v === '1' || v === 't' || v === 1);
const intish = z.union([z.number().int(), z.string().regex(/^-?\d+$/).transform(Number)]);
const durationish = z.union([z.number(), z.string()]).transform((v, ctx) => {
  try {
    return Math.floor(parseDurationSeconds(v === '' ? 0 : v));
  } catch (err) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
    return z.NEVER;
  }
});
// Vault accepts a comma-separated string wherever it takes a list of strings.
const stringsish = z.union([z.array(z.union([z.string(), z.number()]).transform(String)), z.string().transform((s) => (s === '' ? [] : s.split(',').map((x) => x.trim())))]);

function fieldSchema(f: FieldSchema): z.ZodTypeAny {
  const base: z.ZodTypeAny = {
    string: z.union([z.string(), z.number().transform(String)]),
    int: intish,
    bool: boolish,
    duration: durationish,
    map: z.record(z.unknown()),
    array: z.array(z.unknown()),
    strings: stringsish,
    any: z.unknown(),
  }[f.type];
  if (f.required) return base;
  return f.default !== undefined ? base.optional().default(f.default as never) : base.optional();
}

function compile(def: RouteDef): Compiled {
  const parts = def.pattern.split('/').filter(Boolean);
  const restAt = parts.findIndex((p) => /^:\w+[*+]$/.test(p));
  const shape: Record<string, z.ZodTypeAny> = {};
  for (const [name, f] of Object.entries(def.fields ?? {})) shape[name] = fieldSchema(f);
  return {
    def,
    head: restAt === -1 ? parts : parts.slice(0, restAt),
    rest: restAt === -1 ? null : { name: parts[restAt].slice(1, -1), nonEmpty: parts[restAt].endsWith('+') },
    tail: restAt === -1 ? [] : parts.slice(restAt + 1),
    schema: z.object(shape).passthrough() as never,
  };
}

export class RouteTable {
  private readonly routes: Compiled[];

  constructor(readonly defs: RouteDef[]) {
    this.routes = defs.map(compile);
  }

  match(subpath: string): { def: RouteDef; params: Record<string, string>; compiled: Compiled } | null {
    const parts = subpath.split('/');
    const trailingSlash = subpath.endsWith('/');
    if (trailingSlash) parts.pop();
    const clean = parts.filter((p, i) => p !== '' || i < parts.length - 1);
    for (const c of this.routes) {
      const params = matchSegments(c, clean, trailingSlash);
      if (params) return { def: c.def, params, compiled: c };
    }
    return null;
  }

  /** Validates fields and runs the handler; unsupported operations are 405. `m`: the caller's `match(ctx.subpath)`. */
  async dispatch(ctx: RequestContext, m = this.match(ctx.subpath)): Promise<LogicalResponse> {
    if (!m) throw new UnsupportedPath('unsupported path');
    const op = ctx.req.operation;
    const handler = m.def.operations[op] ?? (op === 'create' ? m.def.operations.update : undefined);
    if (!handler) throw new UnsupportedOperation();
    const input = op === 'read' || op === 'list' ? { ...ctx.req.query } : { ...ctx.req.query, ...ctx.req.data };
    delete (input as Record<string, unknown>).list;
    const parsed = m.compiled.schema.safeParse(input);
    if (!parsed.success) {
      throw new InvalidRequest(parsed.error.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; '));
    }
    return handler({ ...ctx, params: m.params, fields: parsed.data });
  }
}

function matchOne(pattern: string, part: string | undefined, params: Record<string, string>): boolean {
  if (pattern.startsWith(':')) {
    if (!part) return false;
    params[pattern.slice(1)] = part;
    return true;
  }
  return pattern === part;
}

function matchSegments(c: Compiled, parts: string[], trailingSlash: boolean): Record<string, string> | null {
  const params: Record<string, string> = {};
  const fixed = c.head.length + c.tail.length;
  if (c.rest ? parts.length < fixed : parts.length !== fixed) return null;
  for (let i = 0; i < c.head.length; i++) if (!matchOne(c.head[i], parts[i], params)) return null;
  for (let i = 0; i < c.tail.length; i++) if (!matchOne(c.tail[i], parts[parts.length - c.tail.length + i], params)) return null;
  if (c.rest) {
    const middle = parts.slice(c.head.length, parts.length - c.tail.length).join('/');
    if (c.rest.nonEmpty && !middle) return null;
    // A trailing slash belongs to the rest parameter only when it ends the path.
    params[c.rest.name] = middle + (trailingSlash && middle && c.tail.length === 0 ? '/' : '');
  }
  return params;
}

/** OpenAPI path items for one mount, from its route table. */
export function openApiPaths(prefix: string, table: RouteTable): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const def of table.defs) {
    const path = '/' + prefix + def.pattern.replace(/:(\w+)[*+]?/g, '{$1}');
    const params = [...def.pattern.matchAll(/:(\w+)/g)].map((m) => ({ name: m[1], in: 'path', required: true, schema: { type: 'string' } }));
    const item: Record<string, unknown> = { summary: def.summary, parameters: params };
    if (def.sudo) item['x-vault-sudo'] = true;
    if (def.unauthenticated) item['x-vault-unauthenticated'] = true;
    if (def.exists) item['x-vault-createSupported'] = true;
    const body = {
      required: Object.values(def.fields ?? {}).some((f) => f.required),
      content: {
        'application/json': {
          schema: {
            type: 'object',
            properties: Object.fromEntries(Object.entries(def.fields ?? {}).map(([k, f]) => [k, openApiType(f)])),
            required: Object.entries(def.fields ?? {}).filter(([, f]) => f.required).map(([k]) => k),
          },
        },
      },
    };
    const ok = { '200': { description: 'OK' }, '204': { description: 'empty body' } };
    for (const op of Object.keys(def.operations) as Operation[]) {
      const id = `${prefix}${def.pattern}`.replace(/[^a-zA-Z0-9]+/g, '-').replace(/-$/, '');
      if (op === 'read') item.get = { operationId: `read-${id}`, responses: ok };
      if (op === 'list') {
        // A path that also reads takes `list` as an optional switch; a list-only path requires it.
        const readable = Boolean(def.operations.read);
        item.get = { ...(item.get as object), parameters: [{ name: 'list', in: 'query', required: !readable, schema: { type: 'string', enum: ['true'] } }], ...(readable ? {} : { operationId: `list-${id}` }), responses: ok };
      }
      if (op === 'update' || op === 'create') item.post = { operationId: `write-${id}`, requestBody: body, responses: ok };
      if (op === 'patch') item.patch = { operationId: `patch-${id}`, requestBody: { ...body, content: { 'application/merge-patch+json': body.content['application/json'] } }, responses: ok };
      if (op === 'delete') item.delete = { operationId: `delete-${id}`, responses: ok };
    }
    out[path] = item;
  }
  return out;
}

function openApiType(f: FieldSchema): Record<string, unknown> {
  const t: Record<string, Record<string, unknown>> = {
    string: { type: 'string' },
    int: { type: 'integer' },
    bool: { type: 'boolean' },
    duration: { type: 'string', format: 'duration' },
    map: { type: 'object' },
    array: { type: 'array', items: {} },
    strings: { type: 'array', items: { type: 'string' } },
    any: {},
  };
  return { ...t[f.type], ...(f.description ? { description: f.description } : {}), ...(f.default !== undefined ? { default: f.default } : {}) };
}

/**
 * The Express app: Vault's HTTP conventions over core. Routes are thin adapters: parse, call
 * core, render the envelope. Errors become statuses in exactly one place (errors.ts).
 */
import { randomUUID } from 'node:crypto';
import type * as http from 'node:http';
import { parse as parseQuery } from 'node:querystring';
import express, { type NextFunction, type Request, type Response } from 'express';
import type { Logger } from 'pino';
import type { Core } from '../core/core';
import { InvalidRequest, PayloadTooLarge, PermissionDenied, Sealed, UnsupportedOperation } from '../core/errors';
import type { LogicalRequest, LogicalResponse, Operation } from '../core/request';
import { CREDENTIAL_HEADER } from '../replication/wire';
import { toHttpError } from './errors';
import type { Metrics } from './metrics';
import { canonicalPath } from './paths';

export interface NodeStatus {
  isActive(): boolean;
  /** A write committed here: let the active node (if this process is it) read the new WAL now. */
  poke(): void;
  leader(): Promise<{ haEnabled: boolean; isSelf: boolean; activeTime: string; leaderAddress: string; leaderClusterAddress: string }>;
  stepDown(): Promise<void>;
}

/** What the HTTP layer asks of replication (absent on a plain cluster). */
export interface ReplicationHooks {
  router: express.Router;
  prefix: string;
  /** 412 when this cluster has not reached the index a request requires. */
  assertIndex(lsn: number, wait: boolean): Promise<void>;
  /** POST {prefix}/apply, served without Express (see hotApply); the router serves it too. */
  apply?(body: unknown, credential: string | undefined): Promise<{ status: number; body: unknown }>;
}

export interface AppOptions {
  replication?: ReplicationHooks;
  core: Core;
  metrics: Metrics;
  unauthenticatedMetrics: boolean;
  node: NodeStatus;
  log: Logger;
  maxRequestSizeBytes: number;
  version: string;
}

const TRUE = new Set(['1', 't', 'T', 'TRUE', 'true', 'True']);

export function createApp(o: AppOptions): express.Express {
  const app = express();
  app.disable('x-powered-by');
  app.set('query parser', 'simple');
  app.set('etag', false);

  const observe = (method: string, pathOf: () => string, res: http.ServerResponse) => {
    const started = process.hrtime.bigint();
    res.setHeader('Cache-Control', 'no-store');
    res.on('finish', () => {
      const ms = Number(process.hrtime.bigint() - started) / 1e6;
      o.metrics.handleRequest.observe({ method }, ms);
      // Paths and statuses only: never bodies, tokens or query values (invariant 8).
      if (o.log.isLevelEnabled('debug')) o.log.debug({ method, path: pathOf(), status: res.statusCode, ms }, 'request');
    });
  };

  app.use((req, res, next) => {
    observe(req.method, () => req.path, res);
    next();
  });

  app.use(express.json({ limit: o.maxRequestSizeBytes, type: () => true, strict: false }));

  app.use((req, res, next) => {
    if (!req.path.startsWith('/v1/')) return sendError(res, 404, ['Missing /v1/ prefix in path. Use /v1/ prefix on path.']);
    next();
  });

  if (o.replication) app.use(o.replication.prefix, o.replication.router);

  const raw = rawSys(o);
  app.all('/v1/sys/{*rest}', (req, res, next) => {
    const name = req.path.slice('/v1/sys/'.length).replace(/\/$/, '');
    const h = raw[name];
    if (!h) return next();
    h(req, res).catch((err) => sendCaught(res, err, o.log));
  });

  app.all('/v1/{*rest}', (req, res) => {
    logical(o, expressCall(req), res).catch((err) => sendCaught(res, err, o.log));
  });

  // Body-parser failures arrive here: malformed JSON is the caller's error, as is size.
  app.use((err: unknown, _req: Request, res: Response, _next: NextFunction) => {
    const e = err as { type?: string; status?: number; message?: string };
    if (e?.type === 'entity.too.large') return sendError(res, 413, [new PayloadTooLarge().message]);
    if (e?.type === 'entity.parse.failed') return sendError(res, 400, [`failed to parse JSON input: ${e.message}`]);
    if (e?.status && e.status >= 400 && e.status < 500) return sendError(res, e.status, [e.message ?? 'bad request']);
    sendCaught(res, err, o.log);
  });

  // The hot path, a plain read of a logical path (see hotCall), does not go through Express:
  // its layers have nothing to do for it (no body to parse, the /v1/ prefix is there, neither
  // the replication router nor the sys/ routes serve it), and Express's per-request work
  // (prototypes, router walk) is a good part of such a request's cost here. Express's
  // handle() is wrapped: a hot read is served at once, as the first layer and the /v1/ route
  // would serve it, and anything else is handed to Express. Should its answer ever need
  // Express after all (see sendJson), the request and response are given Express's
  // prototypes then, as handle() would have.
  //
  // Writes (POST/PUT of a logical path with a JSON body of known length) take the same way:
  // the body is read and parsed as express.json() would (see hotWrite), then served by
  // logical(). A body that does not parse is answered as Express's error handler answers it.
  const internals = app as unknown as { handle(req: http.IncomingMessage, res: http.ServerResponse, done?: NextFunction): void };
  const expressHandle = internals.handle;
  const applyUrl = o.replication?.apply ? `${o.replication.prefix}/apply` : null;
  internals.handle = function handle(this: unknown, req, res, done) {
    if (req.url === applyUrl && req.method === 'POST' && plainJsonBody(req, o.maxRequestSizeBytes)) {
      observe('POST', () => applyUrl, res);
      return hotApply(o, req, res);
    }
    const call = hotCall(req) ?? hotWrite(req, o.maxRequestSizeBytes);
    if (!call) return expressHandle.call(this, req, res, done);
    (res as HotResponse)[TO_EXPRESS] = () => {
      Object.setPrototypeOf(req, app.request);
      Object.setPrototypeOf(res, app.response);
      (req as Request).res = res as Response;
    };
    observe(call.method, () => call.path, res);
    if (call.method === 'GET') {
      logical(o, call, res).catch((err) => sendCaught(res, err, o.log));
      return;
    }
    readJsonBody(req).then(
      (parsed) => {
        if (!parsed.ok) return sendError(res, 400, [`failed to parse JSON input: ${parsed.message}`]);
        call.body = () => bodyFrom(parsed.value);
        logical(o, call, res).catch((err) => sendCaught(res, err, o.log));
      },
      () => undefined, // the client went away mid-body: nobody to answer
    );
  };
  return app;
}

/**
 * The hot write path's requests: a POST or PUT of a path under /v1/ but not under /v1/sys
 * (the URL rules of hotCall), with a Content-Length within the size limit, no transfer or
 * content encoding, and no charset other than UTF-8 — exactly the bodies express.json() would
 * read as plain UTF-8 text. Null for anything else (Express reads it, and answers 413/415/400).
 */
function hotWrite(req: http.IncomingMessage, limit: number): HttpCall | null {
  if (req.method !== 'POST' && req.method !== 'PUT') return null;
  if (!plainJsonBody(req, limit)) return null;
  const h = req.headers;
  const target = parseTarget(req.url ?? '');
  if (!target) return null;
  return { method: req.method, path: target.path, query: target.query, headers: h, remoteAddress: req.socket.remoteAddress, body: () => ({}) };
}

/**
 * A body express.json() would read as plain UTF-8 text: a Content-Length within the size limit,
 * no transfer or content encoding, no charset other than UTF-8 (and no conditional headers,
 * which Express's answer would honour).
 */
function plainJsonBody(req: http.IncomingMessage, limit: number): boolean {
  const h = req.headers;
  if (h['transfer-encoding'] !== undefined || h['if-none-match'] !== undefined || h['if-modified-since'] !== undefined) return false;
  const length = h['content-length'];
  if (length === undefined || !/^\d{1,10}$/.test(length) || Number(length) > limit) return false;
  const encoding = h['content-encoding'];
  if (encoding !== undefined && encoding.toLowerCase() !== 'identity') return false;
  const type = h['content-type'];
  return type === undefined || !/charset/i.test(type) || /;\s*charset\s*=\s*"?utf-8"?\s*(;|$)/i.test(type);
}

/**
 * A WAL batch from the primary (POST {prefix}/apply on an API listener): the one internal call
 * made many times a second, so it skips Express as logical writes do. Same answers as the
 * router's (serveApply), and malformed JSON gets Express's 400.
 */
function hotApply(o: AppOptions, req: http.IncomingMessage, res: http.ServerResponse): void {
  readJsonBody(req).then(
    async (parsed) => {
      if (!parsed.ok) return sendError(res, 400, [`failed to parse JSON input: ${parsed.message}`]);
      const out = await o.replication!.apply!(parsed.value, req.headers[CREDENTIAL_HEADER] as string | undefined);
      sendJson(res, out.status, out.body);
    },
    () => undefined, // the primary went away mid-body: nobody to answer
  ).catch((err) => sendCaught(res, err, o.log));
}

/**
 * The body as express.json({ strict: false }) parses it: UTF-8 without a byte-order mark,
 * empty → {}, otherwise JSON.parse (its error message is what Express's handler reports).
 */
function readJsonBody(req: http.IncomingMessage): Promise<{ ok: true; value: unknown } | { ok: false; message: string }> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('error', reject);
    req.on('aborted', () => reject(new Error('aborted')));
    req.on('end', () => {
      let text = chunks.length === 1 ? chunks[0].toString('utf8') : Buffer.concat(chunks).toString('utf8');
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      if (text.length === 0) return resolve({ ok: true, value: {} });
      try {
        resolve({ ok: true, value: JSON.parse(text) });
      } catch (err) {
        resolve({ ok: false, message: (err as Error).message });
      }
    });
  });
}

/** What `logical` reads of an HTTP request: Express's req, or a plain one on the hot path. */
interface HttpCall {
  method: string;
  /** The URL's path, as Express's `req.path`. */
  path: string;
  /** As Express's `req.query` with the 'simple' parser (node:querystring). */
  query: Record<string, unknown>;
  headers: http.IncomingHttpHeaders;
  remoteAddress: string | undefined;
  body(): Record<string, unknown>;
}

function expressCall(req: Request): HttpCall {
  return {
    method: req.method,
    path: req.path,
    query: req.query as Record<string, unknown>,
    headers: req.headers,
    remoteAddress: req.socket.remoteAddress,
    body: () => bodyOf(req),
  };
}

/** A header as Express's `req.header(name)` reads it (`name` lower-case, not referer). */
function header(call: HttpCall, name: string): string | undefined {
  return call.headers[name] as string | undefined;
}

/**
 * The hot path's requests: a GET of a path under /v1/ but not under /v1/sys (the prefix the
 * raw sys/ routes and the replication router match, case-insensitively as Express does),
 * without a body or conditional headers, whose URL parseurl would split at its first `?`
 * (its fast case: no `#` or white space) and whose path decodes (Express answers a bad
 * percent-encoding itself). Null for anything else.
 */
function hotCall(req: http.IncomingMessage): HttpCall | null {
  const h = req.headers;
  if (req.method !== 'GET' || h['content-length'] !== undefined || h['transfer-encoding'] !== undefined) return null;
  if (h['if-none-match'] !== undefined || h['if-modified-since'] !== undefined) return null;
  const target = parseTarget(req.url ?? '');
  if (!target) return null;
  return { method: 'GET', path: target.path, query: target.query, headers: h, remoteAddress: req.socket.remoteAddress, body: () => ({}) };
}

/**
 * A request target's path and query as Express would see them, for the hot paths: the path is
 * under /v1/ and not under /v1/sys (case-insensitively, as Express matches the raw sys/ routes
 * and the replication router), parseurl would split the URL at its first `?` (its fast case:
 * no `#` or white space), and the path decodes. Null otherwise.
 */
function parseTarget(url: string): { path: string; query: Record<string, unknown> } | null {
  if (url.charCodeAt(0) !== 0x2f) return null;
  let q = -1;
  for (let i = 1; i < url.length; i++) {
    const c = url.charCodeAt(i);
    if (c === 0x3f) {
      if (q === -1) q = i;
    } else if (c === 0x09 || c === 0x0a || c === 0x0c || c === 0x0d || c === 0x20 || c === 0x23 || c === 0xa0 || c === 0xfeff) {
      return null;
    }
  }
  const path = q === -1 ? url : url.slice(0, q);
  if (!path.startsWith('/v1/') || path.slice(0, 7).toLowerCase() === '/v1/sys') return null;
  if (path.includes('%')) {
    try {
      decodeURIComponent(path);
    } catch {
      return null;
    }
  }
  return { path, query: parseQuery(q === -1 ? '' : url.slice(q + 1)) };
}

const TO_EXPRESS = Symbol('toExpress');
/** A hot-path response, which can be given Express's prototypes when its answer needs them. */
type HotResponse = http.ServerResponse & { [TO_EXPRESS]?: () => void };

/**
 * `res.status(status).json(body)`, writing exactly what Express would (same status, headers in
 * the same order, same bytes) without its general machinery, in the cases that need none of
 * it: a GET, POST or PUT without conditional headers, no Content-Type set yet, a status with
 * a body (res.json only differs by method for HEAD, and for GET/HEAD freshness). Anything else
 * goes through Express (HEAD, `If-None-Match`/`If-Modified-Since`, 204/205/304 header stripping).
 */
function sendJson(res: http.ServerResponse, status: number, body: unknown): void {
  const h = res.req.headers;
  const m = res.req.method;
  if (
    (m !== 'GET' && m !== 'POST' && m !== 'PUT') || h['if-none-match'] !== undefined || h['if-modified-since'] !== undefined ||
    res.hasHeader('Content-Type') || status === 204 || status === 205 || status === 304
  ) {
    (res as HotResponse)[TO_EXPRESS]?.();
    (res as Response).status(status).json(body);
    return;
  }
  const text = JSON.stringify(body);
  res.statusCode = status;
  res.setHeader('Content-Type', 'application/json; charset=utf-8');
  res.setHeader('Content-Length', Buffer.byteLength(text, 'utf8'));
  res.end(text, 'utf8');
}

function sendError(res: http.ServerResponse, status: number, errors: string[]): void {
  if (res.headersSent) return;
  sendJson(res, status, { errors });
}

function sendCaught(res: http.ServerResponse, err: unknown, log: Logger): void {
  const e = toHttpError(err);
  if (e.status === 500) log.error({ err: redactError(err) }, 'request failed');
  sendError(res, e.status, e.errors);
}

/** Error details for logs: message, code and stack, nothing from the request. */
function redactError(err: unknown) {
  const e = err as { message?: string; code?: string; stack?: string };
  return { message: e?.message, code: e?.code, stack: e?.stack };
}

function tokenOf(req: Request | HttpCall): string | null {
  const h = 'header' in req ? req.header('x-vault-token') : header(req, 'x-vault-token');
  if (h) return h;
  const auth = 'header' in req ? req.header('authorization') : header(req, 'authorization');
  if (auth && auth.startsWith('Bearer ')) return auth.slice(7).trim();
  return null;
}

function operationOf(req: HttpCall): Operation {
  const q = req.query as Record<string, string | undefined>;
  switch (req.method) {
    case 'GET':
      return q.list !== undefined && TRUE.has(String(q.list)) ? 'list' : 'read';
    case 'POST':
    case 'PUT':
      return 'update';
    case 'DELETE':
      return 'delete';
    case 'PATCH':
      return 'patch';
    default:
      throw new UnsupportedOperation();
  }
}

/** Vault's JSON decoder refuses nesting beyond this; deeper values would overflow later. */
const MAX_JSON_DEPTH = 500;

function tooDeep(v: unknown): boolean {
  const stack: [unknown, number][] = [[v, 0]];
  while (stack.length) {
    const [x, d] = stack.pop()!;
    if (d > MAX_JSON_DEPTH) return true;
    if (x && typeof x === 'object') for (const c of Object.values(x)) if (c && typeof c === 'object') stack.push([c, d + 1]);
  }
  return false;
}

function bodyOf(req: Request): Record<string, unknown> {
  return bodyFrom(req.body as unknown);
}

/** A parsed JSON body as a request's data: an object ({} for none); anything else is refused. */
function bodyFrom(b: unknown): Record<string, unknown> {
  if (tooDeep(b)) throw new InvalidRequest(`failed to parse JSON input: nesting deeper than ${MAX_JSON_DEPTH} levels`);
  if (b === undefined || b === null || (typeof b === 'object' && Object.keys(b as object).length === 0 && !Array.isArray(b))) return {};
  if (typeof b !== 'object' || Array.isArray(b)) throw new InvalidRequest('failed to parse JSON input: request body must be a JSON object');
  return b as Record<string, unknown>;
}

async function logical(o: AppOptions, req: HttpCall, res: http.ServerResponse): Promise<void> {
  const operation = operationOf(req);
  let path = canonicalPath(req.path.slice('/v1/'.length));
  if (operation === 'list' && path && !path.endsWith('/')) path += '/';
  const lreq: LogicalRequest = {
    operation,
    path,
    data: operation === 'read' || operation === 'list' ? {} : req.body(),
    query: Object.fromEntries(Object.entries(req.query).map(([k, v]) => [k, String(v)])),
    token: tokenOf(req),
    headers: {
      'content-type': header(req, 'content-type'),
      'x-vault-wrap-ttl': header(req, 'x-vault-wrap-ttl'),
      'x-vault-wrap-format': header(req, 'x-vault-wrap-format'),
    },
    remoteAddr: req.remoteAddress,
  };
  const required = header(req, 'x-vault-index');
  if (required && o.replication && /^\d+$/.test(required)) {
    // X-Vault-Inconsistent: "fail" (default) answers 412 at once; "await-state" waits first.
    await o.replication.assertIndex(Number(required), header(req, 'x-vault-inconsistent') === 'await-state');
  }
  // A write's WAL position is its X-Vault-Index (the store tells the active node of the rows).
  render(res, lreq, await o.core.handle(lreq));
}

function render(res: http.ServerResponse, req: LogicalRequest, out: LogicalResponse): void {
  const index = out.replicatedLsn || out.walLsn;
  if (index) res.setHeader('X-Vault-Index', String(index));
  const hasBody = out.data != null || out.auth != null || out.wrapInfo != null || (out.warnings?.length ?? 0) > 0;
  if (!hasBody && (out.status === 204 || out.status === undefined)) {
    res.statusCode = 204; // res.status(204).end()
    res.end();
    return;
  }
  const envelope: Record<string, unknown> = {
    request_id: randomUUID(),
    lease_id: out.leaseId ?? '',
    renewable: out.renewable ?? false,
    lease_duration: out.leaseDuration ?? 0,
    data: out.data ?? null,
    wrap_info: out.wrapInfo ?? null,
    warnings: out.warnings?.length ? out.warnings : null,
    auth: out.auth ?? null,
    mount_type: '',
  };
  // Vault copies sys/ data keys to the top level; node-vault users read e.g. `.policies` there.
  if (req.path.startsWith('sys/') && req.path !== 'sys/wrapping/unwrap' && out.data) {
    for (const [k, v] of Object.entries(out.data)) if (!(k in envelope)) envelope[k] = v;
  }
  sendJson(res, out.status && out.status !== 204 ? out.status : 200, envelope);
}

type RawHandler = (req: Request, res: Response) => Promise<void>;

/** The raw (non-envelope) sys endpoints Vault serves from its HTTP layer. */
function rawSys(o: AppOptions): Record<string, RawHandler> {
  const { core } = o;
  const only = (req: Request, ...methods: string[]) => {
    if (!methods.includes(req.method)) throw new UnsupportedOperation();
  };
  return {
    init: async (req, res) => {
      only(req, 'GET', 'PUT', 'POST');
      if (req.method === 'GET') {
        res.json({ initialized: (await core.sealStatus()).initialized });
        return;
      }
      const b = bodyOf(req);
      const recovery = b.recovery_shares !== undefined;
      const shares = Number(recovery ? b.recovery_shares : b.secret_shares);
      const threshold = Number(recovery ? b.recovery_threshold : b.secret_threshold);
      if (b.pgp_keys || b.root_token_pgp_key) throw new InvalidRequest('PGP-encrypted keys are not supported by Coffer');
      const r = await core.initialize(shares, threshold);
      const hex = r.keys.map((k) => k.toString('hex'));
      const b64 = r.keys.map((k) => k.toString('base64'));
      res.json(r.recovery ? { keys: [], keys_base64: [], recovery_keys: hex, recovery_keys_base64: b64, root_token: r.rootToken } : { keys: hex, keys_base64: b64, root_token: r.rootToken });
    },
    'seal-status': async (req, res) => {
      only(req, 'GET');
      res.json(await core.sealStatus());
    },
    unseal: async (req, res) => {
      only(req, 'PUT', 'POST');
      const b = bodyOf(req);
      if (b.reset === true || b.reset === 'true') {
        core.sealState.reset();
      } else {
        if (typeof b.key !== 'string' || !b.key) throw new InvalidRequest("'key' must be specified in request body as JSON, or 'reset' set to true");
        await core.unseal(decodeKey(b.key));
      }
      res.json(await core.sealStatus());
    },
    seal: async (req, res) => {
      only(req, 'PUT', 'POST');
      const token = await core.authenticate(tokenOf(req));
      const acl = await core.aclFor(token);
      if (!acl.allows('sys/seal', 'update', true)) throw new PermissionDenied();
      core.sealLocal();
      res.status(204).end();
    },
    'step-down': async (req, res) => {
      only(req, 'PUT', 'POST');
      const token = await core.authenticate(tokenOf(req));
      const acl = await core.aclFor(token);
      if (!acl.allows('sys/step-down', 'update', true)) throw new PermissionDenied();
      await o.node.stepDown();
      res.status(204).end();
    },
    health: async (req, res) => {
      only(req, 'GET', 'HEAD');
      const { status, body } = await health(o, req.query as Record<string, string>);
      if (req.method === 'HEAD') {
        res.status(status).end();
        return;
      }
      res.status(status).json(body);
    },
    metrics: async (req, res) => {
      only(req, 'GET');
      if (!o.unauthenticatedMetrics) {
        const acl = await core.aclFor(await core.authenticate(tokenOf(req)));
        if (!acl.allows('sys/metrics', 'read')) throw new PermissionDenied();
      }
      if (req.query.format === 'prometheus') {
        res.setHeader('Content-Type', o.metrics.registry.contentType);
        res.send(await o.metrics.registry.metrics());
        return;
      }
      res.json(await o.metrics.registry.getMetricsAsJSON());
    },
    leader: async (req, res) => {
      only(req, 'GET');
      if (core.sealed) throw new Sealed();
      const l = await o.node.leader();
      res.json({
        ha_enabled: l.haEnabled,
        is_self: l.isSelf,
        active_time: l.activeTime,
        leader_address: l.leaderAddress,
        leader_cluster_address: l.leaderClusterAddress,
        performance_standby: false,
        performance_standby_last_remote_wal: 0,
      });
    },
  };
}

function decodeKey(k: string): Buffer {
  if (/^[0-9a-fA-F]+$/.test(k) && k.length % 2 === 0) return Buffer.from(k, 'hex');
  const b = Buffer.from(k, 'base64');
  if (b.length === 0) throw new InvalidRequest('unseal key is not hex or base64');
  return b;
}

/** sys/health, evaluated in Vault's order: uninitialised → sealed → standby → active. */
async function health(o: AppOptions, q: Record<string, string>) {
  const st = await o.core.sealStatus();
  const code = (name: string, dflt: number) => {
    const v = q[name];
    const n = v === undefined ? NaN : Number(v);
    return Number.isInteger(n) && n >= 100 && n <= 999 ? n : dflt;
  };
  const active = o.node.isActive();
  const standby = !st.sealed && !active;
  let status: number;
  if (!st.initialized) status = code('uninitcode', 501);
  else if (st.sealed) status = code('sealedcode', 503);
  else if (standby && !TRUE.has(q.standbyok ?? '')) status = code('standbycode', 429);
  else status = code('activecode', 200);
  const body = {
    initialized: st.initialized,
    sealed: st.sealed,
    standby,
    performance_standby: false,
    replication_performance_mode: 'disabled',
    replication_dr_mode: 'disabled',
    server_time_utc: Math.floor(Date.now() / 1000),
    version: o.version,
    enterprise: false,
    cluster_name: st.cluster_name ?? '',
    cluster_id: st.cluster_id ?? '',
    echo_duration_ms: 0,
    clock_skew_ms: 0,
  };
  return { status, body };
}

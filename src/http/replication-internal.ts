/**
 * The cluster-to-cluster endpoints (not Vault API): a secondary registers, reconciles (merkle-diff,
 * merkle-sync), heartbeats
 * and forwards writes to its primary; the primary pushes WAL batches to the secondary. Every
 * call is authenticated with the secondary's replication credential.
 *
 * Served on the API listener (plain-HTTP clusters) and, with `cluster: true`, on the cluster
 * listener (mutual TLS; src/http/cluster-listener.ts), where the verified client certificate's
 * common name is checked against the credential as well (replication/cluster-tls.ts).
 */
import type { TLSSocket } from 'node:tls';
import express, { type Request, type Response } from 'express';
import { InvalidRequest } from '../core/errors';
import type { LogicalRequest } from '../core/request';
import { RELAYED_HEADER, type Replication } from '../replication/manager';
import type { Peer } from '../replication/cluster-tls';
import { CREDENTIAL_HEADER } from '../replication/wire';
import { toHttpError } from './errors';

export function replicationInternalRouter(r: Replication, opts: { cluster?: boolean } = {}): express.Router {
  const router = express.Router();
  /** The caller's verified client certificate (cluster listener only; undefined on an API listener). */
  const peerOf = (req: Request): Peer | undefined => {
    if (!opts.cluster) return undefined;
    const socket = req.socket as TLSSocket;
    const cn = socket.authorized ? socket.getPeerCertificate()?.subject?.CN : undefined;
    return { cn: typeof cn === 'string' ? cn : null, relayed: req.header(RELAYED_HEADER) !== undefined };
  };
  const h = (fn: (req: Request) => Promise<unknown>) => (req: Request, res: Response) => {
    fn(req).then(
      (body) => res.json(body),
      (err) => {
        const e = toHttpError(err);
        res.status(e.status).json({ errors: e.errors });
      },
    );
  };
  const asSecondary = (req: Request) => r.authenticateSecondary(req.header(CREDENTIAL_HEADER), peerOf(req));

  router.post('/register', h(async (req) => {
    const id = await asSecondary(req);
    const b = req.body as { api_addr?: string; version?: string; cluster_addr?: string };
    if (typeof b.api_addr !== 'string' || !/^https?:\/\//.test(b.api_addr)) throw new InvalidRequest('api_addr must be an http(s) URL');
    return r.register(id, b.api_addr.replace(/\/$/, ''), String(b.version ?? ''), typeof b.cluster_addr === 'string' ? b.cluster_addr : undefined);
  }));
  // The index lives on the active node: a standby relays these two there.
  for (const path of ['/merkle-diff', '/merkle-sync'] as const) {
    router.post(path, (req, res) => {
      (async () => {
        const id = await asSecondary(req);
        const relayed = await r.viaActive(path, req.body ?? {}, req.header(CREDENTIAL_HEADER)!, req.header(RELAYED_HEADER) !== undefined);
        if (relayed) return res.status(relayed.status).json(relayed.body);
        return res.json(path === '/merkle-diff' ? await r.merkleDiff(id, req.body ?? {}) : await r.merkleSync(id, req.body ?? {}));
      })().catch((err) => {
        const e = toHttpError(err);
        res.status(e.status).json({ errors: e.errors });
      });
    });
  }
  router.get('/keyring', h(async (req) => ({ keyring: await r.sealedKeyringFor(await asSecondary(req)) })));
  router.post('/heartbeat', h(async (req) => r.heartbeatFrom(await asSecondary(req), req.body ?? {})));
  router.post('/forward', (req, res) => {
    (async () => {
      const id = await asSecondary(req);
      const b = req.body as Partial<LogicalRequest>;
      const lreq: LogicalRequest = {
        operation: b.operation!,
        path: String(b.path ?? ''),
        data: (b.data ?? {}) as Record<string, unknown>,
        query: (b.query ?? {}) as Record<string, string>,
        token: null,
        headers: { 'content-type': b.headers?.['content-type'] },
      };
      if (!['read', 'create', 'update', 'delete', 'list', 'patch'].includes(lreq.operation)) throw new InvalidRequest('bad operation');
      return r.runForwarded(id, lreq);
    })().then(
      (out) => res.json(out),
      (err) => {
        const e = toHttpError(err);
        res.status(e.status).json({ errors: e.errors });
      },
    );
  });
  router.post('/apply', (req, res) => {
    serveApply(r, req.body, req.header(CREDENTIAL_HEADER), peerOf(req))
      .then((out) => res.status(out.status).json(out.body))
      .catch(() => {
        if (!res.headersSent) res.status(500).json({ errors: ['internal error'] });
      });
  });
  return router;
}

/**
 * POST /apply (a WAL batch from the primary): fencing first — a superseded primary learns it
 * from the 409, whoever it is — then the primary's credential, then the batch. Served by the
 * router above, and on an API listener by app.ts's hot path, which skips Express for it.
 */
export async function serveApply(r: Replication, body: unknown, credential: string | undefined, peer: Peer | undefined): Promise<{ status: number; body: unknown }> {
  try {
    const b = (body ?? {}) as Parameters<Replication['applyPushed']>[0] & { epoch?: unknown };
    const stale = await r.epochGuard(b);
    if (stale) return { status: 409, body: { errors: [stale.reason], epoch: stale.epoch } };
    await r.authenticatePrimary(credential, peer);
    return { status: 200, body: await r.applyPushed(b) };
  } catch (err) {
    const e = toHttpError(err);
    return { status: e.status, body: { errors: e.errors } };
  }
}

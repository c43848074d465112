/**
 * The cluster listener (Vault's "cluster port"): replication traffic between clusters over
 * mutual TLS, apart from the API listeners.
 *
 * It serves only the internal replication endpoints. Its certificate is this cluster's leaf
 * from the replication CA and it trusts only that CA: a client that presents no certificate,
 * or one that does not chain to the CA, fails the handshake (`requestCert`,
 * `rejectUnauthorized`) before any HTTP is read. The identity is only known once the barrier
 * is unsealed and the cluster has a replication role, so the port is bound at boot with no
 * certificate (every handshake fails) and `setIdentity` installs one when it appears or
 * changes (primary/enable, secondary/enable, update-primary).
 */
import * as https from 'node:https';
import type * as net from 'node:net';
import * as tls from 'node:tls';
import express from 'express';
import type { ListenerIdentity } from '../replication/cluster-tls';

export interface ClusterListener {
  address: { host: string; port: number };
  /** Installs what the listener presents and trusts (null: refuse every handshake). */
  setIdentity(id: ListenerIdentity | null): void;
  close(): Promise<void>;
}

/** The internal replication router under `prefix`, and nothing else. */
export function clusterApp(prefix: string, router: express.Router, maxRequestSizeBytes: number): express.Express {
  const app = express();
  app.disable('x-powered-by');
  app.use(express.json({ limit: maxRequestSizeBytes, type: () => true, strict: false }));
  app.use(prefix, router);
  app.use((_req, res) => {
    res.status(404).json({ errors: ['the cluster listener serves replication only'] });
  });
  return app;
}

const BASE: tls.SecureContextOptions = { minVersion: 'TLSv1.2' };

export async function listenCluster(app: express.Express, host: string, port: number): Promise<ClusterListener> {
  const server = https.createServer({ ...BASE, requestCert: true, rejectUnauthorized: true }, app);
  server.keepAliveTimeout = 30_000;
  const sockets = new Set<net.Socket>();
  server.on('secureConnection', (s: net.Socket) => {
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  // A failed handshake (no certificate, a foreign CA) is the client's problem, not ours.
  server.on('tlsClientError', () => undefined);
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const bound = server.address() as net.AddressInfo;
  let current = '';
  return {
    address: { host, port: bound.port },
    setIdentity(id) {
      const key = id ? id.cert : '';
      if (key === current) return;
      current = key;
      server.setSecureContext(id ? { ...BASE, ca: id.ca, cert: id.cert, key: id.key } : { ...BASE });
      // Connections made under the old identity go: the new role must be proven afresh.
      for (const s of sockets) s.destroy();
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeIdleConnections();
        // In-flight replication calls get a moment; the peers retry whatever is cut.
        setTimeout(() => server.closeAllConnections(), 2000).unref();
      }),
  };
}

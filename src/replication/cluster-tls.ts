/**
 * Replication over mutual TLS (vault-api.md §3.7), when the primary's listener has TLS:
 *
 * - `primary/enable` mints a self-signed replication CA (pki.ts) and a leaf for the primary
 *   itself. Both are stored barrier-encrypted in LOCAL storage (never replicated, never sent:
 *   only the CA's certificate leaves the primary).
 * - `secondary-token` issues a leaf for that secondary id (CN = the id); the response-wrapped
 *   bundle carries it with its key, the CA certificate, the primary's leaf name and the
 *   primary's cluster address.
 * - Every server process of either cluster serves the internal replication endpoints on its
 *   cluster listener (src/http/cluster-listener.ts) with its leaf, and accepts only client
 *   certificates that chain to the replication CA. A call is admitted when the client
 *   certificate's CN matches the credential it carries: the secondary id in the credential
 *   header on the primary, the primary's leaf on a secondary. The per-secondary secret is
 *   still checked too (defence in depth).
 *
 * A primary whose listener has no TLS mints nothing: its secondaries talk plain HTTP to its API
 * listener as before.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Barrier } from '../core/barrier';
import { InvalidRequest, PermissionDenied, UpstreamUnavailable } from '../core/errors';
import { createCa, issueLeaf, primaryCommonName, type CertAndKey } from './pki';
import { Remembered } from './remembered';
import type { TlsContext } from './wire';

const CA_PATH = 'core/replication/tls/ca';
const PRIMARY_LEAF_PATH = 'core/replication/tls/primary';
const SECONDARY_ADDR_PREFIX = 'core/replication/tls/secondaries/';
const secondaryAddrPath = (id: string) => `${SECONDARY_ADDR_PREFIX}${id}`;
/** How long a process trusts what it read of its primary leaf and of secondaries' addresses. */
const CACHE_MS = 1000;

/** The TLS part of a secondary's bootstrap bundle (inside the response-wrapped secret). */
export interface BundleTls {
  /** The replication CA's certificate (never its key). */
  ca: string;
  /** This secondary's leaf (CN = its id) and the leaf's private key. */
  cert: string;
  key: string;
  /** The CN of the primary's leaf: the only client a secondary accepts batches from. */
  primary_name: string;
  /** Where the primary's cluster listener is. */
  primary_cluster_addr: string;
}

/** What a secondary keeps (barrier-encrypted, local) to talk to its primary. */
export interface Credential {
  secondary_id: string;
  secret: string;
  /** PEM roots for the primary's API listener (secondary/enable's ca_file, ca_path). */
  api_ca?: string;
  tls?: BundleTls;
}

/** What a cluster listener presents and trusts. */
export interface ListenerIdentity {
  ca: string;
  cert: string;
  key: string;
}

/** Who called, as the cluster listener saw it (undefined: the call came in on an API listener). */
export interface Peer {
  /** The verified client certificate's common name. */
  cn: string | null;
  /** The call carries the relayed header (a standby of this cluster passing a call on). */
  relayed: boolean;
}

interface PrimaryLeaf extends CertAndKey {
  name: string;
  ca: string;
}

/** Where and how to reach the other side. */
export interface Route {
  base: string;
  tls?: TlsContext;
}

/** Reads secondary/enable's `ca_file` and `ca_path` (every file in it) as one PEM bundle. */
export function loadCaRoots(caFile?: string, caPath?: string): string | undefined {
  const pems: string[] = [];
  const add = (file: string, what: string) => {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw new InvalidRequest(`cannot read ${what} "${file}": ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    const certs = text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? [];
    if (certs.length === 0 && what === 'ca_file') throw new InvalidRequest(`ca_file "${file}" holds no PEM certificate`);
    pems.push(...certs);
  };
  if (caFile) add(caFile, 'ca_file');
  if (caPath) {
    let names: string[];
    try {
      names = readdirSync(caPath).sort();
    } catch (err) {
      throw new InvalidRequest(`cannot read ca_path "${caPath}": ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
    for (const n of names) {
      const f = join(caPath, n);
      if (statSync(f).isFile()) add(f, 'ca_path file');
    }
    if (pems.length === 0) throw new InvalidRequest(`ca_path "${caPath}" holds no PEM certificate`);
  }
  return pems.length ? pems.join('\n') + '\n' : undefined;
}

/** Secondary side: the primary's cluster listener with our leaf, or its API listener. */
export function routeToPrimary(cred: Credential, primaryApiAddr: string | null): Route {
  if (cred.tls) {
    return { base: cred.tls.primary_cluster_addr, tls: { ca: cred.tls.ca, cert: cred.tls.cert, key: cred.tls.key, peerName: cred.tls.primary_name } };
  }
  return { base: primaryApiAddr ?? '', tls: cred.api_ca ? { ca: cred.api_ca } : undefined };
}

/** Secondary side: may this peer push batches to us? */
export function admitsPrimary(cred: Credential, peer: Peer | undefined): boolean {
  // With replication certificates, only the primary's leaf on the cluster listener; without,
  // only the API listener (a cluster listener has no identity then).
  return cred.tls ? peer !== undefined && peer.cn === cred.tls.primary_name : peer === undefined;
}

/** The primary side of the replication PKI, and the cluster addresses of its secondaries. */
export class ReplicationTls {
  /** Told when this process's listener identity may have changed (main.ts refreshes it). */
  onChange: (() => void) | null = null;
  private readonly leafCache = new Remembered<PrimaryLeaf | null>(CACHE_MS);
  private readonly addrCache = new Map<string, { at: number; addr: string | null }>();

  constructor(private readonly barrier: () => Barrier) {}

  /** primary/enable on a TLS listener: a new CA and the primary's own leaf, stored locally. */
  async mint(setId: string): Promise<void> {
    const ca = await createCa(`Coffer replication CA ${setId}`);
    const name = primaryCommonName(setId);
    const leaf = await issueLeaf(ca, name);
    await this.barrier().transaction(async (tx) => {
      await tx.putLocal(CA_PATH, ca);
      await tx.putLocal(PRIMARY_LEAF_PATH, { ...leaf, name, ca: ca.cert } satisfies PrimaryLeaf);
    });
    this.leafCache.forget();
    this.onChange?.();
  }

  /** primary/disable: the CA, the primary's leaf and the secondaries' addresses go. */
  async drop(): Promise<void> {
    const b = this.barrier();
    const addrs = await b.listLocal(SECONDARY_ADDR_PREFIX);
    await b.transaction(async (tx) => {
      await tx.deleteLocal(CA_PATH);
      await tx.deleteLocal(PRIMARY_LEAF_PATH);
      for (const k of addrs) await tx.deleteLocal(k.startsWith(SECONDARY_ADDR_PREFIX) ? k : secondaryAddrPath(k));
    });
    this.leafCache.forget();
    this.addrCache.clear();
    this.onChange?.();
  }

  /** The primary's leaf (with the CA certificate and its name); null on a primary without TLS. */
  async primaryLeaf(): Promise<PrimaryLeaf | null> {
    return this.leafCache.get(() => this.barrier().getLocal<PrimaryLeaf>(PRIMARY_LEAF_PATH));
  }

  /** secondary-token: a leaf for `id` (CN = id), when this primary has a CA. */
  async issueFor(id: string, primaryClusterAddr: string): Promise<BundleTls | undefined> {
    // The CA key is read only here, and not kept.
    const ca = await this.barrier().getLocal<CertAndKey>(CA_PATH);
    const primary = await this.primaryLeaf();
    if (!ca || !primary) return undefined;
    if (!primaryClusterAddr) throw new InvalidRequest('this primary has a replication CA but no cluster listener in this process');
    const leaf = await issueLeaf(ca, id);
    return { ca: ca.cert, cert: leaf.cert, key: leaf.key, primary_name: primary.name, primary_cluster_addr: primaryClusterAddr };
  }

  /** Primary side: may this peer speak for secondary `id`? */
  async admitsSecondary(id: string, peer: Peer | undefined): Promise<void> {
    const leaf = await this.primaryLeaf();
    if (!peer) {
      if (leaf) throw new PermissionDenied('replication calls to this primary must use its cluster listener (mutual TLS)');
      return;
    }
    // A standby of this cluster relays merkle calls to the active node with the primary's leaf.
    if (!leaf || !(peer.cn === id || (peer.relayed && peer.cn === leaf.name))) {
      throw new PermissionDenied('the client certificate does not belong to this secondary');
    }
  }

  /** Primary side: where to push batches to secondary `id`, and how. */
  async routeToSecondary(id: string, apiAddr: string): Promise<Route> {
    const leaf = await this.primaryLeaf();
    if (!leaf) return { base: apiAddr };
    const addr = await this.secondaryAddr(id);
    if (!addr) throw new UpstreamUnavailable(`secondary "${id}" has not told us its cluster address`);
    return { base: addr, tls: { ca: leaf.ca, cert: leaf.cert, key: leaf.key, peerName: id } };
  }

  /** Primary side: the route to this cluster's own active node (merkle calls a standby relays). */
  async routeToOwnNode(apiAddr: string, clusterAddr: string): Promise<Route> {
    const leaf = await this.primaryLeaf();
    if (!leaf) return { base: apiAddr };
    return { base: clusterAddr, tls: { ca: leaf.ca, cert: leaf.cert, key: leaf.key, peerName: leaf.name } };
  }

  /** Records where secondary `id`'s cluster listener is (at register; heartbeats when it moves). */
  async setSecondaryAddr(id: string, addr: string): Promise<void> {
    if (!/^https:\/\//.test(addr)) throw new InvalidRequest('cluster_addr must be an https URL');
    const clean = addr.replace(/\/$/, '');
    if ((await this.secondaryAddr(id)) === clean) return;
    await this.barrier().transaction((tx) => tx.putLocal(secondaryAddrPath(id), clean));
    this.addrCache.set(id, { at: Date.now(), addr: clean });
  }

  async secondaryAddr(id: string): Promise<string | null> {
    const c = this.addrCache.get(id);
    if (c && Date.now() - c.at < CACHE_MS) return c.addr;
    const addr = await this.barrier().getLocal<string>(secondaryAddrPath(id));
    this.addrCache.set(id, { at: Date.now(), addr });
    return addr;
  }

  async forgetSecondary(id: string): Promise<void> {
    await this.barrier().transaction((tx) => tx.deleteLocal(secondaryAddrPath(id)));
    this.addrCache.delete(id);
  }
}

/** The logical request and response that flow between http/ and core. */
import type { RawRead, TokenRecord, VersionedRead } from './ports';

export type Operation = 'read' | 'create' | 'update' | 'delete' | 'list' | 'patch';

export interface LogicalRequest {
  operation: Operation;
  /** Canonical path without the /v1/ prefix and without a leading slash. */
  path: string;
  data: Record<string, unknown>;
  query: Record<string, string>;
  token: string | null;
  headers: Record<string, string | undefined>;
  remoteAddr?: string;
  /**
   * Set when a secondary forwarded this request (already authenticated and authorised there,
   * on a token that exists only on that cluster): the replication credential vouches for it.
   */
  forwardedBy?: string;
}

export interface AuthBlock {
  client_token: string;
  accessor: string;
  policies: string[];
  token_policies: string[];
  metadata: Record<string, string> | null;
  lease_duration: number;
  renewable: boolean;
  entity_id: string;
  token_type: string;
  orphan: boolean;
  mfa_requirement: null;
  num_uses: number;
}

export interface LogicalResponse {
  data?: Record<string, unknown> | null;
  auth?: AuthBlock | null;
  warnings?: string[];
  leaseId?: string;
  leaseDuration?: number;
  renewable?: boolean;
  /** Status when not the default (200 with body / 204 without). */
  status?: number;
  /** Highest WAL insertion number this request wrote (X-Vault-Index). */
  walLsn?: number;
  /** The primary's WAL position of a forwarded write (X-Vault-Index on a secondary). */
  replicatedLsn?: number;
  /** Set when the response was wrapped: the envelope carries only this. */
  wrapInfo?: import('./wrapping').WrapInfo;
}

/** What a backend handler sees: the request, the caller's token record, and the mount. */
export interface RequestContext {
  req: LogicalRequest;
  token: TokenRecord | null;
  /** The path relative to the mount. */
  subpath: string;
  /** What the route's `prefetch` plan asked for, read with the token (still encrypted). */
  prefetched?: RawRead | null;
  /** What the route's write plan asked for, read with the token (still encrypted). */
  prefetchedVersions?: VersionedRead | null;
}

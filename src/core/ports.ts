/**
 * What core needs from storage, as small interfaces (core imports no database code).
 * src/storage/pg-store.ts implements them on Postgres.
 */

/** A transaction on replicated storage. Values are already barrier-encrypted. */
export interface StoreTx {
  get(path: string): Promise<Buffer | null>;
  /** Several entries in one round trip, in the order asked. */
  getMany(paths: string[]): Promise<(Buffer | null)[]>;
  list(prefix: string): Promise<string[]>;
  /** Writes the entry and its WAL row together (the row is numbered when the transaction ends). */
  put(path: string, value: Buffer): Promise<void>;
  /** Several puts (each with its WAL row) in one statement. */
  putMany(entries: [string, Buffer][]): Promise<void>;
  /** False (and no WAL row) when there was no live value to delete. */
  delete(path: string): Promise<boolean>;
  /** Serialises read-modify-write of one logical key for the rest of the transaction. */
  lock(key: string): Promise<void>;
  /** Local (never replicated) storage, in the same transaction. */
  getLocal(path: string): Promise<Buffer | null>;
  putLocal(path: string, value: Buffer): Promise<void>;
  deleteLocal(path: string): Promise<void>;
  listLocal(prefix: string): Promise<string[]>;
}

export interface SealRecord {
  sealType: 'shamir' | 'static';
  secretShares: number;
  secretThreshold: number;
  wrappedRootKey: Buffer | null;
  sealKeyId: string | null;
  keyring: Buffer;
  clusterId: string;
  clusterName: string;
}

export interface Store {
  get(path: string): Promise<Buffer | null>;
  /** The entry at `path` and the last live entry (in path order) under `prefix`, in one round trip. */
  getWithLast(path: string, prefix: string): Promise<{ value: Buffer | null; last: { path: string; value: Buffer } | null }>;
  list(prefix: string): Promise<string[]>;
  getLocal(path: string): Promise<Buffer | null>;
  listLocal(prefix: string): Promise<string[]>;
  /**
   * Runs `fn` in one transaction; `lastLsn` is the highest WAL position it wrote (0: none).
   * Throws KeyringStale if a put used a superseded keyring term (nothing is committed).
   */
  transaction<T>(fn: (tx: StoreTx) => Promise<T>): Promise<{ result: T; lastLsn: number }>;

  readSeal(): Promise<SealRecord | null>;
  /** Inserts the seal record; false if the cluster was initialised meanwhile. */
  createSeal(rec: SealRecord): Promise<boolean>;
  /** Stores the keyring and its active term (writes under older terms are then refused). */
  updateKeyring(blob: Buffer, activeTerm: number): Promise<void>;
  /**
   * updateKeyring for sys/rotate, under the role guard: false (nothing stored) when this cluster
   * is a secondary or a superseded primary, whose keyring is its primary's.
   */
  rotateKeyring(blob: Buffer, activeTerm: number): Promise<boolean>;

  /**
   * A request's authentication data in ONE round trip: the token with this HMAC, the stored ACL
   * policies its policy names point to and — when `read` is given — what `getWithLast` would
   * return for it, or for a write plan the entries with their row versions (what `getVersioned`
   * would return), all from one snapshot. Null when no token has this HMAC (then nothing else
   * is read).
   */
  authRead(hmac: Buffer, read?: ReadPlan | WritePlan): Promise<AuthRead | null>;

  /** Entries with their row versions (for `casWrite`), in the order asked; batched with concurrent callers. */
  getVersioned(paths: string[]): Promise<Versioned[]>;
  /**
   * An optimistic write: its anchor changes (and then its other entries, each with its WAL row)
   * only if the anchor is still at the version read; null if it had moved (nothing written),
   * else the highest WAL position written. Concurrent calls share one statement, so one commit.
   * Throws KeyringStale if a value used a superseded keyring term (nothing written).
   */
  casWrite(w: CasWrite): Promise<number | null>;

  tokens: TokenRepo;
  leases: LeaseRepo;
  wrapped: WrapRepo;
}

export interface Versioned {
  value: Buffer | null;
  /** The entry row's version (bumped by every put and delete, kept by a delete); 0 if it never existed. */
  version: number;
}

/** See Store.casWrite. Values are already barrier-encrypted; each path appears once. */
export interface CasWrite {
  /** The anchor's new value (null: delete it) and the version its writer read (-1: write it whatever its version). */
  anchor: { path: string; version: number; value: Buffer | null };
  puts: [string, Buffer][];
  deletes: string[];
}

/** The entries a read handler asks for first: `getWithLast(path, prefix)`, or `get(path)` when prefix is null. */
export interface ReadPlan {
  path: string;
  prefix: string | null;
}

/**
 * The entries a write reads first, with their row versions: a `StorageView.modify`'s anchor and
 * extra paths, in that order. Fetched with the token like a read plan, so the write's first
 * attempt needs no read of its own (its version guard still decides).
 */
export interface WritePlan {
  versioned: string[];
}

/** A write plan's answer: the entries with their versions, still encrypted, in the plan's order. */
export interface VersionedRead {
  paths: string[];
  entries: Versioned[];
}

/** `getWithLast`'s answer for a plan, still encrypted. */
export interface RawRead extends ReadPlan {
  value: Buffer | null;
  last: { path: string; value: Buffer } | null;
}

export interface PolicyEntry {
  path: string;
  /** The ciphertext. */
  value: Buffer;
}

export interface AuthRead {
  token: TokenRecord;
  /**
   * The storage paths Postgres looked up for the token's policy names (`core/policies/acl/` +
   * trimmed, lower-cased name; not `root` or `response-wrapping`), existing or not.
   */
  policyPaths: string[];
  /** Those of them that exist. */
  policies: PolicyEntry[];
  read: RawRead | null;
  /** The write plan's entries, when one was given. */
  versioned: VersionedRead | null;
  /**
   * What storage says of this cluster's role, read in the same statement: true while it is a
   * secondary or a superseded primary (it takes no client writes of replicated data).
   */
  replicaReadOnly: boolean;
}

export interface TokenRecord {
  hmac: Buffer;
  accessor: string;
  parentHmac: Buffer | null;
  policies: string[];
  tokenType: 'service' | 'batch';
  displayName: string;
  path: string;
  meta: Record<string, string>;
  orphan: boolean;
  renewable: boolean;
  numUses: number;
  ttlSeconds: number;
  explicitMaxTtlSeconds: number;
  periodSeconds: number;
  role: string | null;
  entityId: string;
  createdAt: Date;
  expiresAt: Date | null;
}

export interface TokenRepo {
  insert(rec: TokenRecord): Promise<void>;
  byHmac(hmac: Buffer): Promise<TokenRecord | null>;
  byAccessor(accessor: string): Promise<TokenRecord | null>;
  children(hmac: Buffer): Promise<TokenRecord[]>;
  /** Returns false if the token was already gone. */
  delete(hmac: Buffer): Promise<boolean>;
  /**
   * Spends one use of a token with num_uses > 0 and returns the uses left; the last use stores
   * -1 (revocation pending) and returns 0. Null if the token is gone or had no use left.
   */
  use(hmac: Buffer): Promise<number | null>;
  update(hmac: Buffer, patch: Partial<Pick<TokenRecord, 'expiresAt' | 'ttlSeconds'>>): Promise<void>;
  expired(now: Date, limit: number): Promise<Buffer[]>;
  /** Accessors of service tokens (batch tokens have none), sorted. */
  accessors(): Promise<string[]>;
  orphanChildren(hmac: Buffer): Promise<void>;
  /** Tokens whose parent no longer exists (a child created while its parent was being revoked). */
  withMissingParent(limit: number): Promise<Buffer[]>;
  /** Tokens whose last use was spent but whose revocation never ran (num_uses = -1). */
  usedUp(limit: number): Promise<Buffer[]>;
  /** Leases owned by a token that no longer exists. */
  leaseIdsOfMissingTokens(limit: number): Promise<string[]>;
}

export interface LeaseRecord {
  leaseId: string;
  tokenHmac: Buffer | null;
  kind: 'auth' | 'secret';
  path: string;
  issuedAt: Date;
  lastRenewal: Date | null;
  expiresAt: Date | null;
  ttlSeconds: number;
  maxExpiresAt: Date | null;
  renewable: boolean;
}

export interface LeaseRepo {
  insert(rec: LeaseRecord): Promise<void>;
  get(leaseId: string): Promise<LeaseRecord | null>;
  update(leaseId: string, patch: Partial<Pick<LeaseRecord, 'expiresAt' | 'lastRenewal' | 'ttlSeconds'>>): Promise<void>;
  delete(leaseId: string): Promise<boolean>;
  byToken(hmac: Buffer): Promise<LeaseRecord[]>;
  /** Lease ids under a prefix (`auth/userpass/login/` …). */
  idsWithPrefix(prefix: string): Promise<string[]>;
  expired(now: Date, limit: number): Promise<string[]>;
}

export interface WrappedRecord {
  tokenHmac: Buffer;
  accessor: string;
  creationPath: string;
  createdAt: Date;
  expiresAt: Date;
  payload: Buffer;
}

export interface WrapRepo {
  insert(rec: WrappedRecord): Promise<void>;
  get(hmac: Buffer): Promise<WrappedRecord | null>;
  /** Deletes and returns the record: a wrapping token is single use. */
  take(hmac: Buffer): Promise<WrappedRecord | null>;
  deleteExpired(now: Date): Promise<number>;
}

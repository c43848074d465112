/**
 * Core: the engine behind the API, knowing nothing of HTTP. It owns the seal state of this
 * process, resolves tokens, authorises requests against policies and routes them to the
 * engine mounted at their path.
 */
import { Barrier } from './barrier';
import type { Clock } from './clock';
import { InvalidRequest, MustForward, NotInitialized, PermissionDenied, Sealed, UnsupportedPath } from './errors';
import { openKeyring, sealKeyring, type Keyring } from './keyring';
import { KvEngine } from './kv';
import { MountTable, type MountEntry } from './mounts';
import { openApiPaths, RouteTable } from './framework';
import { Acl, DEFAULT_POLICY, requiresSudo, RESPONSE_WRAPPING_POLICY, type Capability, type Policy } from './policy';
import type { AuthRead, ReadPlan, Store, TokenRecord, WritePlan } from './ports';
import type { LogicalRequest, LogicalResponse, RequestContext } from './request';
import { SealState, type StaticSealKey } from './seal';
import { SysBackend } from './sys/index';
import { MAX_TOKEN_LENGTH, TokenStore, TOKEN_HMAC_KEY_PATH } from './tokens';
import { createHash, randomBytes } from 'node:crypto';
import { AppRoleBackend } from './auth/approle';
import { TokenBackend } from './auth/token';
import { UserpassBackend } from './auth/userpass';
import { noScheduler, type ExpiryScheduler, type ExpiryTarget } from './expiry';
import { LeaseManager } from './leases';
import { parseDurationSeconds } from './units';
import { Wrapping } from './wrapping';

export interface CoreOptions {
  store: Store;
  clock: Clock;
  staticSeal?: StaticSealKey;
  clusterName?: string;
  version: string;
  scheduler?: ExpiryScheduler;
}

export interface SealStatus {
  type: string;
  initialized: boolean;
  sealed: boolean;
  t: number;
  n: number;
  progress: number;
  nonce: string;
  version: string;
  build_date: string;
  migration: boolean;
  recovery_seal: boolean;
  storage_type: string;
  cluster_name?: string;
  cluster_id?: string;
}

const TRUE_VALUES = new Set(['1', 't', 'true', 'T', 'TRUE', 'True']);

function assertDuration(v: string, name: string): void {
  try {
    if (parseDurationSeconds(v) <= 0) throw new Error('must be positive');
  } catch (err) {
    throw new InvalidRequest(`${name}: ${(err as Error).message}`);
  }
}

/** Sends a request to the primary (set on secondaries by the composition root). */
export interface Forwarder {
  forward(req: LogicalRequest): Promise<LogicalResponse>;
}

export class Core implements ExpiryTarget {
  forwarder: Forwarder | null = null;
  /**
   * Re-reads this cluster's replication role (set by replication): storage refused a write
   * because the cluster is a secondary, which this process had not heard yet.
   */
  refreshRole: (() => Promise<void>) | null = null;
  readonly barrier: Barrier;
  readonly mounts: MountTable;
  readonly tokens: TokenStore;
  readonly sealState: SealState;
  readonly kv: KvEngine;
  readonly sys: SysBackend;
  readonly leases: LeaseManager;
  readonly wrapping: Wrapping;
  readonly tokenBackend: TokenBackend;
  readonly userpass: UserpassBackend;
  readonly approle: AppRoleBackend;
  /** Engine and auth-method types → the route table serving a mount of that type. */
  readonly backends: Map<string, (m: MountEntry) => RouteTable>;
  private clusterId = '';
  /** Decoded policies by path and ciphertext hash (see policyFrom). */
  private readonly decodedPolicies = new Map<string, Policy>();
  private clusterNameValue = '';
  private mountsLoadedAt = 0;

  constructor(readonly opts: CoreOptions) {
    this.barrier = new Barrier(opts.store);
    this.mounts = new MountTable(this.barrier);
    this.tokens = new TokenStore(opts.store.tokens, opts.clock);
    this.sealState = new SealState(opts.store, opts.staticSeal);
    this.kv = new KvEngine(this.barrier, opts.clock);
    this.leases = new LeaseManager(opts.store.leases, opts.clock, opts.scheduler ?? noScheduler);
    this.tokens.scheduler = opts.scheduler ?? noScheduler;
    this.tokens.onRevoke = async (hmac) => {
      await this.leases.revokeForToken(hmac);
      await this.wrapping.discard(hmac);
    };
    this.wrapping = new Wrapping(this);
    this.sys = new SysBackend(this);
    this.tokenBackend = new TokenBackend(this);
    this.userpass = new UserpassBackend(this);
    this.approle = new AppRoleBackend(this);
    this.backends = new Map<string, (m: MountEntry) => RouteTable>([
      ['system', () => this.sys.table],
      ['kv', (m) => this.kv.routes(m)],
      ['token', () => this.tokenBackend.table],
      ['userpass', (m) => this.userpass.routes(m)],
      ['approle', (m) => this.approle.routes(m)],
    ]);
  }

  get sealed(): boolean {
    return this.barrier.sealed;
  }

  get clusterName(): string {
    return this.clusterNameValue;
  }

  get clusterIdentity(): string {
    return this.clusterId;
  }

  // ------------------------------------------------------------------ seal lifecycle

  async sealStatus(): Promise<SealStatus> {
    const rec = await this.opts.store.readSeal();
    return {
      type: rec?.sealType ?? (this.opts.staticSeal ? 'static' : 'shamir'),
      initialized: rec !== null,
      sealed: this.sealed,
      t: rec?.secretThreshold ?? 0,
      n: rec?.secretShares ?? 0,
      progress: this.sealState.progress,
      nonce: this.sealState.nonce,
      version: this.opts.version,
      build_date: '2026-11-21T00:00:00Z',
      migration: false,
      recovery_seal: rec?.sealType === 'static',
      storage_type: 'postgresql',
      ...(this.sealed ? {} : { cluster_name: this.clusterNameValue, cluster_id: this.clusterId }),
    };
  }

  /** sys/init: creates keys, mounts nothing but built-ins, returns shares and the root token. */
  async initialize(shares: number, threshold: number, opts: { rootTokenId?: string } = {}) {
    this.initializing = true;
    try {
      return await this.initializeOnce(shares, threshold, opts);
    } finally {
      this.initializing = false;
    }
  }

  /**
   * Set while sys/init runs: the static seal's auto-unseal timer must not open the barrier
   * between the seal record's write and the token HMAC key's (it would find the key missing,
   * seal the core, and the init would answer 503).
   */
  private initializing = false;

  private async initializeOnce(shares: number, threshold: number, opts: { rootTokenId?: string }) {
    const res = await this.sealState.initialize({
      secretShares: shares,
      secretThreshold: threshold,
      clusterName: this.opts.clusterName ?? `coffer-cluster-${randomBytes(4).toString('hex')}`,
    });
    // Open the barrier briefly to write the token HMAC key and the root token, as Vault does.
    await this.openBarrier(res.keyring, res.rootKey, res.record.clusterId, res.record.clusterName, { firstTime: true });
    const { token } = await this.tokens.create({
      policies: ['root'],
      orphan: true,
      displayName: 'root',
      path: 'auth/token/root',
      id: opts.rootTokenId,
    });
    if (res.record.sealType === 'shamir') this.sealLocal();
    return { keys: res.keys, rootToken: token, recovery: res.record.sealType === 'static' };
  }

  async unseal(key: Buffer): Promise<void> {
    if (!this.sealed) return;
    const opened = await this.sealState.submitShare(key);
    if (!opened) return;
    const rec = (await this.opts.store.readSeal())!;
    await this.openBarrier(opened.keyring, opened.rootKey, rec.clusterId, rec.clusterName);
  }

  /** Static seal: unseal at boot without operators. No-op if not initialised yet. */
  async autoUnseal(): Promise<boolean> {
    if (!this.opts.staticSeal || !this.sealed || this.initializing) return false;
    const rec = await this.opts.store.readSeal();
    if (!rec) return false;
    const opened = await this.sealState.autoUnseal();
    await this.openBarrier(opened.keyring, opened.rootKey, rec.clusterId, rec.clusterName);
    return true;
  }

  private rootKey: Buffer | null = null;

  private async openBarrier(keyring: Keyring, rootKey: Buffer, clusterId: string, clusterName: string, o: { firstTime?: boolean } = {}) {
    this.rootKey = rootKey;
    this.barrier.unsealWith(keyring, async () => {
      const rec = await this.opts.store.readSeal();
      if (!rec || !this.rootKey) throw new Sealed();
      return openKeyring(this.rootKey, rec.keyring);
    });
    let hmacKey = await this.barrier.getLocal<string>(TOKEN_HMAC_KEY_PATH);
    if (!hmacKey) {
      if (!o.firstTime) {
        this.sealLocal();
        throw new Error('token HMAC key missing from local storage');
      }
      hmacKey = randomBytes(32).toString('base64');
      await this.barrier.transaction((tx) => tx.putLocal(TOKEN_HMAC_KEY_PATH, hmacKey));
    }
    this.tokens.setKey(Buffer.from(hmacKey, 'base64'));
    this.clusterId = clusterId;
    this.clusterNameValue = clusterName;
    await this.reloadMounts();
  }

  /** Seals this process (not others: each process holds its own keys in memory). */
  sealLocal(): void {
    this.decodedPolicies.clear();
    this.barrier.seal();
    this.tokens.setKey(null);
    this.rootKey = null;
    this.sealState.reset();
  }

  /** sys/rotate: a new keyring term, stored under the root key. */
  async rotate(): Promise<Keyring> {
    if (!this.rootKey) throw new Sealed();
    // A secondary uses its primary's keyring: rotation happens there, and the new term arrives
    // with the next batch.
    if (this.barrier.replicatedReadOnly) throw new MustForward();
    const rec = await this.opts.store.readSeal();
    if (!rec) throw new NotInitialized();
    // Start from the stored keyring (another process may have rotated already).
    const next = openKeyring(this.rootKey, rec.keyring).rotate(this.opts.clock.now());
    // Storage's role guard: a process that has not heard yet that its cluster became a
    // secondary must not install a term of its own (the primary's next term would then look
    // known, and its values undecryptable here).
    if (!(await this.opts.store.rotateKeyring(sealKeyring(this.rootKey, next), next.activeTerm))) throw new MustForward();
    this.barrier.setKeyring(next);
    return next;
  }

  /**
   * A secondary takes its primary's keyring (replicated values are the primary's ciphertext).
   * `reencryptLocal` must move this cluster's local entries to the new keyring first; then the
   * keyring is stored under this cluster's own root key.
   */
  async adoptKeyring(next: Keyring, reencryptLocal: (convert: (path: string, blob: Buffer) => Buffer) => Promise<unknown>): Promise<void> {
    if (!this.rootKey) throw new Sealed();
    const old = this.barrier.currentKeyring;
    await reencryptLocal((path, blob) => next.encrypt(path, old.decrypt(path, blob)));
    await this.opts.store.updateKeyring(sealKeyring(this.rootKey, next), next.activeTerm);
    this.barrier.setKeyring(next);
  }

  async reloadMounts(): Promise<void> {
    await this.mounts.load();
    this.mountsLoadedAt = Date.now();
  }

  // ------------------------------------------------------------------ requests

  async handle(req: LogicalRequest): Promise<LogicalResponse> {
    if (this.sealed) throw new Sealed();
    let route = this.mounts.route(req.path);
    if (!route || Date.now() - this.mountsLoadedAt > 5000) {
      // Another process may have mounted something: the table is re-read on a miss and every 5 s.
      await this.reloadMounts();
      route = this.mounts.route(req.path);
    }
    const table = route ? this.routesFor(route.mount) : null;
    const matched = table?.match(route!.subpath) ?? null;
    const help = req.operation === 'read' && TRUE_VALUES.has(req.query.help ?? '');
    // The token, its policies and (for a read that plans one) the data, in one round trip.
    const auth =
      matched?.def.unauthenticated || req.forwardedBy
        ? null
        : await this.authRead(req.token, matched?.def.prefetch && !help ? matched.def.prefetch({ req, token: null, subpath: route!.subpath, params: matched.params, fields: {} }) : null);
    const token = auth?.token ?? null;
    // Storage's word on this cluster's role came with the token. A process that has not heard
    // of a change yet (NOTIFY on its way) follows it before running the request: otherwise a
    // write that turns out to change nothing here, or fails on data this cluster no longer
    // holds, would be answered here instead of by the primary.
    if (auth && auth.replicaReadOnly !== this.barrier.replicatedReadOnly) await this.refreshRole?.();
    if (!route || !table || !matched) {
      // Vault checks the token before saying a route does not exist, so an anonymous caller
      // learns nothing about mounts.
      throw new UnsupportedPath(`no handler for route "${req.path}". route entry not found.`);
    }
    const ctx: RequestContext = { req, token, subpath: route.subpath };
    if (help) {
      // `?help=1`: the route's description and its OpenAPI item, from the same route table.
      return { data: { help: `## ${matched.def.summary}\n`, openapi: { openapi: '3.0.2', paths: openApiPaths(route.prefix, new RouteTable([matched.def])) } } };
    }
    let use: 'ok' | 'last' | 'exhausted' = 'ok';
    if (token) {
      const acl = await this.aclOf(auth!);
      // The existence check decides create vs update for the ACL; root is allowed either way,
      // so it skips the extra storage read.
      if (req.operation === 'update' && matched.def.exists && !acl.root) {
        const op = (await matched.def.exists({ ...ctx, params: matched.params, fields: {} })) ? 'update' : 'create';
        req = { ...req, operation: op };
        ctx.req = req;
      }
      if (!acl.allows(req.path, req.operation as Capability, Boolean(matched.def.sudo) || requiresSudo(req.path, req.operation))) {
        throw new PermissionDenied();
      }
      // num_uses: spend one use per authorised request; the last use revokes the token after
      // the request, whether or not it succeeded (as Vault does).
      use = await this.tokens.use(token);
      if (use === 'exhausted') throw new PermissionDenied();
      if (token.numUses > 0) ctx.token = { ...token, numUses: token.numUses - 1 };
      // Only now, authorised, does the handler see what was read with the token.
      ctx.prefetched = auth!.read;
      ctx.prefetchedVersions = auth!.versioned;
    }
    const wrapTtl = req.headers['x-vault-wrap-ttl'];
    // A bad wrap TTL is refused before the request runs, so a write is never done unwrapped.
    if (wrapTtl) assertDuration(wrapTtl, 'X-Vault-Wrap-TTL');
    let out: LogicalResponse;
    try {
      out = await table.dispatch(ctx, matched);
    } catch (err) {
      // A secondary's use case tried to write replicated data: nothing committed; the primary
      // runs the request instead (invariant 7), vouched for by this cluster's credential. When
      // it was storage's role guard that refused, this process learns its new role first.
      if (!(err instanceof MustForward)) throw err;
      if (!this.forwarder) await this.refreshRole?.();
      if (!this.forwarder) throw err;
      out = await this.forwarder.forward(req);
    } finally {
      if (use === 'last') await this.tokens.revoke(token!.hmac);
    }
    if (wrapTtl && !out.wrapInfo && (out.data || out.auth)) {
      return this.wrapping.wrap(out, wrapTtl, req.path);
    }
    return out;
  }

  /** The route table serving a mount. */
  routesFor(mount: MountEntry): RouteTable | null {
    return this.backends.get(mount.type)?.(mount) ?? null;
  }

  async authenticate(token: string | null): Promise<TokenRecord> {
    if (!token) throw new PermissionDenied();
    const rec = await this.tokens.lookup(token);
    if (!rec) throw new PermissionDenied();
    return rec;
  }

  /**
   * Authenticates `token` and reads, in the same statement, its stored policies and the
   * planned read: what `authenticate` + `aclFor` + the handler's first read would fetch in
   * 2 + (number of policies) round trips.
   */
  private async authRead(token: string | null, read: ReadPlan | WritePlan | null): Promise<AuthRead> {
    if (!token || token.length > MAX_TOKEN_LENGTH) throw new PermissionDenied();
    const r = await this.opts.store.authRead(this.tokens.digest(token), read ?? undefined);
    if (!r || !this.tokens.isLive(r.token)) throw new PermissionDenied();
    return r;
  }

  /** `aclFor(auth.token)`, from the policy entries read with the token. */
  private async aclOf(auth: AuthRead): Promise<Acl> {
    const stored = new Map(auth.policies.map((p) => [p.path, p.value]));
    const lookedUp = new Set(auth.policyPaths);
    const policies: Policy[] = [];
    for (const name of auth.token.policies.map((n) => n.trim().toLowerCase())) {
      if (name === 'root') policies.push({ name: 'root', rules: [] });
      else if (name === 'response-wrapping') policies.push(RESPONSE_WRAPPING_POLICY);
      else {
        const path = `core/policies/acl/${name}`;
        const blob = stored.get(path);
        // Not looked up: Postgres normalised the name differently (non-ASCII): read it here.
        const p = blob ? await this.policyFrom(path, blob) : lookedUp.has(path) ? null : await this.barrier.get<Policy>(path);
        if (name === 'default') policies.push(p ?? DEFAULT_POLICY);
        else if (p) policies.push(p);
      }
    }
    return new Acl(policies);
  }

  /**
   * Decrypts and parses a stored policy, memoised by its path and the SHA-256 of its
   * ciphertext: the policy is still read from storage on every request (so a change by any
   * process or by replication applies at once); only the work of decoding an unchanged value
   * is saved.
   */
  private async policyFrom(path: string, blob: Buffer): Promise<Policy | null> {
    const key = `${path}\0${createHash('sha256').update(blob).digest('base64')}`;
    const hit = this.decodedPolicies.get(key);
    if (hit) return hit;
    const p = await this.barrier.decrypt<Policy>(path, blob);
    if (p) {
      if (this.decodedPolicies.size >= 1000) this.decodedPolicies.clear();
      this.decodedPolicies.set(key, p);
    }
    return p;
  }

  async aclFor(token: TokenRecord): Promise<Acl> {
    const policies: Policy[] = [];
    for (const name of token.policies.map((n) => n.trim().toLowerCase())) {
      if (name === 'root') policies.push({ name: 'root', rules: [] });
      else if (name === 'response-wrapping') policies.push(RESPONSE_WRAPPING_POLICY);
      else if (name === 'default') policies.push((await this.barrier.get<Policy>('core/policies/acl/default')) ?? DEFAULT_POLICY);
      else {
        const p = await this.barrier.get<Policy>(`core/policies/acl/${name}`);
        if (p) policies.push(p);
      }
    }
    return new Acl(policies);
  }


  // ------------------------------------------------------------------ expiry (ExpiryTarget)

  expireToken(accessor: string): Promise<boolean> {
    return this.tokens.expireByAccessor(accessor);
  }

  async expireLease(leaseId: string): Promise<boolean> {
    const lease = await this.leases.repo.get(leaseId);
    if (!lease?.expiresAt || lease.expiresAt > this.opts.clock.now()) return false;
    // A login's lease is its token's: expiring it revokes the token (and the token's children).
    if (lease.kind === 'auth' && lease.tokenHmac) await this.tokens.revoke(lease.tokenHmac);
    await this.leases.repo.delete(leaseId);
    return true;
  }

  /** The backstop behind the queue's delayed jobs; the active node runs it periodically. */
  async sweep(): Promise<{ tokens: number; leases: number; wrapped: number }> {
    const tokens = await this.tokens.sweep();
    let leases = 0;
    for (;;) {
      const ids = await this.leases.repo.expired(this.opts.clock.now(), 500);
      for (const id of ids) if (await this.expireLease(id)) leases++;
      if (ids.length < 500) break;
    }
    const wrapped = await this.opts.store.wrapped.deleteExpired(this.opts.clock.now());
    return { tokens, leases, wrapped };
  }
}

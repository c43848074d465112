/**
 * Performance replication: this cluster as primary (ships WAL to its secondaries) or as
 * secondary (applies what its primary ships, forwards writes, serves reads locally).
 *
 * The flow of a write (DESIGN.md): primary commits {entry, WAL row} → its active node orders
 * the WAL → a shipping job per secondary reads the next batch after that secondary's cursor
 * (in Postgres) and POSTs it → the secondary applies it in one transaction with its applied
 * position (exactly once, in order) → acknowledges → the primary moves the cursor. Queue jobs
 * are wake-ups only: losing Redis loses nothing.
 */
import { createHash, randomUUID } from 'node:crypto';
import type { Kysely } from 'kysely';
import type { Logger } from 'pino';
import type { Core } from '../core/core';
import { InvalidRequest, PermissionDenied, PreconditionFailed, Relayed, Superseded, UpstreamUnavailable } from '../core/errors';
import { Keyring, open, seal } from '../core/keyring';
import type { LogicalRequest, LogicalResponse } from '../core/request';
import { faultPoint } from '../faults';
import type { JobQueue } from '../queue/jobs';
import { reencryptLocal } from '../storage/local';
import { Remembered } from './remembered';
import type { MerkleIndex } from '../merkle/index';
import { HASH_BYTES, KEY_BYTES, pageHashes, PAGES, rootOf, SUBPAGES_PER_PAGE } from '../merkle/tree';
import { entriesOfSubpages, pathsOfSubpages, readCheckpoint } from '../storage/merkle';
import {
  applyBatch,
  divergenceReport,
  readReplication,
  secondaries,
  shipStep,
  syncEntries,
  updateReplication,
  wipeReplicated,
  withShipLock,
  type Batch,
  type ReplicationRow,
  type ShippedEntry,
} from '../storage/replication';
import type { CommittedRows } from '../storage/entries';
import type { DB } from '../storage/schema';
import { walHead } from '../storage/wal';
import type { Mode, SecondaryState } from './states';
import {
  assertSafePrimaryAddr,
  call,
  compareVersions,
  credentialHeader,
  decodeActivation,
  encodeActivation,
  newSecret,
  type TlsContext,
  parseCredentialHeader,
  secretDigest,
  secretMatches,
  CREDENTIAL_HEADER,
} from './wire';
import { admitsPrimary, ReplicationTls, routeToPrimary, type BundleTls, type Credential, type ListenerIdentity, type Peer } from './cluster-tls';

export const INTERNAL_PREFIX = '/v1/sys/replication/performance/internal';
/** Marks an internal call a standby relayed to its active node (relayed at most once). */
export const RELAYED_HEADER = 'x-coffer-relayed';
const WAL_WAIT_WARNING =
  "Timeout hit while waiting for local replicated cluster to apply primary's write; this client may encounter stale reads of values written during this operation.";

export interface ReplicationOptions {
  db: Kysely<DB>;
  core: Core;
  queue: JobQueue;
  log: Logger;
  /** Set once the listener is up. */
  apiAddr: string;
  /** This process's cluster listener (replication over mutual TLS), once it is up; none without TLS. */
  clusterAddr?: string;
  version: string;
  isActive: () => boolean;
  bestEffortWalWaitMs: number;
  batchMaxRows: number;
  batchMaxBytes: number;
  /** replication { ship_linger, ship_linger_min_entries }: see lingers(). */
  shipLingerMs: number;
  shipLingerMinEntries: number;
  /**
   * Test hook: the tick's period (default TICK_MS). A test makes it very long to show that a
   * change of role reaches every process by NOTIFY, not by the tick.
   */
  tickMs?: number;
  allowUnsafePrimaryAddr?: boolean;
  /** This process's merkle index, once recovered and while this node is active. */
  merkle?: () => MerkleIndex | null;
  /** Told how many keys a merkle-sync moved (metrics). */
  onSynced?: (keys: number) => void;
  /** Told of every batch sent and applied (primary) or applied here (secondary): metrics. */
  onShipped?: (entries: number, bytes: number, ms: number) => void;
  onApplied?: (entries: number, ms: number) => void;
  /** Told of WAL rows apply committed here (the active node feeds them to its index at once). */
  onWalWritten?: (committed: CommittedRows | null) => void;
}

/** A merkle-sync answer stops adding subpages once its entries pass this many bytes. */
const SYNC_RESPONSE_BYTES = 2 * 1024 * 1024;
/** merkle-sync reads the primary's entries this many subpages at a time. */
const SYNC_READ_SUBPAGES = 32;
/** A merkle-sync request carries at most this many of the secondary's records ... */
const SYNC_REQUEST_RECORDS = 64 * 1024;
/** ... and at most this many subpages. */
const SYNC_REQUEST_SUBPAGES = 512;

const b64 = (b: Buffer) => b.toString('base64');
const split = (blob: Buffer, size: number): Buffer[] => {
  const out: Buffer[] = [];
  for (let at = 0; at + size <= blob.length; at += size) out.push(blob.subarray(at, at + size));
  return out;
};

interface WireEntry {
  path: string;
  version: number;
  value: string | null;
}

const toWire = (e: ShippedEntry): WireEntry => ({ path: e.path, version: e.version, value: e.value ? e.value.toString('base64') : null });
const fromWire = (e: WireEntry): ShippedEntry => ({ path: String(e.path), version: Number(e.version), value: e.value === null ? null : Buffer.from(String(e.value), 'base64') });

/**
 * Whether the shipper lingers after a step (see Replication.lingers): a batch went, it carried
 * at least `minEntries` entries (the secondary is kept busy), and it reached the WAL head as the
 * step read it — a batch short of the head was cut by the row or byte bound, so more is waiting
 * already and waiting would only slow a catch-up.
 */
export function shouldLinger(step: { sent: boolean; entries?: number; atHead?: boolean }, lingerMs: number, minEntries: number, stopping: boolean): boolean {
  return step.sent && lingerMs > 0 && !stopping && step.atHead === true && (step.entries ?? 0) >= minEntries;
}

/** Key that protects the keyring in transit: derived from the secondary's secret. */
function keyringTransportKey(secret: string): Buffer {
  return createHash('sha256').update(`coffer-replication-keyring:${secret}`).digest();
}

const CREDENTIAL_PATH = 'core/replication/credential';
/** How long a secondary trusts its remembered credential (see credential()). */
const CREDENTIAL_CACHE_MS = 1000;
/** How long the epoch guard trusts the role and epoch it last read (see epochGuard()). */
const EPOCH_GUARD_CACHE_MS = 1000;
/** Secondary statuses (primary side) that receive WAL batches. */
const SHIPPABLE = new Set(['bootstrapping', 'streaming']);
/** How long poke() trusts its list of shippable secondaries before listing them again. */
const SHIPPABLE_LIST_MS = 1000;
/** The primary's periodic shipping wake-up (pokes do the real work). */
const SAFETY_WAKE_MS = 1000;
/** A streaming secondary in contact heartbeats its primary this often. */
const HEARTBEAT_MS = 1000;
/**
 * How often every process reads its cluster's replication row when nothing happens. A change of
 * role is seen at once (kick); this is the safety net, and the pace of heartbeats and retries.
 */
const TICK_MS = 1000;
/** A timer may fire a little early or late: a duty due every TICK_MS runs on every tick. */
const TICK_SLACK_MS = 100;
/** The columns whose change is a change of role (migration 0009 NOTIFYs on the same ones), and their fields in ReplicationRow. */
const ROLE_COLUMNS = {
  mode: 'mode',
  state: 'state',
  epoch: 'epoch',
  superseded_by_epoch: 'supersededByEpoch',
  primary_api_addr: 'primaryApiAddr',
  secondary_id: 'secondaryId',
  set_id: 'setId',
} as const;
const secondarySecretPath = (id: string) => `core/replication/secondaries/${id}`;

export class Replication {
  private timer: NodeJS.Timeout | null = null;
  private lastSeenMode: Mode | null = null;
  private lastSeenSuperseded = false;
  private reconciling: Promise<void> | null = null;
  private connection: 'connected' | 'disconnected' = 'disconnected';
  private lastPrimaryHeartbeat: Date | null = null;
  /** The replication CA and certificates (cluster-tls.ts). */
  readonly tls = new ReplicationTls(() => this.o.core.barrier);

  constructor(private readonly o: ReplicationOptions) {
    o.core.refreshRole = async () => {
      await this.followRole(await readReplication(this.o.db));
    };
  }

  // ------------------------------------------------------------------ lifecycle

  /** Starts the periodic duties: heartbeats, shipping wake-ups, bootstrap resume. */
  start(): void {
    this.o.queue.process('replication.ship', ({ secondaryId }) => this.shipTo(secondaryId), 4);
    const tick = async () => {
      this.timer = null;
      this.ticking = true;
      this.kicked = false;
      try {
        await this.tick();
      } catch (err) {
        this.o.log.warn({ err: (err as Error).message }, 'replication tick failed');
      }
      this.ticking = false;
      if (this.stopping) return;
      this.timer = setTimeout(tick, this.kicked ? 0 : (this.o.tickMs ?? TICK_MS));
      this.timer.unref();
    };
    this.runTick = tick;
    void tick();
  }

  /**
   * The role changed (this process wrote it, or another did: NOTIFY coffer_replication, migration
   * 0009), or this node became active: run the duties now rather than at the next tick.
   */
  kick(): void {
    if (this.stopping || !this.runTick) return;
    if (this.ticking) {
      this.kicked = true;
    } else if (this.timer) {
      clearTimeout(this.timer);
      this.timer = setTimeout(this.runTick, 0);
      this.timer.unref();
    }
  }
  private runTick: (() => Promise<void>) | null = null;
  private ticking = false;
  private kicked = false;

  stop(): void {
    this.stopping = true;
    for (const done of [...this.lingering]) done();
    if (this.timer) clearTimeout(this.timer);
  }
  /** Set by stop(): a shipping job in this process ends after its batch in flight. */
  private stopping = false;

  private async tick(): Promise<void> {
    const row = await readReplication(this.o.db);
    const superseded = await this.followRole(row);
    if (!this.o.isActive() || this.o.core.sealed) return;
    // Shipping is woken by the active node whenever the WAL moves (poke); this is the safety
    // net (a job that failed, a poke lost to a restart), so once a second is enough.
    if (row.mode === 'primary' && !superseded && Date.now() - this.lastSafetyWake >= SAFETY_WAKE_MS - TICK_SLACK_MS) {
      this.lastSafetyWake = Date.now();
      await this.wakeShipping();
    }
    if (row.mode === 'secondary') await this.secondaryDuties(row);
  }
  private lastSafetyWake = 0;
  private lastHeartbeatSent = 0;

  /** Makes core follow the cluster's role: who may write replicated data, where writes go. */
  private async followRole(row: ReplicationRow): Promise<boolean> {
    this.lastRow = row;
    const superseded = row.mode === 'primary' && row.supersededByEpoch !== null;
    if (row.mode !== this.lastSeenMode || superseded !== this.lastSeenSuperseded) {
      // Another process of this cluster changed the role: follow it.
      this.lastSeenMode = row.mode;
      this.lastSeenSuperseded = superseded;
      this.o.core.barrier.replicatedReadOnly = row.mode === 'secondary' || superseded;
      this.o.core.forwarder =
        row.mode === 'secondary'
          ? { forward: (req) => this.forward(req) }
          : superseded
            ? {
                forward: async () => {
                  throw new Superseded(`this cluster was superseded by a promoted primary (epoch ${row.supersededByEpoch}); demote it and re-point it with secondary/update-primary`);
                },
              }
            : null;
      if (!this.o.core.sealed) await this.o.core.reloadMounts().catch(() => undefined);
    }
    return superseded;
  }

  async mode(): Promise<Mode> {
    return (await readReplication(this.o.db)).mode;
  }

  // ------------------------------------------------------------------ primary

  async enablePrimary(): Promise<LogicalResponse> {
    const row = await readReplication(this.o.db);
    if (row.mode === 'secondary') throw new InvalidRequest('this cluster is a secondary; promote it instead');
    if (row.mode === 'primary') return { warnings: ['this cluster is already a performance primary'] };
    const setId = randomUUID();
    // With TLS on our listener: a replication CA (local, never shared) and our own leaf.
    if (this.o.clusterAddr) await this.tls.mint(setId);
    await this.updateRow({ mode: 'primary', set_id: setId, state: 'running', epoch: 1, superseded_by_epoch: null });
    this.lastSeenMode = null;
    return { warnings: ['This cluster is now a performance primary.'] };
  }

  async disablePrimary(): Promise<LogicalResponse> {
    const row = await readReplication(this.o.db);
    if (row.mode !== 'primary') throw new InvalidRequest('this cluster is not a performance primary');
    await secondaries.deleteAll(this.o.db);
    await this.updateRow({ mode: 'disabled', set_id: null, state: 'idle' });
    await this.tls.drop();
    this.lastSeenMode = null;
    return { warnings: ['Performance replication is disabled; secondaries must be re-enabled with new tokens.'] };
  }

  /** An activation token for secondary `id`: single use, expiring, carrying our address. */
  async secondaryToken(id: string, ttlSeconds: number): Promise<LogicalResponse> {
    const row = await readReplication(this.o.db);
    if (row.mode !== 'primary') throw new InvalidRequest('this cluster is not a performance primary');
    if (!/^[\w.-]{1,128}$/.test(id)) throw new InvalidRequest('id must be 1-128 letters, digits, ".", "_" or "-"');
    // A primary with a replication CA issues this secondary a leaf (CN = id) for the bundle.
    const tls = await this.tls.issueFor(id, this.o.clusterAddr ?? '');
    const secret = newSecret();
    await secondaries.upsert(this.o.db, id, secretDigest(secret));
    this.secrets.delete(id);
    // The primary pushes batches, so it keeps the secret itself, barrier-encrypted and local.
    await this.o.core.barrier.transaction((tx) => tx.putLocal(secondarySecretPath(id), secret));
    const wrapped = await this.o.core.wrapping.wrap(
      { data: { set_id: row.setId, secondary_id: id, secret, primary_api_addr: this.o.apiAddr, version: this.o.version, ...(tls ? { tls } : {}) } },
      ttlSeconds,
      'sys/replication/performance/primary/secondary-token',
    );
    const info = wrapped.wrapInfo!;
    return { data: null, wrapInfo: { ...info, token: encodeActivation(this.o.apiAddr, info.token, tls !== undefined), wrapped_accessor: '' } };
  }

  async revokeSecondary(id: string): Promise<LogicalResponse> {
    const s = await secondaries.get(this.o.db, id);
    if (!s) throw new InvalidRequest(`no secondary with id "${id}"`);
    await secondaries.update(this.o.db, id, { status: 'revoked' });
    await this.o.db.updateTable('coffer_secondaries').set({ credential_hmac: null }).where('secondary_id', '=', id).execute();
    await this.o.core.barrier.transaction((tx) => tx.deleteLocal(secondarySecretPath(id)));
    await this.tls.forgetSecondary(id);
    this.secrets.delete(id);
    return { status: 204 };
  }

  /**
   * Checks a secondary's credential on an internal call, and (`peer`: it came in on the cluster
   * listener) that its client certificate is that secondary's.
   */
  async authenticateSecondary(header: string | undefined, peer?: Peer): Promise<string> {
    const cred = parseCredentialHeader(header);
    const row = cred ? await secondaries.get(this.o.db, cred.secondaryId) : null;
    if (!cred || !row || row.status === 'revoked' || !secretMatches(cred.secret, row.credentialHmac)) throw new PermissionDenied();
    if ((await readReplication(this.o.db)).mode !== 'primary') throw new PermissionDenied();
    await this.tls.admitsSecondary(cred.secondaryId, peer);
    return cred.secondaryId;
  }

  /** A secondary announces itself after unwrapping its token; it gets the keyring and our head. */
  async register(secondaryId: string, apiAddr: string, version: string, clusterAddr?: string) {
    // Over mutual TLS we push batches to the secondary's cluster listener.
    if (await this.tls.primaryLeaf()) {
      if (!clusterAddr) throw new InvalidRequest('this primary replicates over mutual TLS: register with a cluster_addr');
      await this.tls.setSecondaryAddr(secondaryId, clusterAddr);
    }
    const head = await walHead(this.o.db);
    // Nothing ships until the secondary has reconciled (merkle-diff, merkle-sync) and says
    // where it stands.
    await secondaries.update(this.o.db, secondaryId, { api_addr: apiAddr, status: 'reconciling', version, acked_lsn: head, last_heartbeat: new Date() });
    const secret = await this.secretOf(secondaryId);
    const row = await readReplication(this.o.db);
    return {
      set_id: row.setId,
      head_lsn: head,
      epoch: row.epoch,
      version: this.o.version,
      keyring: seal(keyringTransportKey(secret), 0, 'coffer/replication-keyring', this.o.core.barrier.currentKeyring.serialize()).toString('base64'),
    };
  }

  async sealedKeyringFor(secondaryId: string): Promise<string> {
    const secret = await this.secretOf(secondaryId);
    return seal(keyringTransportKey(secret), 0, 'coffer/replication-keyring', this.o.core.barrier.currentKeyring.serialize()).toString('base64');
  }

  /**
   * merkle-diff and merkle-sync need the in-memory index, which only the active node holds: a
   * standby that receives one relays it to the active node once (null: answer here).
   */
  async viaActive(path: '/merkle-diff' | '/merkle-sync', body: unknown, credential: string, relayed: boolean): Promise<{ status: number; body: unknown } | null> {
    if (this.o.merkle?.()) return null;
    const leader = await this.o.db.selectFrom('coffer_nodes').select(['api_addr', 'cluster_addr']).where('is_active', '=', true).executeTakeFirst();
    if (relayed || !leader || leader.api_addr === this.o.apiAddr) return null; // index() explains
    // Over mutual TLS: the active node's cluster listener, with this cluster's own leaf.
    const route = await this.tls.routeToOwnNode(leader.api_addr, leader.cluster_addr);
    const res = await call(`${route.base}${INTERNAL_PREFIX}${path}`, { body, headers: { [CREDENTIAL_HEADER]: credential, [RELAYED_HEADER]: '1' }, timeoutMs: 60_000, tls: route.tls });
    return { status: res.status, body: res.body };
  }

  private index(): MerkleIndex {
    const m = this.o.merkle?.();
    if (!m) throw new UpstreamUnavailable('the merkle index is not ready on this node (not the active node, or still recovering); retry');
    return m;
  }

  /**
   * merkle-diff, round trip 1 (primary side). The secondary sends its 64 page hashes; we
   * answer, from one snapshot of our index at WAL position `lsn`, the 64 subpage hashes of
   * every page that differs. Shipping to this secondary stops until it reports back.
   */
  async merkleDiff(secondaryId: string, body: { pages?: string }) {
    const theirs = split(Buffer.from(String(body.pages ?? ''), 'base64'), HASH_BYTES);
    if (theirs.length !== PAGES) throw new InvalidRequest(`pages must be ${PAGES} hashes of ${HASH_BYTES} bytes`);
    const merkle = this.index();
    await secondaries.update(this.o.db, secondaryId, { status: 'reconciling' });
    // Everything ordered so far is in the snapshot, so streaming can resume right after it.
    await merkle.syncWithWal();
    const snap = await merkle.snapshot();
    const ours = pageHashes(snap.subpageHashes);
    const pages: Record<string, string> = {};
    ours.forEach((h, p) => {
      if (!h.equals(theirs[p])) pages[p] = b64(Buffer.concat(snap.subpageHashes.slice(p * SUBPAGES_PER_PAGE, (p + 1) * SUBPAGES_PER_PAGE)));
    });
    this.o.log.info({ secondary: secondaryId, lsn: snap.lsn, differing_pages: Object.keys(pages).length }, 'starting merkle diff');
    return { lsn: snap.lsn, root: b64(rootOf(ours)), pages };
  }

  /**
   * merkle-sync, round trip 2 (primary side). The secondary sends its records of the subpages
   * that differ; we answer the entries it lacks or holds differently, and the key hashes it
   * holds that we have no row for. A large answer covers a prefix of the subpages (`done`).
   */
  async merkleSync(secondaryId: string, body: { subpages?: { sp: number; run: string }[] }) {
    const req = Array.isArray(body.subpages) ? body.subpages : [];
    if (req.length === 0 || req.length > SYNC_REQUEST_SUBPAGES) throw new InvalidRequest(`subpages must list 1 to ${SYNC_REQUEST_SUBPAGES} subpages`);
    // Each element must be an object (a null or a number here was a TypeError: a 500).
    if (req.some((t) => t === null || typeof t !== 'object' || (t.run !== undefined && typeof t.run !== 'string'))) throw new InvalidRequest('bad subpage');
    const theirs = req.map((t) => ({ sp: Number(t.sp), run: Buffer.from(String(t.run ?? ''), 'base64') }));
    if (theirs.some((t) => !Number.isInteger(t.sp) || t.sp < 0 || t.sp >= PAGES * SUBPAGES_PER_PAGE || t.run.length % 32 !== 0)) throw new InvalidRequest('bad subpage');
    const merkle = this.index();
    const entries: WireEntry[] = [];
    const purge: string[] = [];
    const done: number[] = [];
    let bytes = 0;
    // A few subpages at a time from Postgres, until the answer is big enough.
    for (let at = 0; at < theirs.length && !(done.length > 0 && bytes > SYNC_RESPONSE_BYTES); at += SYNC_READ_SUBPAGES) {
      const group = theirs.slice(at, at + SYNC_READ_SUBPAGES);
      const rows = await entriesOfSubpages(this.o.db, group.map((t) => t.sp));
      const plan = await merkle.planSync({ theirs: group, rows: rows.map((r) => ({ sp: r.sp, path: r.path, valueHash: r.valueHash })) });
      for (const i of plan.send) {
        entries.push(toWire(rows[i]));
        bytes += rows[i].path.length + (rows[i].value?.length ?? 0);
      }
      for (const kh of plan.purge) purge.push(Buffer.from(kh).toString('hex'));
      done.push(...group.map((t) => t.sp));
    }
    return { entries, purge, done };
  }

  async heartbeatFrom(secondaryId: string, body: { applied_lsn?: number; state?: string; api_addr?: string; cluster_addr?: string }) {
    // A secondary whose active node moved says where its cluster listener is now.
    if (typeof body.cluster_addr === 'string' && (await this.tls.primaryLeaf())) await this.tls.setSecondaryAddr(secondaryId, body.cluster_addr);
    const before = await secondaries.get(this.o.db, secondaryId);
    // Back from reconciliation: stream from the position its merkle-sync reached. The cursor
    // moves in the same UPDATE that makes the secondary shippable again: were it a separate
    // statement, a shipping job in between would see 'streaming' with the pre-reconcile cursor,
    // find that WAL collected, and send the secondary back to needs-reconcile (a second,
    // needless reconciliation; test/cluster/merkle-reconcile.test.ts).
    const back = before?.status === 'reconciling' && body.state === 'stream-wals' && Number.isInteger(body.applied_lsn);
    await secondaries.update(this.o.db, secondaryId, {
      last_heartbeat: new Date(),
      // A secondary that moved (restarted elsewhere, a new active node) says where it is now.
      ...(typeof body.api_addr === 'string' && /^https?:\/\//.test(body.api_addr) ? { api_addr: body.api_addr.replace(/\/$/, '') } : {}),
      ...(body.state === 'stream-wals' && before?.status !== 'needs-reconcile' ? { status: 'streaming' } : {}),
      ...(back ? { acked_lsn: Number(body.applied_lsn) } : {}),
    });
    const me = await readReplication(this.o.db);
    return { head_lsn: await walHead(this.o.db), version: this.o.version, epoch: me.epoch, reconcile: before?.status === 'needs-reconcile' };
  }

  /** Runs a write a secondary forwarded, and answers with the WAL position it got. */
  async runForwarded(secondaryId: string, req: LogicalRequest): Promise<{ response: LogicalResponse; lsn: number }> {
    const response = await this.o.core.handle({ ...req, token: null, forwardedBy: secondaryId });
    // Read-after-write: the write's WAL position, which the secondary compares with what it
    // has applied (known at commit: entries.ts numbers WAL rows in the writing transaction).
    return { response, lsn: response.walLsn ?? 0 };
  }

  private readonly secrets = new Map<string, string>();

  private async secretOf(secondaryId: string): Promise<string> {
    const cached = this.secrets.get(secondaryId);
    if (cached) return cached;
    const secret = await this.o.core.barrier.getLocal<string>(secondarySecretPath(secondaryId));
    if (!secret) throw new PermissionDenied();
    this.secrets.set(secondaryId, secret);
    return secret;
  }

  /** Active primary node: wake a shipping job for every secondary that is behind. */
  private async wakeShipping(knownHead?: number): Promise<void> {
    const head = knownHead ?? (await walHead(this.o.db));
    const list = (await secondaries.list(this.o.db)).filter((s) => SHIPPABLE.has(s.status) && s.apiAddr);
    this.shippable = list.map((s) => s.secondaryId);
    this.shippableAt = Date.now();
    for (const s of list) if (s.ackedLsn < head) await this.enqueueShip(s.secondaryId);
  }
  /** The shippable secondaries as last listed, and when (poke's shortcut trusts it briefly). */
  private shippable: string[] = [];
  private shippableAt = 0;

  private async enqueueShip(secondaryId: string): Promise<void> {
    // At most one waiting job per secondary per second (BullMQ dedupes by id). The id changes
    // every second so a job left "active" by a killed process (BullMQ recovers it only after
    // its lock expires, ~30 s) cannot block shipping; the advisory lock in shipTo keeps one
    // batch in flight across every worker process whatever the number of jobs.
    const jobId = `ship-${secondaryId}-${Math.floor(Date.now() / 1000)}`;
    await this.o.queue.add('replication.ship', { secondaryId }, { jobId }).catch((err) => {
      this.o.log.warn({ err: (err as Error).message }, 'could not enqueue shipping; the next tick retries');
    });
  }

  /** The shipping job: send batches after the secondary's cursor, moving the cursor each time. */
  private readonly shipPending = new Set<string>();

  /** Secondaries this process is shipping to right now (it holds their ship lock). */
  private readonly shipping = new Set<string>();

  async shipTo(secondaryId: string): Promise<void> {
    if (this.o.core.sealed || this.stopping) return;
    this.shipPending.add(secondaryId);
    let more = false;
    await withShipLock(this.o.db, secondaryId, async () => {
      this.shipping.add(secondaryId);
      // A batch's acknowledgement is recorded by the next step's statement (shipStep).
      let ack: number | null = null;
      try {
        // Keep going while there is more, and once more if a wake-up arrived meanwhile (it could
        // not take the lock, or saw this loop running and only left word), so no ordered row
        // waits for the next tick.
        // Stopping (SIGTERM): the batch in flight finishes, the rest is another process's or the
        // next start's (the cursor is in Postgres); the queue's close waits for this job.
        for (let i = 0; i < 200 && !this.stopping; i++) {
          this.shipPending.delete(secondaryId);
          const step = await this.shipOne(secondaryId, ack);
          ack = step.ack;
          if (this.lingers(step)) await this.linger();
          if (!step.sent && !this.shipPending.has(secondaryId)) break;
        }
      } finally {
        // The loop's bound (or SIGTERM) came right after a batch: record it now. If this fails
        // too, the batch is sent again later and refused — applied once all the same.
        if (ack !== null) await secondaries.ack(this.o.db, secondaryId, ack).catch(() => undefined);
        this.shipping.delete(secondaryId);
        // Word left after the loop's last look (or the 200-batch bound): a job takes it up.
        more = this.shipPending.has(secondaryId) && !this.stopping;
      }
    });
    if (more) await this.enqueueShip(secondaryId);
  }

  /**
   * Linger (Kafka's linger.ms, here only under load): after a batch of at least
   * shipLingerMinEntries entries that reached the head, wait shipLingerMs before reading the next,
   * so that while writes keep coming batches grow with the write rate instead of their number
   * (each batch costs both clusters a statement, a request and a commit). Light traffic, below
   * the threshold, ships each write at once; a batch short of the head means more is waiting:
   * no wait.
   */
  private lingers(step: { sent: boolean; entries?: number; atHead?: boolean }): boolean {
    return shouldLinger(step, this.o.shipLingerMs, this.o.shipLingerMinEntries, this.stopping);
  }

  /** The linger's wait; stop() ends it at once. */
  private linger(): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.lingering.delete(done);
        resolve();
      };
      const t = setTimeout(done, this.o.shipLingerMs);
      this.lingering.add(done);
    });
  }
  private readonly lingering = new Set<() => void>();

  /**
   * One step: record `ack` (the batch applied last step), then send the next batch. `sent`: a
   * batch went and was applied (or the cursor was reset to the secondary's position), so there
   * may be more; `ack`: what the next step must record; `entries`, `atHead`: for the linger.
   */
  private async shipOne(secondaryId: string, ack: number | null): Promise<{ sent: boolean; ack: number | null; entries?: number; atHead?: boolean }> {
    const idle = { sent: false, ack: null };
    // Record the last batch, read the cursor, the retained WAL's bounds, our own role and the
    // next batch: one statement.
    const { state: st, batch } = await shipStep(this.o.db, secondaryId, ack, this.o.batchMaxRows, this.o.batchMaxBytes);
    const s = st.secondary;
    if (!s || !SHIPPABLE.has(s.status) || !s.apiAddr) return idle;
    if (st.mode !== 'primary' || st.supersededByEpoch !== null) return idle;
    // Bounded WAL: if what this secondary needs next was collected, it must reconcile.
    const oldest = st.oldestLsn;
    if (oldest === null ? s.ackedLsn < st.headLsn : oldest > s.ackedLsn + 1) {
      this.o.log.warn({ secondary: secondaryId, acked: s.ackedLsn, oldest }, 'no matching WALs available; the secondary must reconcile (merkle-diff)');
      await secondaries.update(this.o.db, secondaryId, { status: 'needs-reconcile', last_error: `WAL after ${s.ackedLsn} is no longer retained; reconciling` });
      return idle;
    }
    if (!batch) return idle;
    const secret = await this.secretOf(secondaryId);
    const route = await this.tls.routeToSecondary(secondaryId, s.apiAddr);
    const sentAt = performance.now();
    const head = JSON.stringify({ epoch: st.epoch, from_lsn: batch.fromLsn, to_lsn: batch.toLsn, key_term: this.o.core.barrier.currentKeyring.activeTerm });
    const res = await call<{ applied: boolean; applied_lsn: number; reason?: string; epoch?: number; errors?: string[] }>(`${route.base}${INTERNAL_PREFIX}/apply`, {
      json: `${head.slice(0, -1)},"entries":${batch.entriesJson}}`,
      headers: { [CREDENTIAL_HEADER]: credentialHeader(secondaryId, secret) },
      tls: route.tls,
    }).catch(async (err: Error) => {
      await secondaries.update(this.o.db, secondaryId, { last_error: err.message });
      throw err;
    });
    if (res.status === 409 && Number(res.body?.epoch) > st.epoch) {
      await this.markSuperseded(Number(res.body.epoch), `${s.apiAddr} answered: ${(res.body.errors ?? []).join('; ')}`);
      return idle;
    }
    if (res.status !== 200) {
      const msg = `secondary answered ${res.status}: ${(res.body?.errors ?? []).join('; ')}`;
      await secondaries.update(this.o.db, secondaryId, { last_error: msg });
      throw new UpstreamUnavailable(msg);
    }
    if (res.body.applied) {
      this.o.onShipped?.(batch.count, batch.bytes, performance.now() - sentAt);
      faultPoint('ship.beforeAck');
      return { sent: true, ack: batch.toLsn, entries: batch.count, atHead: batch.toLsn >= st.headLsn };
    }
    // Rejected (a duplicate, or a batch from a stale cursor): the secondary says where it is.
    if (typeof res.body.applied_lsn === 'number' && res.body.reason?.startsWith('batch starts')) {
      await secondaries.resync(this.o.db, secondaryId, res.body.applied_lsn);
      return { sent: true, ack: null };
    }
    return idle;
  }

  /** Called by the active node right after it saw new WAL: ship without waiting for a tick. */
  poke(headLsn: number): void {
    if (this.lastSeenMode !== 'primary') return;
    // Coalesced: the active node may see new WAL hundreds of times a second, and one wake-up
    // with the newest head (pokes come in order from one loop) covers every earlier one.
    this.wakeHead = headLsn;
    // Every secondary is being shipped to by this process: leave word for its loop instead of
    // listing the secondaries and queueing a job that would only find the lock taken.
    if (this.shippable.length > 0 && Date.now() - this.shippableAt < SHIPPABLE_LIST_MS && this.shippable.every((id) => this.shipping.has(id))) {
      for (const id of this.shippable) this.shipPending.add(id);
      return;
    }
    if (this.waking) {
      this.wakeAgain = true;
      return;
    }
    this.waking = true;
    const run = (): Promise<void> =>
      this.wakeShipping(this.wakeHead)
        .catch(() => undefined)
        .then(() => {
          if (!this.wakeAgain) return;
          this.wakeAgain = false;
          return run();
        });
    void run().finally(() => (this.waking = false));
  }
  private waking = false;
  private wakeAgain = false;
  private wakeHead = 0;

  // ------------------------------------------------------------------ secondary

  /** secondary/enable: unwrap the token at the primary, wipe, take its keyring, bootstrap. */
  async enableSecondary(token: string, primaryApiAddr?: string, repoint = false, apiCa?: string): Promise<LogicalResponse> {
    const row = await readReplication(this.o.db);
    if (row.mode === 'primary') throw new InvalidRequest(repoint ? 'this cluster is a performance primary; demote it first' : 'this cluster is a performance primary; disable it first');
    if (repoint && row.mode !== 'secondary') throw new InvalidRequest('this cluster is not a performance secondary (enable it as one instead)');
    const act = decodeActivation(token);
    // Refused before the single-use token is spent: its certificates need a cluster listener here.
    if (act.tls && !this.o.clusterAddr) {
      throw new InvalidRequest('the primary replicates over mutual TLS, which needs a cluster listener on this cluster: give its listener TLS (tls_disable = false)');
    }
    const addr = (primaryApiAddr || act.addr).replace(/\/$/, '');
    assertSafePrimaryAddr(addr, this.o.allowUnsafePrimaryAddr);
    // The wrapping token authenticates its own unwrap (single use: a replay is refused);
    // `apiCa` (ca_file, ca_path) is what we trust the primary's API listener with.
    const unwrap = await call<{ data?: { set_id: string; secondary_id: string; secret: string; version: string; tls?: BundleTls }; errors?: string[] }>(`${addr}/v1/sys/wrapping/unwrap`, {
      body: {},
      headers: { 'x-vault-token': act.token },
      tls: apiCa ? { ca: apiCa } : undefined,
    });
    if (unwrap.status !== 200 || !unwrap.body.data) {
      throw new InvalidRequest(`error response unwrapping secondary token; status code is ${unwrap.status}: ${(unwrap.body.errors ?? []).join('; ')}`);
    }
    const b = unwrap.body.data;
    if (compareVersions(b.version, this.o.version) > 0) {
      throw new InvalidRequest(`primary runs Coffer ${b.version}, newer than this cluster's ${this.o.version}; upgrade this cluster first`);
    }
    const headers = { [CREDENTIAL_HEADER]: credentialHeader(b.secondary_id, b.secret) };
    const cred: Credential = { secondary_id: b.secondary_id, secret: b.secret, ...(apiCa ? { api_ca: apiCa } : {}), ...(b.tls ? { tls: b.tls } : {}) };
    // With certificates in the bundle, register (and everything after) goes to the primary's
    // cluster listener over mutual TLS.
    const route = routeToPrimary(cred, addr);
    const reg = await call<{ set_id: string; head_lsn: number; version: string; keyring: string; epoch?: number; errors?: string[] }>(`${route.base}${INTERNAL_PREFIX}/register`, {
      body: { api_addr: this.o.apiAddr, version: this.o.version, ...(b.tls ? { cluster_addr: this.o.clusterAddr } : {}) },
      headers,
      tls: route.tls,
    });
    if (reg.status !== 200) throw new InvalidRequest(`primary refused registration: ${(reg.body.errors ?? []).join('; ')}`);

    // Point of no return: wipe replicated data (not when re-pointing: the merkle diff then moves
    // only what differs) and take the primary's keyring.
    if (!repoint) {
      await wipeReplicated(this.o.db);
      this.o.onWalWritten?.(null);
      // The index must describe the wiped (empty) storage before it is compared with anything.
      await this.o.merkle?.()?.rebuild('secondary enable wiped the replicated data');
    }
    await this.adoptKeyring(reg.body.keyring, b.secret);
    await this.o.core.barrier.transaction((tx) => tx.putLocal(CREDENTIAL_PATH, cred));
    this.credentialCache.forget();
    await this.updateRow({
      mode: 'secondary',
      set_id: reg.body.set_id,
      secondary_id: b.secondary_id,
      primary_api_addr: addr,
      state: 'merkle-diff',
      applied_lsn: 0,
      sync_lsn: null,
      sync_progress: 0,
      sync_total_keys: 0,
      epoch: Math.max(Number(reg.body.epoch ?? 0), row.epoch),
      superseded_by_epoch: null,
      primary_head_lsn: reg.body.head_lsn,
      primary_contact_at: new Date(),
      last_error: null,
    });
    this.lastSeenMode = null;
    this.tls.onChange?.();
    await this.tick();
    return {
      warnings: [
        repoint
          ? 'This cluster now follows the new primary; it reconciles by merkle diff (keys it must overwrite are kept in its divergence report).'
          : "This cluster is now a performance secondary; its replicated data was replaced by the primary's.",
      ],
    };
  }

  async disableSecondary(): Promise<LogicalResponse> {
    const row = await readReplication(this.o.db);
    if (row.mode !== 'secondary') throw new InvalidRequest('this cluster is not a performance secondary');
    await this.updateRow({ mode: 'disabled', state: 'idle', primary_api_addr: null, secondary_id: null, set_id: null });
    await this.o.core.barrier.transaction((tx) => tx.deleteLocal(CREDENTIAL_PATH));
    this.credentialCache.forget();
    this.lastSeenMode = null;
    await this.tick();
    return { status: 204 };
  }

  // ------------------------------------------------------------------ failover

  /**
   * secondary/promote: this secondary becomes the primary of the set, in a new epoch. It keeps
   * every write it has applied; the response says how far behind the old primary it was at the
   * last contact (what asynchronous replication may have lost). Other secondaries and the old
   * primary (demoted) re-point with `update-primary` and reconcile by merkle diff.
   */
  async promote(force = false): Promise<LogicalResponse> {
    const row = await readReplication(this.o.db);
    if (row.mode !== 'secondary') throw new InvalidRequest('this cluster is not a performance secondary');
    if ((row.state === 'merkle-diff' || row.state === 'merkle-sync') && !force) {
      throw new InvalidRequest(`this secondary is in ${row.state}: its data is partial; finish reconciling or promote with force=true`);
    }
    const epoch = Math.max(row.epoch, 1) + 1;
    await this.updateRow({
      mode: 'primary',
      state: 'running',
      epoch,
      superseded_by_epoch: null,
      primary_api_addr: null,
      secondary_id: null,
      sync_lsn: null,
      last_error: null,
    });
    await secondaries.deleteAll(this.o.db);
    await this.o.core.barrier.transaction((tx) => tx.deleteLocal(CREDENTIAL_PATH));
    this.credentialCache.forget();
    // A TLS cluster mints its own replication CA as the new primary (the old one's stays there).
    if (this.o.clusterAddr && row.setId) await this.tls.mint(row.setId);
    this.lastSeenMode = null;
    await this.tick();
    const behind = row.primaryHeadLsn === null ? null : Math.max(0, row.primaryHeadLsn - row.appliedLsn);
    this.o.log.warn({ epoch, applied_lsn: row.appliedLsn, primary_head_at_last_contact: row.primaryHeadLsn, behind }, 'promoted to performance primary');
    return {
      data: {
        epoch,
        last_remote_wal: row.appliedLsn,
        primary_last_wal_at_last_contact: row.primaryHeadLsn,
        last_contact_time: row.primaryContactAt?.toISOString() ?? null,
        wal_behind_at_last_contact: behind,
      },
      warnings: [
        `This cluster is now the performance primary (epoch ${epoch}). ` +
          (behind === null
            ? 'It never heard its old primary report a WAL position.'
            : `At the last contact with the old primary (${row.primaryContactAt?.toISOString()}), it was ${behind} WAL position(s) behind: writes the old primary acknowledged after those may not be here.`),
        'Re-point the other secondaries and the old primary (after demoting it) with secondary/update-primary and new secondary tokens from this cluster.',
      ],
    };
  }

  /** primary/demote: this primary becomes a secondary that follows nobody until update-primary. */
  async demote(): Promise<LogicalResponse> {
    const row = await readReplication(this.o.db);
    if (row.mode !== 'primary') throw new InvalidRequest('this cluster is not a performance primary');
    await this.updateRow({ mode: 'secondary', state: 'idle', primary_api_addr: null, secondary_id: null, last_error: 'demoted: waiting for secondary/update-primary' });
    await secondaries.deleteAll(this.o.db);
    this.lastSeenMode = null;
    await this.tick();
    return { warnings: ['This cluster is now a performance secondary; it connects nowhere until secondary/update-primary. Its replicated data is kept.'] };
  }

  /**
   * Refuses a batch from a primary of an older epoch (409, with ours, so it learns it is
   * superseded). Every pushed batch passes here, so the role and epoch it compares with are
   * remembered for EPOCH_GUARD_CACHE_MS; a change within that time is still caught by apply
   * itself (a secondary refuses an older epoch, and a promoted cluster refuses every batch), and
   * a refused batch makes the next one read them again.
   */
  async epochGuard(body: { epoch?: unknown }): Promise<{ epoch: number; reason: string } | null> {
    const row = await this.guardCache.get(() => readReplication(this.o.db));
    const theirs = Number(body?.epoch ?? 0);
    if (row.mode === 'primary' && row.epoch > theirs) return { epoch: row.epoch, reason: `this cluster was promoted to primary at epoch ${row.epoch}; the sender (epoch ${theirs}) is superseded` };
    if (row.mode === 'secondary' && theirs > 0 && row.epoch > theirs) return { epoch: row.epoch, reason: `this secondary follows epoch ${row.epoch}; the sender (epoch ${theirs}) is superseded` };
    return null;
  }

  /** A primary that learnt a higher epoch exists stops taking writes and says so in its status. */
  private async markSuperseded(epoch: number, why: string): Promise<void> {
    const row = await readReplication(this.o.db);
    if (row.mode !== 'primary' || epoch <= row.epoch || row.supersededByEpoch !== null) return;
    this.o.log.error({ epoch: row.epoch, superseded_by_epoch: epoch, why }, 'this primary has been superseded by a promoted cluster; it takes no more writes');
    await this.updateRow({ superseded_by_epoch: epoch, last_error: `superseded: ${why}` });
    // This process stops taking writes now; the cluster's other processes within a tick.
    await this.followRole(await readReplication(this.o.db));
  }

  async divergence(): Promise<LogicalResponse> {
    const rows = await divergenceReport(this.o.db);
    return {
      data: {
        keys: rows.map((r) => ({
          path: r.path,
          action: r.action,
          local_version: Number(r.local_version),
          local_value_sha256: r.local_value_sha256?.toString('hex') ?? null,
          primary_version: r.primary_version === null ? null : Number(r.primary_version),
          epoch: Number(r.epoch),
          detected_at: r.detected_at.toISOString(),
        })),
      },
    };
  }

  private async adoptKeyring(sealedB64: string, secret: string): Promise<void> {
    const keyring = Keyring.deserialize(open(keyringTransportKey(secret), 'coffer/replication-keyring', Buffer.from(sealedB64, 'base64')));
    await this.o.core.adoptKeyring(keyring, (convert) => reencryptLocal(this.o.db, convert, keyring.activeTerm));
  }

  /**
   * This secondary's credential. Every pushed batch checks it, so it is remembered for
   * CREDENTIAL_CACHE_MS (this process forgets it at once when it changes it). Another process of
   * the cluster disabling or re-enabling replication is seen within that time — and a batch
   * pushed meanwhile still applies only while this cluster is a streaming secondary (applyBatch).
   */
  private credential(): Promise<Credential> {
    return this.credentialCache.get(async () => {
      const c = await this.o.core.barrier.getLocal<Credential>(CREDENTIAL_PATH);
      if (!c) throw new PermissionDenied();
      return c;
    });
  }
  private readonly credentialCache = new Remembered<Credential>(CREDENTIAL_CACHE_MS);
  private readonly guardCache = new Remembered<ReplicationRow>(EPOCH_GUARD_CACHE_MS);

  /** Every change of this cluster's replication row goes through here (the epoch guard forgets it). */
  private async updateRow(patch: Parameters<typeof updateReplication>[1]): Promise<void> {
    await updateReplication(this.o.db, patch);
    this.guardCache.forget();
    // Other processes hear of a new role by NOTIFY; this one (an embedded dev server has no
    // lease connection to hear it on) follows it at once — when it did change: rewriting the
    // same state (a heartbeat that fails the same way each time) must not turn the tick into a
    // loop.
    let changed = false;
    for (const column of Object.keys(ROLE_COLUMNS) as (keyof typeof ROLE_COLUMNS)[]) {
      if (!(column in patch)) continue;
      const field = ROLE_COLUMNS[column];
      const value = patch[column] ?? null;
      if (this.lastRow === null || this.lastRow[field] !== value) {
        changed = true;
        if (this.lastRow) this.lastRow = { ...this.lastRow, [field]: value };
      }
    }
    if (changed) this.kick();
  }
  /** The replication row as this process last read it (tick, refreshRole), with its own changes since. */
  private lastRow: ReplicationRow | null = null;

  /** Where and how this secondary reaches its primary (cluster listener over mutual TLS, or API). */
  private async toPrimary(row: ReplicationRow): Promise<{ cred: Credential; base: string; headers: Record<string, string>; tls?: TlsContext }> {
    const cred = await this.credential();
    const route = routeToPrimary(cred, row.primaryApiAddr);
    return { cred, base: route.base, tls: route.tls, headers: { [CREDENTIAL_HEADER]: credentialHeader(cred.secondary_id, cred.secret) } };
  }

  /** What this process's cluster listener presents and trusts in the current role (null: nothing yet). */
  async clusterIdentity(): Promise<ListenerIdentity | null> {
    if (this.o.core.sealed) return null;
    const mode = (await readReplication(this.o.db)).mode;
    if (mode === 'primary') {
      const leaf = await this.tls.primaryLeaf();
      return leaf && { ca: leaf.ca, cert: leaf.cert, key: leaf.key };
    }
    if (mode !== 'secondary') return null;
    const tls = (await this.credential().catch(() => null))?.tls;
    return tls ? { ca: tls.ca, cert: tls.cert, key: tls.key } : null;
  }

  /** Checks the primary's credential on a pushed batch, and (over mutual TLS) that it presented the primary's leaf. */
  async authenticatePrimary(header: string | undefined, peer?: Peer): Promise<void> {
    const cred = parseCredentialHeader(header);
    const mine = await this.credential().catch(() => null);
    // The secret is compared in constant time (through its digest), like the primary does.
    if (!cred || !mine || cred.secondaryId !== mine.secondary_id || !secretMatches(cred.secret, secretDigest(mine.secret)) || !admitsPrimary(mine, peer)) throw new PermissionDenied();
  }

  /** A batch pushed by the primary: exactly once, in order (invariant 3). */
  async applyPushed(body: { from_lsn: number; to_lsn: number; key_term?: number; entries: WireEntry[] }) {
    const batch: Batch = { fromLsn: Number(body.from_lsn), toLsn: Number(body.to_lsn), entries: (body.entries ?? []).map(fromWire) };
    if (!Number.isInteger(batch.fromLsn) || !Number.isInteger(batch.toLsn) || batch.toLsn < batch.fromLsn) throw new InvalidRequest('bad batch bounds');
    if (body.key_term && !this.o.core.barrier.currentKeyring.has(Number(body.key_term))) await this.refreshKeyring();
    const epoch = Number((body as { epoch?: number }).epoch ?? 0);
    const started = performance.now();
    const out = await applyBatch(this.o.db, batch, Number.isSafeInteger(epoch) && epoch > 0 ? epoch : 0);
    if (!out.applied) this.guardCache.forget();
    else {
      this.o.onApplied?.(batch.entries.length, performance.now() - started);
      if (out.committed) this.o.onWalWritten?.(out.committed);
    }
    if (out.applied && batch.entries.some((e) => e.path.startsWith('core/mounts') || e.path.startsWith('core/auth'))) {
      await this.o.core.reloadMounts().catch(() => undefined);
    }
    // The primary is back (a batch arrived while its heartbeats failed): heartbeat now, which
    // brings the state back to stream-wals, rather than at the next tick.
    if (this.connection === 'disconnected') this.kick();
    this.connection = 'connected';
    this.lastPrimaryHeartbeat = new Date();
    return out.applied ? { applied: true, applied_lsn: out.appliedLsn } : { applied: false, applied_lsn: out.appliedLsn, reason: out.reason };
  }

  private async refreshKeyring(): Promise<void> {
    const p = await this.toPrimary(await readReplication(this.o.db));
    const res = await call<{ keyring: string }>(`${p.base}${INTERNAL_PREFIX}/keyring`, { headers: p.headers, tls: p.tls });
    if (res.status !== 200) throw new UpstreamUnavailable(`could not fetch the primary's keyring (${res.status})`);
    await this.adoptKeyring(res.body.keyring, p.cred.secret);
  }

  /** Forwards a write to the primary and waits (best effort) until it is applied here. */
  async forward(req: LogicalRequest): Promise<LogicalResponse> {
    const p = await this.toPrimary(await readReplication(this.o.db));
    const res = await call<{ status: number; response: LogicalResponse; lsn: number; errors?: string[] }>(`${p.base}${INTERNAL_PREFIX}/forward`, {
      body: { operation: req.operation, path: req.path, data: req.data, query: req.query, headers: { 'content-type': req.headers['content-type'] } },
      headers: p.headers,
      timeoutMs: 30_000,
      tls: p.tls,
    });
    if (res.status >= 500 && !res.body?.response) throw new UpstreamUnavailable(`primary failed the forwarded request: ${(res.body?.errors ?? []).join('; ')}`);
    // The primary's own error (403, 400 …) is relayed as it is.
    if (res.status !== 200) throw new Relayed(res.status, res.body?.errors ?? []);
    const { response, lsn } = res.body;
    const warnings = [...(response.warnings ?? [])];
    if (lsn > 0 && !(await this.waitForApplied(lsn))) warnings.push(WAL_WAIT_WARNING);
    return { ...response, warnings, walLsn: undefined, replicatedLsn: lsn };
  }

  /** Waits until this secondary has applied `lsn`, up to the best-effort wait. */
  async waitForApplied(lsn: number, timeoutMs = this.o.bestEffortWalWaitMs): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if ((await readReplication(this.o.db)).appliedLsn >= lsn) return true;
      if (Date.now() > deadline) return false;
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** Refuses (412) a request whose X-Vault-Index this cluster has not reached. */
  async assertIndex(lsn: number, wait = false): Promise<void> {
    const row = await readReplication(this.o.db);
    if (row.mode !== 'secondary' || row.appliedLsn >= lsn) return;
    if (wait && (await this.waitForApplied(lsn))) return;
    throw new PreconditionFailed('required index state not present');
  }

  /** Active secondary node: finish bootstrapping; heartbeat the primary. */
  private async secondaryDuties(row: ReplicationRow): Promise<void> {
    if (row.state === 'merkle-diff' || row.state === 'merkle-sync' || row.state === 'bootstrapping') {
      if (!this.reconciling && this.o.merkle?.()) {
        this.reconciling = this.reconcile()
          .catch(async (err) => {
            this.connection = 'disconnected';
            this.o.log.warn({ err: (err as Error).message }, 'merkle reconciliation failed; retrying');
            await this.updateRow({ last_error: (err as Error).message }).catch(() => undefined);
            await new Promise((r) => setTimeout(r, 500));
          })
          .finally(() => (this.reconciling = null));
      }
      return;
    }
    if (row.state !== 'stream-wals' && row.state !== 'idle') return;
    // Streaming and in contact: a heartbeat a second (batches also count as contact). Otherwise
    // every tick (TICK_MS), and at once when a batch arrives (applyPushed kicks), so a secondary
    // that lost its primary is back as soon as it answers.
    if (row.state === 'stream-wals' && this.connection === 'connected' && Date.now() - this.lastHeartbeatSent < HEARTBEAT_MS - TICK_SLACK_MS) return;
    this.lastHeartbeatSent = Date.now();
    try {
      if (!row.primaryApiAddr) return; // demoted: follows nobody until update-primary
      const p = await this.toPrimary(row);
      const res = await call<{ head_lsn: number; version: string; epoch?: number; reconcile?: boolean }>(`${p.base}${INTERNAL_PREFIX}/heartbeat`, {
        body: { applied_lsn: row.appliedLsn, state: row.state, api_addr: this.o.apiAddr, ...(p.cred.tls ? { cluster_addr: this.o.clusterAddr } : {}) },
        headers: p.headers,
        timeoutMs: 2000,
        tls: p.tls,
      });
      if (res.status !== 200) throw new Error(`primary answered ${res.status}`);
      if (compareVersions(res.body.version, this.o.version) > 0) {
        await this.updateRow({ state: 'idle', last_error: `primary runs Coffer ${res.body.version}, newer than this cluster's ${this.o.version}; upgrade this cluster` });
        this.connection = 'disconnected';
        return;
      }
      this.connection = 'connected';
      this.lastPrimaryHeartbeat = new Date();
      if (res.body.reconcile) {
        this.o.log.warn('non-matching guard: the primary no longer retains our WAL position; starting merkle diff');
        await this.updateRow({ state: 'merkle-diff', sync_progress: 0, sync_total_keys: 0 });
        return;
      }
      if (row.state !== 'stream-wals') await this.updateRow({ state: 'stream-wals', last_error: null });
      await this.updateRow({
        last_heartbeat: new Date(),
        primary_head_lsn: Number(res.body.head_lsn),
        primary_contact_at: new Date(),
        ...(Number(res.body.epoch) > row.epoch ? { epoch: Number(res.body.epoch) } : {}),
      });
    } catch (err) {
      this.connection = 'disconnected';
      if (row.state !== 'idle') await this.updateRow({ state: 'idle', last_error: (err as Error).message });
    }
  }

  /**
   * A secondary that is new, or whose WAL position the primary no longer retains, or that was
   * told to recover: merkle-diff → merkle-sync → stream-wals (DESIGN.md "Merkle index and
   * recovery"). Two round trips when few keys differ:
   *
   *   1. diff: our 64 page hashes → the primary's subpage hashes of the pages that differ, at
   *      its WAL position P;
   *   2. sync: our records of the differing subpages → the entries we lack or hold
   *      differently, and the keys we hold that it has no row for.
   *
   * Then streaming resumes after P: a write the primary took meanwhile is in its WAL after P
   * (or already in what sync fetched; apply keeps the newer version), so none is missed.
   * Restartable: a crash anywhere starts again at the diff.
   */
  private async reconcile(): Promise<void> {
    const merkle = this.o.merkle?.();
    if (!merkle) return;
    let row = await readReplication(this.o.db);
    const { base, headers, tls } = await this.toPrimary(row);
    await this.updateRow({ state: 'merkle-diff' });
    // Our index must describe all of our storage: every applied row is in the WAL (numbered at
    // commit); bring the index up to its head.
    await merkle.syncWithWal();
    const mine = await merkle.snapshot();
    const myPages = pageHashes(mine.subpageHashes);
    const diff = await call<{ lsn: number; root: string; pages: Record<string, string>; errors?: string[] }>(`${base}${INTERNAL_PREFIX}/merkle-diff`, {
      body: { pages: b64(Buffer.concat(myPages)) },
      headers,
      timeoutMs: 30_000,
      tls,
    });
    if (diff.status !== 200) throw new UpstreamUnavailable(`merkle-diff failed (${diff.status}): ${(diff.body.errors ?? []).join('; ')}`);
    this.connection = 'connected';
    this.lastPrimaryHeartbeat = new Date();
    const differing: number[] = [];
    for (const [p, blob] of Object.entries(diff.body.pages)) {
      const theirs = split(Buffer.from(blob, 'base64'), HASH_BYTES);
      for (let i = 0; i < SUBPAGES_PER_PAGE; i++) {
        const sp = Number(p) * SUBPAGES_PER_PAGE + i;
        if (!theirs[i]?.equals(mine.subpageHashes[sp])) differing.push(sp);
      }
    }
    const lsn = Number(diff.body.lsn);
    this.o.log.info({ num_conflict_subpages: differing.length, primary_lsn: lsn }, 'starting merkle sync');
    await this.updateRow({ state: 'merkle-sync', sync_lsn: lsn, sync_progress: 0, sync_total_keys: 0 });

    let moved = 0;
    let found = 0;
    const runs = await merkle.runsOf(differing);
    let remaining = differing;
    while (remaining.length > 0) {
      // One request: as many subpages as fit the record and subpage bounds (at least one).
      const batch: number[] = [];
      let recs = 0;
      for (const sp of remaining) {
        const n = runs.get(sp)!.length / 32;
        if (batch.length > 0 && (batch.length >= SYNC_REQUEST_SUBPAGES || recs + n > SYNC_REQUEST_RECORDS)) break;
        batch.push(sp);
        recs += n;
      }
      const res = await call<{ entries: WireEntry[]; purge: string[]; done: number[]; errors?: string[] }>(`${base}${INTERNAL_PREFIX}/merkle-sync`, {
        body: { subpages: batch.map((sp) => ({ sp, run: b64(runs.get(sp)!) })) },
        headers,
        timeoutMs: 60_000,
        tls,
      });
      if (res.status !== 200) throw new UpstreamUnavailable(`merkle-sync failed (${res.status}): ${(res.body.errors ?? []).join('; ')}`);
      const done = new Set(res.body.done.map(Number));
      if (done.size === 0) throw new UpstreamUnavailable('merkle-sync made no progress');
      // Purged keys come as hashes: find our paths in those subpages with those hashes.
      let purgePaths: string[] = [];
      if (res.body.purge.length > 0) {
        const wanted = new Set(res.body.purge);
        const paths = await pathsOfSubpages(this.o.db, [...done]);
        const hashes = await merkle.keyHashes(paths);
        purgePaths = paths.filter((_, i) => wanted.has(Buffer.from(hashes[i]).subarray(0, KEY_BYTES).toString('hex')));
      }
      found += res.body.entries.length + purgePaths.length;
      await this.updateRow({ sync_total_keys: found });
      moved += await syncEntries(this.o.db, res.body.entries.map(fromWire), purgePaths);
      // Its WAL rows: the active node reads them now (a standby's offer notifies it).
      this.o.onWalWritten?.(null);
      await this.updateRow({ sync_progress: moved });
      remaining = remaining.filter((sp) => !done.has(sp));
    }
    this.o.onSynced?.(moved);
    // Entries synced may be encrypted under a keyring term we have not seen yet.
    await this.refreshKeyring().catch(() => undefined);
    row = await readReplication(this.o.db);
    if (row.state !== 'merkle-sync') return; // disabled meanwhile
    await this.updateRow({ state: 'stream-wals', applied_lsn: lsn, sync_lsn: null, last_error: null });
    await this.o.core.reloadMounts().catch(() => undefined);
    this.o.log.info({ keys: moved, lsn }, 'merkle sync complete; streaming WAL');
    // Tell the primary at once where to stream from (the heartbeat carries our position).
    this.lastHeartbeatSent = 0;
    await this.secondaryDuties(await readReplication(this.o.db));
  }

  // ------------------------------------------------------------------ operator endpoints

  /** sys/replication/recover: a secondary reconciles again; a primary restarts shipping. */
  async recover(): Promise<LogicalResponse> {
    const row = await readReplication(this.o.db);
    if (row.mode === 'disabled') throw new InvalidRequest('replication is not enabled on this cluster');
    if (row.mode === 'secondary') {
      await this.updateRow({ state: 'merkle-diff', sync_progress: 0, sync_total_keys: 0 });
      return { warnings: ['Reconciling with the primary (merkle-diff, merkle-sync), then streaming WAL.'] };
    }
    for (const s of await secondaries.list(this.o.db)) if (s.status !== 'revoked') await secondaries.update(this.o.db, s.secondaryId, { last_error: null });
    await this.wakeShipping();
    return { warnings: ['Shipping restarted to every secondary.'] };
  }

  /** sys/replication/reindex: rebuilds the merkle index from storage in the background. */
  async reindex(): Promise<LogicalResponse> {
    const merkle = this.index();
    if (merkle.reindexProgress) return { warnings: ['A reindex is already running; see sys/replication/status.'] };
    void merkle
      .rebuild('reindex requested')
      .then(() => this.updateRow({ last_reindex_at: new Date() }))
      .catch((err) => this.o.log.error({ err: (err as Error).message }, 'reindex failed'));
    return { warnings: ['Reindex started; progress is in sys/replication/status (reindex_in_progress, reindex_building_progress).'] };
  }

  /** sys/replication/merkle-check: compares the index with a rebuild, as Vault's report does. */
  async merkleCheck(): Promise<LogicalResponse> {
    const merkle = this.index();
    const r = await merkle.check();
    const byPage = new Map<number, number[]>();
    for (const sp of r.corrupted) byPage.set(Math.floor(sp / SUBPAGES_PER_PAGE), [...(byPage.get(Math.floor(sp / SUBPAGES_PER_PAGE)) ?? []), sp % SUBPAGES_PER_PAGE]);
    const tuples: Record<string, { corrupted: boolean; subpages: number[] }> = {};
    for (const [p, subs] of byPage) tuples[String(p)] = { corrupted: true, subpages: subs };
    return {
      data: {
        merkle_corruption_report: {
          corrupted_root: r.corrupted.length > 0,
          corrupted_tree_map: {
            '1': { tree_type: 'replicated', root_hash: b64(r.root), corrupted_subtree_root: r.corrupted.length > 0, corrupted_index_tuples_map: tuples },
          },
          last_corruption_check_epoch: new Date().toISOString(),
          checked_lsn: r.lsn,
        },
      },
    };
  }

  /** The root this node can vouch for: its live index, else the last checkpoint's. */
  private async merkleRoot(): Promise<string> {
    const live = this.o.merkle?.();
    if (live) return b64((await live.root()).root);
    const cp = await readCheckpoint(this.o.db);
    return cp ? b64(cp.root) : '';
  }

  private reindexStatus(row: ReplicationRow): Record<string, unknown> {
    const p = this.o.merkle?.()?.reindexProgress;
    return {
      last_reindex_epoch: row.lastReindexAt ? String(Math.floor(row.lastReindexAt.getTime() / 1000)) : '0',
      reindex_in_progress: !!p,
      ...(p ? { reindex_stage: p.stage, reindex_building_progress: p.done, reindex_building_total: p.total } : {}),
    };
  }

  // ------------------------------------------------------------------ status

  async status(): Promise<Record<string, unknown>> {
    const row = await readReplication(this.o.db);
    if (row.mode === 'disabled') return { mode: 'disabled' };
    const head = await walHead(this.o.db);
    if (row.mode === 'primary') {
      const list = await secondaries.list(this.o.db);
      const fresh = (d: Date | null) => d !== null && Date.now() - d.getTime() < 10_000;
      return {
        mode: 'primary',
        cluster_id: row.setId,
        state: 'running',
        last_wal: head,
        last_performance_wal: head,
        merkle_root: await this.merkleRoot(),
        ...this.reindexStatus(row),
        epoch: row.epoch,
        superseded: row.supersededByEpoch !== null,
        ...(row.supersededByEpoch !== null ? { superseded_by_epoch: row.supersededByEpoch } : {}),
        known_secondaries: list.filter((s) => s.status !== 'revoked').map((s) => s.secondaryId),
        secondaries: list
          .filter((s) => s.status !== 'revoked')
          .map((s) => ({
            node_id: s.secondaryId,
            api_address: s.apiAddr ?? '',
            cluster_address: '',
            connection_status: fresh(s.lastHeartbeat) ? 'connected' : 'disconnected',
            last_heartbeat: s.lastHeartbeat?.toISOString() ?? '',
            acked_wal: s.ackedLsn,
            lag_wal: Math.max(0, head - s.ackedLsn),
            last_error: s.lastError ?? '',
            version: s.version ?? '',
          })),
        primary_cluster_addr: '',
        ssct_generation_counter: 0,
      };
    }
    const state = row.state as SecondaryState;
    return {
      mode: 'secondary',
      cluster_id: row.setId,
      state,
      connection_state: this.connection === 'connected' ? 'ready' : state === 'merkle-diff' ? 'connecting' : 'transient_failure',
      secondary_id: row.secondaryId,
      last_remote_wal: row.appliedLsn,
      last_wal: head,
      merkle_root: await this.merkleRoot(),
      ...this.reindexStatus(row),
      epoch: row.epoch,
      primaries: [
        {
          api_address: row.primaryApiAddr ?? '',
          cluster_address: '',
          connection_status: this.connection,
          last_heartbeat: (this.lastPrimaryHeartbeat ?? row.lastHeartbeat)?.toISOString() ?? '',
        },
      ],
      known_primary_cluster_addrs: [],
      last_error: row.lastError ?? '',
      ...(state === 'merkle-sync' || state === 'merkle-diff' ? { sync_progress: row.syncProgress, sync_total_keys: row.syncTotalKeys } : {}),
    };
  }
}

/**
 * The barrier: everything core stores passes through here and is encrypted with the keyring,
 * bound to its storage path (invariant 8). While sealed there is no keyring and every call
 * throws Sealed.
 */
import { Conflict, KeyringStale, MustForward, Sealed } from './errors';
import { Keyring } from './keyring';
import type { RawRead, Store, StoreTx, VersionedRead } from './ports';

export interface BarrierTx {
  get<T = unknown>(path: string): Promise<T | null>;
  getMany(paths: string[]): Promise<unknown[]>;
  put(path: string, value: unknown): Promise<void>;
  /** Several puts in one round trip (each still with its WAL row). */
  putMany(entries: [string, unknown][]): Promise<void>;
  delete(path: string): Promise<boolean>;
  list(prefix: string): Promise<string[]>;
  lock(key: string): Promise<void>;
  getLocal<T = unknown>(path: string): Promise<T | null>;
  putLocal(path: string, value: unknown): Promise<void>;
  deleteLocal(path: string): Promise<void>;
  listLocal(prefix: string): Promise<string[]>;
}

/** What an engine stores through: the replicated barrier, or the same calls on local storage. */
export interface StorageView {
  /** `prefetched`: the same read, already fetched (used when it is a plan for exactly this path). */
  get<T = unknown>(path: string, prefetched?: RawRead | null): Promise<T | null>;
  list(prefix: string): Promise<string[]>;
  /** `prefetched`: the same read, already fetched (used when its path and prefix match). */
  getWithLast<A, B>(path: string, prefix: string, prefetched?: RawRead | null): Promise<{ value: A | null; last: { path: string; value: B } | null }>;
  transaction<T>(fn: (tx: BarrierTx) => Promise<T>): Promise<{ result: T; lastLsn: number }>;
  /**
   * A read-modify-write anchored on one entry: reads `anchor` and `extra`, hands their values
   * to `compute`, and writes what it returns as if no one else had changed the anchor in
   * between — every other change of the anchor is either wholly before or wholly after. On
   * replicated storage it is optimistic (see Barrier.modify), so `compute` may run more than
   * once and must not have effects of its own.
   */
  modify<R>(anchor: string, extra: string[], compute: (values: unknown[]) => Promise<Modification<R>>, prefetched?: VersionedRead | null): Promise<{ result: R; lastLsn: number }>;
}

/** What a `modify` writes: nothing unless `anchor` is set (a value, or null to delete it). */
export interface Modification<R> {
  result: R;
  anchor?: unknown;
  /**
   * Write the anchor whatever another writer did to it since it was read (last writer wins, as
   * KV v1 does), instead of trying again when it moved. Only for changes that do not depend on
   * what was read.
   */
  blind?: boolean;
  puts?: [string, unknown][];
  deletes?: string[];
}

/** Optimistic attempts before a write gives up on a key that others keep changing. */
const MODIFY_ATTEMPTS = 100;

export class Barrier implements StorageView {
  private keyring: Keyring | null = null;
  /**
   * On a secondary, replicated storage is written only by the apply path (invariant 7): a
   * use case that tries to write it is stopped before anything commits, and forwarded.
   */
  replicatedReadOnly = false;

  constructor(
    private readonly store: Store,
    /** Re-reads the keyring (after another process rotated it); set on unseal. */
    private reloadKeyring: (() => Promise<Keyring>) | null = null,
  ) {}

  get sealed(): boolean {
    return this.keyring === null;
  }

  unsealWith(keyring: Keyring, reload: () => Promise<Keyring>): void {
    this.keyring = keyring;
    this.reloadKeyring = reload;
  }

  seal(): void {
    this.keyring = null;
    this.reloadKeyring = null;
  }

  get currentKeyring(): Keyring {
    if (!this.keyring) throw new Sealed();
    return this.keyring;
  }

  setKeyring(k: Keyring): void {
    this.keyring = k;
  }

  encrypt(path: string, value: unknown): Buffer {
    return this.currentKeyring.encrypt(path, Buffer.from(JSON.stringify(value)));
  }

  async decrypt<T>(path: string, blob: Buffer | null): Promise<T | null> {
    if (!blob) return null;
    let plain: Buffer;
    try {
      plain = this.currentKeyring.decrypt(path, blob);
    } catch (err) {
      // A term we do not know yet (another process rotated the key), or a keyring this process
      // holds that was replaced (a secondary adopted its primary's): reload once and retry.
      if (!this.reloadKeyring) throw err;
      this.keyring = await this.reloadKeyring();
      plain = this.currentKeyring.decrypt(path, blob);
    }
    return JSON.parse(plain.toString('utf8')) as T;
  }

  async get<T = unknown>(path: string, prefetched?: RawRead | null): Promise<T | null> {
    this.currentKeyring;
    const blob = prefetched && prefetched.path === path && prefetched.prefix === null ? prefetched.value : await this.store.get(path);
    return this.decrypt<T>(path, blob);
  }

  async list(prefix: string): Promise<string[]> {
    this.currentKeyring;
    return this.store.list(prefix);
  }

  /** The entry at `path` and the last live entry under `prefix`, decrypted, in one round trip. */
  async getWithLast<A, B>(path: string, prefix: string, prefetched?: RawRead | null): Promise<{ value: A | null; last: { path: string; value: B } | null }> {
    this.currentKeyring;
    const r = prefetched && prefetched.path === path && prefetched.prefix === prefix ? prefetched : await this.store.getWithLast(path, prefix);
    return {
      value: await this.decrypt<A>(path, r.value),
      last: r.last ? { path: r.last.path, value: (await this.decrypt<B>(r.last.path, r.last.value))! } : null,
    };
  }

  async getLocal<T = unknown>(path: string): Promise<T | null> {
    this.currentKeyring;
    return this.decrypt<T>(path, await this.store.getLocal(path));
  }

  async listLocal(prefix: string): Promise<string[]> {
    this.currentKeyring;
    return this.store.listLocal(prefix);
  }

  /**
   * The storage of a mount: replicated, or — for `local: true` mounts — local storage that never
   * ships and that a secondary writes itself (invariant 5).
   */
  view(local: boolean): StorageView {
    if (!local) return this;
    const localTx = (tx: BarrierTx): BarrierTx => ({
      get: (p) => tx.getLocal(p),
      getMany: (ps) => Promise.all(ps.map((p) => tx.getLocal(p))),
      put: (p, v) => tx.putLocal(p, v),
      putMany: async (entries) => {
        for (const [p, v] of entries) await tx.putLocal(p, v);
      },
      delete: async (p) => {
        await tx.deleteLocal(p);
        return true;
      },
      list: (p) => tx.listLocal(p),
      lock: (k) => tx.lock(k),
      getLocal: (p) => tx.getLocal(p),
      putLocal: (p, v) => tx.putLocal(p, v),
      deleteLocal: (p) => tx.deleteLocal(p),
      listLocal: (p) => tx.listLocal(p),
    });
    return {
      get: (p) => this.getLocal(p),
      list: (p) => this.listLocal(p),
      getWithLast: async (p) => ({ value: await this.getLocal(p), last: null }),
      transaction: (fn) => this.transaction((tx) => fn(localTx(tx))),
      // Local storage has no row versions: the anchor is locked for the whole read-modify-write.
      modify: (anchor, extra, compute) =>
        this.transaction(async (raw) => {
          const tx = localTx(raw);
          await tx.lock(anchor);
          const m = await compute(await tx.getMany([anchor, ...extra]));
          if (m.anchor === undefined) return m.result;
          for (const p of m.deletes ?? []) await tx.delete(p);
          await tx.putMany(m.puts ?? []);
          if (m.anchor === null) await tx.delete(anchor);
          else await tx.put(anchor, m.anchor);
          return m.result;
        }),
    };
  }

  /**
   * Optimistic read-modify-write on replicated storage (StorageView.modify): read the entries
   * with their row versions, compute, and write in one statement guarded by the anchor's
   * version (Store.casWrite); if another writer changed the anchor meanwhile, nothing was
   * written, and it reads and computes again. No lock or transaction is held across round
   * trips, and concurrent writes share one statement and one commit.
   */
  async modify<R>(anchor: string, extra: string[], compute: (values: unknown[]) => Promise<Modification<R>>, prefetched?: VersionedRead | null): Promise<{ result: R; lastLsn: number }> {
    const paths = [anchor, ...extra];
    // The first attempt can use what was read with the token (the guard below still decides).
    let first = prefetched && prefetched.paths.length === paths.length && prefetched.paths.every((p, i) => p === paths[i]) ? prefetched.entries : null;
    for (let attempt = 1; attempt <= MODIFY_ATTEMPTS; attempt++) {
      this.currentKeyring;
      // A secondary writes replicated data only through apply: the primary does this one.
      if (this.replicatedReadOnly) throw new MustForward();
      const read = first ?? (await this.store.getVersioned(paths));
      first = null;
      const values = await Promise.all(read.map((r, i) => this.decrypt(paths[i], r.value)));
      const m = await compute(values);
      if (m.anchor === undefined || (m.anchor === null && values[0] === null)) {
        if (m.puts?.length || m.deletes?.length) throw new Error('modify: a change must rewrite its anchor');
        return { result: m.result, lastLsn: 0 };
      }
      try {
        const seq = await this.store.casWrite({
          anchor: { path: anchor, version: m.blind ? -1 : read[0].version, value: m.anchor === null ? null : this.encrypt(anchor, m.anchor) },
          puts: (m.puts ?? []).map(([p, v]) => [p, this.encrypt(p, v)]),
          deletes: m.deletes ?? [],
        });
        if (seq !== null) return { result: m.result, lastLsn: seq };
      } catch (err) {
        // Another process rotated the key: reload the keyring and go again (nothing was written).
        if (!(err instanceof KeyringStale) || !this.reloadKeyring) throw err;
        this.keyring = await this.reloadKeyring();
      }
    }
    throw new Conflict(`${anchor} kept changing under ${MODIFY_ATTEMPTS} attempts to write it; retry`);
  }

  /** Runs `fn` in one storage transaction; the use case owns it. */
  async transaction<T>(fn: (tx: BarrierTx) => Promise<T>): Promise<{ result: T; lastLsn: number }> {
    try {
      return await this.attempt(fn);
    } catch (err) {
      // Another process rotated the key: reload the keyring and run the use case again (the
      // failed attempt committed nothing).
      if (!(err instanceof KeyringStale) || !this.reloadKeyring) throw err;
      this.keyring = await this.reloadKeyring();
      return this.attempt(fn);
    }
  }

  private async attempt<T>(fn: (tx: BarrierTx) => Promise<T>): Promise<{ result: T; lastLsn: number }> {
    this.currentKeyring;
    return this.store.transaction(async (raw: StoreTx) => {
      const tx: BarrierTx = {
        get: async (p) => this.decrypt(p, await raw.get(p)),
        getMany: async (ps) => {
          const blobs = await raw.getMany(ps);
          return Promise.all(blobs.map((b, i) => this.decrypt(ps[i], b)));
        },
        put: async (p, v) => {
          if (this.replicatedReadOnly) throw new MustForward();
          await raw.put(p, this.encrypt(p, v));
        },
        putMany: async (entries) => {
          if (entries.length === 0) return;
          if (this.replicatedReadOnly) throw new MustForward();
          await raw.putMany(entries.map(([p, v]) => [p, this.encrypt(p, v)]));
        },
        delete: async (p) => {
          if (this.replicatedReadOnly) throw new MustForward();
          return raw.delete(p);
        },
        list: (p) => raw.list(p),
        lock: (k) => raw.lock(k),
        getLocal: async (p) => this.decrypt(p, await raw.getLocal(p)),
        putLocal: (p, v) => raw.putLocal(p, this.encrypt(p, v)),
        deleteLocal: (p) => raw.deleteLocal(p),
        listLocal: (p) => raw.listLocal(p),
      };
      return fn(tx);
    });
  }
}

/**
 * Seal and unseal (Vault's `sys/init`, `sys/unseal`, `sys/seal`).
 *
 * The root key encrypts the keyring. With the Shamir seal it is split into shares (the
 * audited `shamir-secret-sharing` library) and never stored: each server process collects
 * shares until the threshold and then opens the keyring. With the `static` seal the root key
 * is stored wrapped under the configured key, so a process unseals itself at boot.
 *
 * Unseal states per process: sealed (progress 0) → sealed (progress k < t) → unsealed;
 * a wrong combination resets progress to 0 and fails; `reset` returns to progress 0.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { combine, split } from 'shamir-secret-sharing';
import { AlreadyInitialized, InvalidRequest, NotInitialized } from './errors';
import { Keyring, open, openKeyring, seal, sealKeyring } from './keyring';
import type { SealRecord, Store } from './ports';

export interface StaticSealKey {
  keyId: string;
  key: Buffer;
  previous?: { keyId: string; key: Buffer };
}

export interface InitRequest {
  secretShares: number;
  secretThreshold: number;
  clusterName: string;
}

export interface InitResult {
  keys: Buffer[];
  rootKey: Buffer;
  keyring: Keyring;
  record: SealRecord;
}

const ROOT_WRAP_AAD = 'coffer/root-key';

export class SealState {
  private shares: Buffer[] = [];
  nonce = '';

  constructor(
    private readonly store: Store,
    readonly staticKey: StaticSealKey | undefined,
  ) {}

  get progress(): number {
    return this.shares.length;
  }

  async record(): Promise<SealRecord | null> {
    return this.store.readSeal();
  }

  /**
   * Creates the root key and keyring and stores the seal record. Returns the unseal keys
   * (Shamir) or recovery keys (static seal), to be shown once and never stored.
   */
  async initialize(req: InitRequest): Promise<InitResult> {
    if (await this.store.readSeal()) throw new AlreadyInitialized();
    validateShares(req.secretShares, req.secretThreshold);
    const rootKey = randomBytes(32);
    const keyring = Keyring.create();
    const isStatic = this.staticKey !== undefined;
    // With an auto-unseal key the shares protect a recovery key instead of the root key (Vault's
    // recovery keys); Coffer keeps no operation behind them yet, so they are returned only.
    const secret = isStatic ? randomBytes(32) : rootKey;
    const keys = await splitKey(secret, req.secretShares, req.secretThreshold);
    const record: SealRecord = {
      sealType: isStatic ? 'static' : 'shamir',
      secretShares: req.secretShares,
      secretThreshold: req.secretThreshold,
      wrappedRootKey: isStatic ? seal(this.staticKey!.key, 0, ROOT_WRAP_AAD, rootKey) : null,
      sealKeyId: isStatic ? this.staticKey!.keyId : null,
      keyring: sealKeyring(rootKey, keyring),
      clusterId: randomUUID(),
      clusterName: req.clusterName,
    };
    if (!(await this.store.createSeal(record))) throw new AlreadyInitialized();
    return { keys, rootKey, keyring, record };
  }

  /** Adds one share. Returns the opened keyring once the threshold is reached, else null. */
  async submitShare(key: Buffer): Promise<{ keyring: Keyring; rootKey: Buffer } | null> {
    const rec = await this.store.readSeal();
    if (!rec) throw new NotInitialized();
    if (rec.sealType !== 'shamir') throw new InvalidRequest('unseal keys are not used with an auto-unseal seal');
    if (this.shares.length === 0) this.nonce = randomUUID();
    if (this.shares.some((s) => s.equals(key))) return null; // Vault ignores a repeated share
    this.shares.push(key);
    if (this.shares.length < rec.secretThreshold) return null;
    const shares = this.shares;
    this.reset();
    let rootKey: Buffer;
    try {
      rootKey = rec.secretThreshold === 1 ? shares[0] : Buffer.from(await combine(shares.map((s) => new Uint8Array(s))));
    } catch (err) {
      // Malformed shares (wrong length, repeated x-coordinate) are the caller's error.
      throw new InvalidRequest(`invalid unseal key: ${(err as Error).message}`);
    }
    return { keyring: openKeyring(rootKey, rec.keyring), rootKey };
  }

  /** Static seal: unwraps the stored root key with the configured key (or the previous one). */
  async autoUnseal(): Promise<{ keyring: Keyring; rootKey: Buffer }> {
    const rec = await this.store.readSeal();
    if (!rec) throw new NotInitialized();
    if (rec.sealType !== 'static' || !rec.wrappedRootKey || !this.staticKey) {
      throw new InvalidRequest('this cluster does not use the static seal');
    }
    const candidates = [this.staticKey, ...(this.staticKey.previous ? [this.staticKey.previous] : [])];
    const match = candidates.find((c) => c.keyId === rec.sealKeyId) ?? candidates[0];
    let rootKey: Buffer;
    try {
      rootKey = open(match.key, ROOT_WRAP_AAD, rec.wrappedRootKey);
    } catch {
      throw new InvalidRequest(`static seal key "${match.keyId}" does not open this cluster's root key`);
    }
    return { keyring: openKeyring(rootKey, rec.keyring), rootKey };
  }

  reset(): void {
    this.shares = [];
    this.nonce = '';
  }
}

function validateShares(n: number, t: number): void {
  if (!Number.isInteger(n) || !Number.isInteger(t)) throw new InvalidRequest('secret_shares and secret_threshold must be integers');
  if (n < 1 || n > 255) throw new InvalidRequest('secret_shares must be between 1 and 255');
  if (t < 1 || t > n) throw new InvalidRequest('secret_threshold must be between 1 and secret_shares');
  if (n > 1 && t === 1) throw new InvalidRequest('threshold must be greater than one for multiple shares');
  if (n === 1 && t !== 1) throw new InvalidRequest('threshold must be one for a single share');
}

async function splitKey(secret: Buffer, n: number, t: number): Promise<Buffer[]> {
  if (n === 1) return [secret];
  return (await split(new Uint8Array(secret), n, t)).map((s) => Buffer.from(s));
}

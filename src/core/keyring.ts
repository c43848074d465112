/**
 * The barrier keyring and its AES-256-GCM envelope (DESIGN.md invariant 8).
 *
 * Every stored value is `0x01 | term (u32 BE) | nonce (12) | ciphertext | tag (16)`, encrypted
 * with the key of `term` and the storage path as associated data: a value copied to another
 * path fails to decrypt. Rotation adds a term; older terms stay to decrypt older values.
 * The keyring itself is stored encrypted under the root key (which Shamir shares or an
 * auto-unseal key protect) with AAD "coffer/keyring".
 */
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { InvalidRequest } from './errors';

const VERSION = 0x01;
const HEADER = 1 + 4 + 12;
const TAG = 16;
export const KEYRING_AAD = 'coffer/keyring';

export interface KeyTerm {
  term: number;
  key: Buffer;
  installedAt: string;
}

export class Keyring {
  private constructor(
    private readonly terms: Map<number, KeyTerm>,
    readonly activeTerm: number,
  ) {}

  static create(now = new Date()): Keyring {
    const t: KeyTerm = { term: 1, key: randomBytes(32), installedAt: now.toISOString() };
    return new Keyring(new Map([[1, t]]), 1);
  }

  /** A new keyring with one more term, which becomes active. */
  rotate(now = new Date()): Keyring {
    const term = this.activeTerm + 1;
    const terms = new Map(this.terms);
    terms.set(term, { term, key: randomBytes(32), installedAt: now.toISOString() });
    return new Keyring(terms, term);
  }

  get active(): KeyTerm {
    return this.terms.get(this.activeTerm)!;
  }

  has(term: number): boolean {
    return this.terms.has(term);
  }

  encrypt(path: string, plaintext: Buffer): Buffer {
    return seal(this.active.key, this.activeTerm, path, plaintext);
  }

  decrypt(path: string, blob: Buffer): Buffer {
    const term = termOf(blob);
    const t = this.terms.get(term);
    if (!t) throw new UnknownTerm(term);
    return open(t.key, path, blob);
  }

  serialize(): Buffer {
    return Buffer.from(
      JSON.stringify({
        active: this.activeTerm,
        terms: [...this.terms.values()].map((t) => ({ term: t.term, key: t.key.toString('base64'), installed: t.installedAt })),
      }),
    );
  }

  static deserialize(buf: Buffer): Keyring {
    const raw = JSON.parse(buf.toString('utf8')) as { active: number; terms: { term: number; key: string; installed: string }[] };
    const terms = new Map(raw.terms.map((t) => [t.term, { term: t.term, key: Buffer.from(t.key, 'base64'), installedAt: t.installed }]));
    return new Keyring(terms, raw.active);
  }
}

export class UnknownTerm extends Error {
  constructor(readonly term: number) {
    super(`no barrier key for term ${term}`);
  }
}

export function termOf(blob: Buffer): number {
  if (blob.length < HEADER + TAG || blob[0] !== VERSION) throw new Error('not a barrier-encrypted value');
  return blob.readUInt32BE(1);
}

export function seal(key: Buffer, term: number, aad: string, plaintext: Buffer): Buffer {
  const nonce = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(Buffer.from(aad, 'utf8'));
  const header = Buffer.alloc(5);
  header[0] = VERSION;
  header.writeUInt32BE(term, 1);
  return Buffer.concat([header, nonce, cipher.update(plaintext), cipher.final(), cipher.getAuthTag()]);
}

export function open(key: Buffer, aad: string, blob: Buffer): Buffer {
  termOf(blob);
  const nonce = blob.subarray(5, HEADER);
  const tag = blob.subarray(blob.length - TAG);
  const decipher = createDecipheriv('aes-256-gcm', key, nonce);
  decipher.setAAD(Buffer.from(aad, 'utf8'));
  decipher.setAuthTag(tag);
  return Buffer.concat([decipher.update(blob.subarray(HEADER, blob.length - TAG)), decipher.final()]);
}

/** Decrypts the keyring with a candidate root key; a wrong key is the caller's error. */
export function openKeyring(rootKey: Buffer, blob: Buffer): Keyring {
  try {
    return Keyring.deserialize(open(rootKey, KEYRING_AAD, blob));
  } catch {
    throw new InvalidRequest('failed to decrypt keyring: unseal key is incorrect');
  }
}

export function sealKeyring(rootKey: Buffer, keyring: Keyring): Buffer {
  return seal(rootKey, 0, KEYRING_AAD, keyring.serialize());
}

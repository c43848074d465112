/**
 * The barrier keyring and its AES-256-GCM envelope (DESIGN.md invariant 8): values round-trip,
 * the storage path is bound as associated data, any tampering is detected, rotation keeps old
 * terms readable, and the keyring itself is sealed under the root key.
 */
import { randomBytes } from 'node:crypto';
import { InvalidRequest } from '../../src/core/errors';
import { Keyring, KEYRING_AAD, open, openKeyring, sealKeyring, termOf, UnknownTerm } from '../../src/core/keyring';

const HEADER = 1 + 4 + 12;
const TAG = 16;

function flipByte(blob: Buffer, i: number): Buffer {
  const copy = Buffer.from(blob);
  copy[i] ^= 0x01;
  return copy;
}

describe('Keyring envelope', () => {
  test('encrypt/decrypt round trip, and the envelope layout is 0x01 | term | nonce | ct | tag', () => {
    const kr = Keyring.create();
    const plain = Buffer.from(JSON.stringify({ password: 'hunter2', n: 42 }));
    const blob = kr.encrypt('logical/abc/versions/xyz/1', plain);
    expect(blob[0]).toBe(0x01);
    expect(blob.readUInt32BE(1)).toBe(1);
    expect(termOf(blob)).toBe(1);
    expect(blob.length).toBe(HEADER + plain.length + TAG);
    // The plaintext does not appear in the ciphertext.
    expect(blob.includes(plain)).toBe(false);
    expect(kr.decrypt('logical/abc/versions/xyz/1', blob).equals(plain)).toBe(true);
  });

  test('empty and large plaintexts round-trip', () => {
    const kr = Keyring.create();
    for (const plain of [Buffer.alloc(0), randomBytes(1), randomBytes(1 << 20)]) {
      const blob = kr.encrypt('p', plain);
      expect(kr.decrypt('p', blob).equals(plain)).toBe(true);
    }
  });

  test('a fresh nonce per encryption: same plaintext and path give different blobs', () => {
    const kr = Keyring.create();
    const plain = Buffer.from('same');
    const a = kr.encrypt('p', plain);
    const b = kr.encrypt('p', plain);
    expect(a.equals(b)).toBe(false);
    expect(a.subarray(5, HEADER).equals(b.subarray(5, HEADER))).toBe(false);
  });

  test('the path is bound as AAD: decrypting under another path fails', () => {
    const kr = Keyring.create();
    const blob = kr.encrypt('logical/m/data/a', Buffer.from('secret-a'));
    expect(() => kr.decrypt('logical/m/data/b', blob)).toThrow();
    expect(() => kr.decrypt('logical/m/data/a/', blob)).toThrow();
    expect(() => kr.decrypt('', blob)).toThrow();
    // The right path still works after failed attempts.
    expect(kr.decrypt('logical/m/data/a', blob).toString()).toBe('secret-a');
  });

  test('tamper detection: any flipped bit of nonce, ciphertext or tag fails to decrypt', () => {
    const kr = Keyring.create();
    const path = 'logical/m/data/k';
    const blob = kr.encrypt(path, Buffer.from('the quick brown fox jumps over the lazy dog'));
    for (let i = 5; i < blob.length; i++) {
      expect(() => kr.decrypt(path, flipByte(blob, i))).toThrow();
    }
  });

  test('tamper detection: header and length changes are refused', () => {
    const kr = Keyring.create();
    const path = 'p';
    const blob = kr.encrypt(path, Buffer.from('value'));
    // Version byte.
    expect(() => kr.decrypt(path, flipByte(blob, 0))).toThrow(/not a barrier-encrypted value/);
    // Term bytes: a term this keyring does not have.
    const otherTerm = Buffer.from(blob);
    otherTerm.writeUInt32BE(7, 1);
    expect(() => kr.decrypt(path, otherTerm)).toThrow(UnknownTerm);
    // Truncated, extended and too-short blobs.
    expect(() => kr.decrypt(path, blob.subarray(0, blob.length - 1))).toThrow();
    expect(() => kr.decrypt(path, Buffer.concat([blob, Buffer.from([0])]))).toThrow();
    expect(() => kr.decrypt(path, blob.subarray(0, HEADER + TAG - 1))).toThrow(/not a barrier-encrypted value/);
    expect(() => kr.decrypt(path, Buffer.alloc(0))).toThrow();
  });

  test('a term relabelled to another key of the same keyring fails authentication', () => {
    const kr = Keyring.create().rotate();
    const blob = kr.encrypt('p', Buffer.from('under term 2'));
    expect(termOf(blob)).toBe(2);
    const relabelled = Buffer.from(blob);
    relabelled.writeUInt32BE(1, 1);
    expect(() => kr.decrypt('p', relabelled)).toThrow();
  });

  test('another keyring cannot decrypt', () => {
    const a = Keyring.create();
    const b = Keyring.create();
    const blob = a.encrypt('p', Buffer.from('x'));
    expect(() => b.decrypt('p', blob)).toThrow();
  });
});

describe('Keyring rotation', () => {
  test('rotate: old terms still decrypt, new writes use the new term, the original is unchanged', () => {
    const k1 = Keyring.create();
    const old = k1.encrypt('a', Buffer.from('old value'));
    const k2 = k1.rotate();
    expect(k2.activeTerm).toBe(2);
    expect(k2.active.term).toBe(2);
    expect(k2.has(1)).toBe(true);
    expect(k2.has(2)).toBe(true);
    expect(k2.active.key.equals(k1.active.key)).toBe(false);
    // Rotation returns a new keyring; the old one is untouched.
    expect(k1.activeTerm).toBe(1);
    expect(k1.has(2)).toBe(false);

    const fresh = k2.encrypt('b', Buffer.from('new value'));
    expect(termOf(fresh)).toBe(2);
    expect(k2.decrypt('a', old).toString()).toBe('old value');
    expect(k2.decrypt('b', fresh).toString()).toBe('new value');
    // The pre-rotation keyring cannot read the new term.
    expect(() => k1.decrypt('b', fresh)).toThrow(UnknownTerm);

    const k3 = k2.rotate();
    expect(k3.activeTerm).toBe(3);
    expect(termOf(k3.encrypt('c', Buffer.from('c')))).toBe(3);
    expect(k3.decrypt('a', old).toString()).toBe('old value');
    expect(k3.decrypt('b', fresh).toString()).toBe('new value');
  });

  test('installedAt records the rotation time', () => {
    const t0 = new Date('2026-01-01T00:00:00Z');
    const t1 = new Date('2026-02-01T00:00:00Z');
    const kr = Keyring.create(t0).rotate(t1);
    expect(kr.active.installedAt).toBe(t1.toISOString());
  });
});

describe('Keyring storage under the root key', () => {
  test('serialize/deserialize round trip keeps every term and the active one', () => {
    // One value written under each term as the keyring is rotated.
    const k1 = Keyring.create();
    const k2 = k1.rotate();
    const kr = k2.rotate();
    const blobs = [k1, k2, kr].map((k, i) => ({ t: i + 1, blob: k.encrypt('p', Buffer.from(`v${i + 1}`)) }));
    expect(blobs.map((b) => termOf(b.blob))).toEqual([1, 2, 3]);
    const back = Keyring.deserialize(kr.serialize());
    expect(back.activeTerm).toBe(3);
    for (const { t, blob } of blobs) expect(back.decrypt('p', blob).toString()).toBe(`v${t}`);
  });

  test('sealKeyring/openKeyring round trip with the root key', () => {
    const root = randomBytes(32);
    const kr = Keyring.create().rotate();
    const before = kr.encrypt('logical/x', Buffer.from('payload'));
    const sealed = sealKeyring(root, kr);
    expect(sealed[0]).toBe(0x01);
    expect(termOf(sealed)).toBe(0);
    // The serialised keyring (and its base64 keys) is not visible in the sealed blob.
    expect(sealed.includes(kr.serialize())).toBe(false);
    expect(sealed.toString('latin1').includes(kr.active.key.toString('base64'))).toBe(false);
    // It is bound to the keyring AAD.
    expect(open(root, KEYRING_AAD, sealed).equals(kr.serialize())).toBe(true);
    expect(() => open(root, 'other-aad', sealed)).toThrow();

    const opened = openKeyring(root, sealed);
    expect(opened.activeTerm).toBe(2);
    expect(opened.decrypt('logical/x', before).toString()).toBe('payload');
    expect(termOf(opened.encrypt('y', Buffer.from('z')))).toBe(2);
  });

  test('a wrong root key gives InvalidRequest (the caller’s error, not a 500)', () => {
    const root = randomBytes(32);
    const sealed = sealKeyring(root, Keyring.create());
    const wrong = Buffer.from(root);
    wrong[0] ^= 0xff;
    expect(() => openKeyring(wrong, sealed)).toThrow(InvalidRequest);
    expect(() => openKeyring(randomBytes(32), sealed)).toThrow(/unseal key is incorrect/);
    // A tampered keyring blob is refused the same way.
    expect(() => openKeyring(root, flipByte(sealed, sealed.length - 1))).toThrow(InvalidRequest);
    // A root key of the wrong length too (e.g. a share submitted as if it were the key).
    expect(() => openKeyring(randomBytes(16), sealed)).toThrow(InvalidRequest);
  });
});

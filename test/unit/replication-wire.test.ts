import { assertSafePrimaryAddr, compareVersions, decodeActivation, encodeActivation, parseCredentialHeader, credentialHeader, secretDigest, secretMatches } from '../../src/replication/wire';

test('activation tokens round-trip and refuse junk', () => {
  const t = encodeActivation('https://pri.example:8200', 'hvs.abc');
  expect(decodeActivation(t)).toEqual({ addr: 'https://pri.example:8200', token: 'hvs.abc' });
  for (const bad of ['', 'hvs.abc', 'cofferact.!!!', 'cofferact.' + Buffer.from('{"addr":1}').toString('base64url')]) {
    expect(() => decodeActivation(bad)).toThrow(/invalid activation token/);
  }
});

test.each(['http://169.254.169.254/latest', 'http://[fe80::1]:8200', 'http://metadata.google.internal', 'ftp://x', 'not a url'])('primary_api_addr %s is refused', (a) => {
  expect(() => assertSafePrimaryAddr(a)).toThrow();
});

test('link-local is allowed only when configured; ordinary addresses pass', () => {
  expect(() => assertSafePrimaryAddr('http://169.254.169.254', true)).not.toThrow();
  expect(() => assertSafePrimaryAddr('https://10.1.2.3:8200')).not.toThrow();
  expect(() => assertSafePrimaryAddr('http://127.0.0.1:8200')).not.toThrow();
});

test('versions compare numerically', () => {
  expect(compareVersions('0.10.0', '0.9.9')).toBeGreaterThan(0);
  expect(compareVersions('1.0.0', '1.0.0')).toBe(0);
  expect(compareVersions('0.1.0', '0.2.0')).toBeLessThan(0);
});

test('credentials: header round trip, digest check is exact', () => {
  const h = credentialHeader('dc2.eu', 'secret-xyz');
  expect(parseCredentialHeader(h)).toEqual({ secondaryId: 'dc2.eu', secret: 'secret-xyz' });
  expect(parseCredentialHeader(undefined)).toBeNull();
  expect(parseCredentialHeader('nodot')).toBeNull();
  expect(secretMatches('secret-xyz', secretDigest('secret-xyz'))).toBe(true);
  expect(secretMatches('secret-xyz!', secretDigest('secret-xyz'))).toBe(false);
  expect(secretMatches('secret-xyz', null)).toBe(false);
});

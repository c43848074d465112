/**
 * canonicalPath: one spelling per resource before routing and the ACL, so a policy on
 * `secret/data/a` cannot be side-stepped with `..`, encoded separators or doubled slashes.
 */
import fc from 'fast-check';
import { InvalidRequest } from '../../src/core/errors';
import { canonicalPath } from '../../src/http/paths';

function rejects(raw: string): InvalidRequest {
  let caught: unknown;
  try {
    canonicalPath(raw);
  } catch (err) {
    caught = err;
  }
  if (!(caught instanceof InvalidRequest)) {
    throw new Error(`expected canonicalPath(${JSON.stringify(raw)}) to throw InvalidRequest, got ${caught === undefined ? 'no error' : String(caught)}`);
  }
  return caught;
}

describe('canonicalPath accepts normal paths', () => {
  test.each([
    ['secret/data/my-app/config', 'secret/data/my-app/config'],
    ['sys/mounts/secret', 'sys/mounts/secret'],
    ['sys/health', 'sys/health'],
    ['secret/data/a.b', 'secret/data/a.b'],
    ['secret/data/.hidden', 'secret/data/.hidden'],
    ['secret/data/v1.2.3-rc_1', 'secret/data/v1.2.3-rc_1'],
    ['secret/data/with%20space', 'secret/data/with space'],
    ['secret/data/caf%C3%A9', 'secret/data/café'],
    ['secret/data/a+b', 'secret/data/a+b'],
    ['secret/data/a:b@c', 'secret/data/a:b@c'],
    ['secret/data/%41', 'secret/data/A'],
    ['', ''],
  ])('%j → %j', (raw, expected) => {
    expect(canonicalPath(raw)).toBe(expected);
  });

  test('keeps a trailing slash (LIST prefixes)', () => {
    expect(canonicalPath('secret/metadata/')).toBe('secret/metadata/');
    expect(canonicalPath('secret/metadata/team/')).toBe('secret/metadata/team/');
    expect(canonicalPath('secret/')).toBe('secret/');
  });

  test('collapses doubled slashes and drops leading ones', () => {
    expect(canonicalPath('secret//data/a')).toBe('secret/data/a');
    expect(canonicalPath('secret///data////a')).toBe('secret/data/a');
    expect(canonicalPath('/secret/data/a')).toBe('secret/data/a');
    expect(canonicalPath('//secret/data/a')).toBe('secret/data/a');
    expect(canonicalPath('secret/metadata//')).toBe('secret/metadata/');
    expect(canonicalPath('/')).toBe('');
    expect(canonicalPath('//')).toBe('');
  });

  test('a double-encoded separator is one literal "%2F" in a name, not a separator', () => {
    // Decoded exactly once: "%252F" is the three characters "%2F", never a "/".
    expect(canonicalPath('secret/data/a%252Fb')).toBe('secret/data/a%2Fb');
  });
});

describe('canonicalPath rejects', () => {
  test.each([
    'secret/data/../sys/seal',
    'secret/data/x/../a',
    '../secret',
    'secret/..',
    'secret/data/..',
    'secret/data/../',
    '..',
  ])('".." segments: %j', (raw) => {
    expect(rejects(raw).message).toMatch(/"\." and "\.\." segments/);
  });

  test.each(['secret/./data/a', './secret/data/a', 'secret/data/.', 'secret/data/./', '.'])('"." segments: %j', (raw) => {
    expect(() => canonicalPath(raw)).toThrow(InvalidRequest);
  });

  test.each([
    'secret/data/%2e%2e/x',
    'secret/data/%2E%2E/x',
    'secret/data/.%2e/x',
    'secret/data/%2e./x',
    'secret/data/%2e/x',
  ])('percent-encoded dot segments: %j', (raw) => {
    rejects(raw);
  });

  test.each([
    'secret%2Fdata%2Fa',
    'secret%2fdata%2fa',
    'secret/data/a%2Fb',
    'secret/data/a%2fb',
    'secret/data/a%5Cb',
    'secret/data/a%5cb',
    'secret/data/a%00',
    'secret/data/%00',
  ])('encoded "/", "\\" and NUL: %j', (raw) => {
    expect(rejects(raw).message).toMatch(/encoded/);
  });

  test.each([
    'secret/data/a\u0000b',
    'secret/data/a\u0001b',
    'secret/data/a\nb',
    'secret/data/a\rb',
    'secret/data/a\tb',
    'secret/data/a\u001fb',
    'secret/data/a\u007fb',
    'secret/data/a%0Ab',
    'secret/data/a%0db',
    'secret/data/a%09b',
    'secret/data/a%01b',
    'secret/data/a%1F',
    'secret/data/a%7F',
    'secret/data/a\\b',
    'secret\\data\\a',
  ])('control characters and backslashes, raw or encoded: %j', (raw) => {
    rejects(raw);
  });

  test.each(['secret/data/%', 'secret/data/%zz', 'secret/data/a%2', 'secret/data/%E0%A4%A', 'secret/data/%C0%AF', 'secret/data/%FF', 'secret/data/%u0041'])(
    'bad percent-encoding: %j',
    (raw) => {
      expect(rejects(raw).message).toMatch(/bad percent-encoding/);
    },
  );

  test.each(['secret/data/foo.', 'secret/data/foo..', 'secret/data/...', 'secret/data/foo./', 'secret/data/foo%2E', 'sys/mounts/x.'])(
    'a final segment ending in ".": %j',
    (raw) => {
      expect(rejects(raw).message).toBe('unsupported path');
    },
  );
});

describe('canonicalPath properties', () => {
  const segment = fc.oneof(
    fc.constantFrom('', '.', '..', 'a', 'b.c', 'x.', '%2e', '%2E%2e', '%2F', '%5c', '%00', '%', '%zz', '%41', 'caf%C3%A9', '\\', '\n', ' ', '~'),
    fc.string({ maxLength: 4 }),
  );
  const rawPath = fc.array(segment, { maxLength: 6 }).map((s) => s.join('/'));

  test('every accepted path is canonical: no empty, "." or ".." segments, no control chars or backslash, no leading slash', () => {
    fc.assert(
      fc.property(rawPath, (raw) => {
        let out: string;
        try {
          out = canonicalPath(raw);
        } catch (err) {
          // Rejections are always the caller's error (400), never anything else.
          return err instanceof InvalidRequest;
        }
        const body = out.endsWith('/') ? out.slice(0, -1) : out;
        const segs = body === '' ? [] : body.split('/');
        return (
          !out.startsWith('/') &&
          !out.includes('//') &&
          segs.every((s) => s !== '' && s !== '.' && s !== '..') &&
          !/[\u0000-\u001f\u007f\\]/.test(out) &&
          (segs.length === 0 || !segs[segs.length - 1].endsWith('.')) &&
          // The trailing slash survives exactly when the input had one and something is left.
          out.endsWith('/') === (raw.endsWith('/') && body !== '')
        );
      }),
      { numRuns: 2000 },
    );
  });

  test('paths that differ only in slashes canonicalise alike', () => {
    fc.assert(
      fc.property(fc.array(fc.stringMatching(/^[a-z0-9_-]{1,6}$/), { minLength: 1, maxLength: 5 }), fc.array(fc.integer({ min: 1, max: 3 }), { minLength: 5, maxLength: 5 }), (segs, slashes) => {
        const plain = segs.join('/');
        const noisy = '/'.repeat(slashes[0] - 1) + segs.map((s, i) => s + (i < segs.length - 1 ? '/'.repeat(slashes[(i + 1) % 5]) : '')).join('');
        return canonicalPath(noisy) === plain;
      }),
    );
  });
});

/**
 * ACL evaluation and policy parsing against Vault's documented behaviour ("Policies" page:
 * path matching, priority matching, capabilities, legacy `policy =`, root and default
 * policies) and, where the docs are silent, Vault's `vault/acl.go`.
 */
import { DEFAULT_POLICY } from '../../src/core/policy';
import { InvalidRequest } from '../../src/core/errors';
import { Acl, morePrecise, requiresSudo, type Capability, type Policy } from '../../src/core/policy';
import { decodePolicyText, parsePolicy, policyToHcl } from '../../src/core/policy-parse';

type Rules = Record<string, Capability[]>;

function policy(name: string, rules: Rules): Policy {
  return { name, rules: Object.entries(rules).map(([path, capabilities]) => ({ path, capabilities })) };
}

/** An ACL from one or more policies, each given as `{ pattern: capabilities }`. */
function acl(...rules: Rules[]): Acl {
  return new Acl(rules.map((r, i) => policy(`p${i}`, r)));
}

/** hcl2json returns blocks keyed by path, so rule order is not kept (nor significant). */
function byPath<T extends { path: string }>(rules: T[]): T[] {
  return [...rules].sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
}

async function parseError(text: string): Promise<string> {
  try {
    await parsePolicy('t', text);
  } catch (err) {
    expect(err).toBeInstanceOf(InvalidRequest);
    return (err as Error).message;
  }
  throw new Error(`expected parsePolicy to reject ${JSON.stringify(text)}`);
}

describe('path matching (docs: "Policy syntax" examples)', () => {
  const docs = acl({
    'secret/foo': ['read'],
    'secret/bar/*': ['read'],
    'secret/zip-*': ['read'],
    'secret/+/teamb': ['read'],
    'secret/+/+/teamc': ['read'],
  });
  test.each([
    // An exact path matches only itself.
    ['secret/foo', true],
    ['secret/food', false],
    ['secret/foo/bar', false],
    // `*` is a prefix glob and crosses segments.
    ['secret/bar/zip', true],
    ['secret/bar/zip/zap', true],
    ['secret/bars/zip', false],
    ['secret/bar', false],
    ['secret/zip-zap', true],
    ['secret/zip-zap/zong', true],
    ['secret/zip/zap', false],
    // `+` is exactly one segment.
    ['secret/foo/teamb', true],
    ['secret/bar/teamb', true],
    ['secret/foo/bar/teamb', false],
    ['secret/teamb', false],
    ['secret/foo/bar/teamc', true],
    ['secret/foo/teamc', false],
    ['secret/a/b/c/teamc', false],
  ])('read %s → %s', (path, allowed) => {
    expect(docs.allows(path, 'read')).toBe(allowed);
  });

  test('`+` combined with a trailing `*`', () => {
    const a = acl({ 'secret/+/team*': ['read'] });
    expect(a.allows('secret/x/teamb', 'read')).toBe(true);
    expect(a.allows('secret/x/teamb/deeper', 'read')).toBe(true);
    expect(a.allows('secret/x/y/teamb', 'read')).toBe(false);
    expect(a.allows('secret/x/tea', 'read')).toBe(false);
  });

  test('a leading slash on a rule or a path is ignored', () => {
    const a = acl({ '/secret/foo': ['read'] });
    expect(a.allows('secret/foo', 'read')).toBe(true);
    expect(a.allows('/secret/foo', 'read')).toBe(true);
  });
});

describe('priority matching: one rule decides, the most specific', () => {
  // Each row: rules, path, the pattern expected to decide, and what the naive answer
  // (longest pattern wins, or the union of all matching rules) would have said.
  test.each<[string, Rules, string, Capability, boolean]>([
    // Rule 1: the rule whose first wildcard comes later wins. `secret/+/bar` is the longer
    // pattern, but its `+` sits at 7 while `secret/foo*` globs only at 10.
    ['1: later first wildcard beats a longer rule', { 'secret/+/bar': ['deny'], 'secret/foo*': ['read'] }, 'secret/foo/bar', 'read', true],
    // Rule 1: a glob can beat a `+` rule if it starts later (docs: prefer foo/a* over foo/+).
    ['1: a later glob beats an earlier +', { 'secret/+': ['deny'], 'secret/a*': ['read'] }, 'secret/abc', 'read', true],
    // Rule 1: foo/bar/+/baz over foo/+/bar/baz, whatever the order of declaration.
    ['1: later + beats earlier +', { 'secret/+/bar/baz': ['deny'], 'secret/bar/+/baz': ['read'] }, 'secret/bar/bar/baz', 'read', true],
    // Rule 2: same first wildcard; a rule not ending in `*` beats one that does, even though
    // the glob rule is the longer string.
    ['2: no trailing * beats trailing *', { 'secret/+/bar*': ['deny'], 'secret/+/bar': ['read'] }, 'secret/x/bar', 'read', true],
    ['2: foo/+ beats foo/*', { 'secret/*': ['deny'], 'secret/+': ['read'] }, 'secret/x', 'read', true],
    // Rule 3 (the docs' own example): "secret/*" outranks "secret/+/+/foo/*" because it has
    // fewer `+` segments, although the other is far longer.
    ['3: fewer + segments beat a longer rule', { 'secret/*': ['read'], 'secret/+/+/foo/*': ['deny'] }, 'secret/a/b/foo/c', 'read', true],
    ['3: one + beats two', { 'secret/+/+/x': ['deny'], 'secret/+/b/x': ['read'] }, 'secret/a/b/x', 'read', true],
    // Rule 4: the longer rule wins — and the shorter one's capabilities do NOT add to it
    // (a union of all matching rules would allow the delete).
    ['4: longer wins, shorter does not add', { 'secret/+/b*': ['read', 'delete'], 'secret/+/ba*': ['read'] }, 'secret/x/bar', 'delete', false],
    ['4: longer plain prefix wins', { 'secret/*': ['read', 'delete'], 'secret/app/*': ['read'] }, 'secret/app/x', 'delete', false],
    // Rule 5: everything else equal, the lexically greater rule wins ("aa" > "+"), in
    // either order of declaration.
    ['5: lexically greater wins', { 'secret/+/+/bb': ['deny'], 'secret/+/aa/+': ['read'] }, 'secret/x/aa/bb', 'read', true],
    ['5: lexically greater wins (declared first)', { 'secret/+/aa/+': ['read'], 'secret/+/+/bb': ['deny'] }, 'secret/x/aa/bb', 'read', true],
  ])('%s', (_name, rules, path, cap, allowed) => {
    expect(acl(rules).allows(path, cap)).toBe(allowed);
    // The same rules split across two policies give the same answer.
    const entries = Object.entries(rules);
    expect(acl(Object.fromEntries(entries.slice(0, 1)), Object.fromEntries(entries.slice(1))).allows(path, cap)).toBe(allowed);
  });

  test.each([
    ['secret/foo*', 'secret/+/bar', true],
    ['secret/a*', 'secret/+', true],
    ['secret/+/bar', 'secret/+/bar*', true],
    ['secret/*', 'secret/+/+/foo/*', true],
    ['secret/+/ba*', 'secret/+/b*', true],
    ['secret/+/aa/+', 'secret/+/+/bb', true],
    ['secret/foo', 'secret/foo*', true],
  ])('morePrecise(%s, %s)', (a, b, expected) => {
    expect(morePrecise(a, b)).toBe(expected);
    expect(morePrecise(b, a)).toBe(!expected);
  });

  test('an exact rule beats any wildcard', () => {
    const a = acl({ 'secret/foo': ['read'], 'secret/foo*': ['deny'], 'secret/+': ['deny'] });
    expect(a.allows('secret/foo', 'read')).toBe(true);
    expect(a.allows('secret/food', 'read')).toBe(false);
  });

  test('a more specific grant beats a broader deny (deny is not global)', () => {
    const a = acl({ 'secret/*': ['deny'] }, { 'secret/app/*': ['read'] });
    expect(a.allows('secret/app/x', 'read')).toBe(true);
    expect(a.allows('secret/other', 'read')).toBe(false);
  });

  test('a more specific deny beats a broader grant (docs: secret/super-secret)', () => {
    const a = acl({ 'secret/*': ['create', 'read', 'update', 'patch', 'delete', 'list'], 'secret/super-secret': ['deny'] });
    expect(a.allows('secret/super-secret', 'read')).toBe(false);
    expect(a.allows('secret/other', 'read')).toBe(true);
  });
});

describe('the same pattern in several policies', () => {
  test('capabilities are unioned', () => {
    const a = acl({ 'secret/foo': ['read'] }, { 'secret/foo': ['update'] });
    expect(a.allows('secret/foo', 'read')).toBe(true);
    expect(a.allows('secret/foo', 'update')).toBe(true);
    expect(a.capabilities('secret/foo')).toEqual(['read', 'update']);
  });

  test.each([
    ['deny first', [{ 'secret/foo': ['deny'] }, { 'secret/foo': ['read', 'sudo'] }]],
    ['deny last', [{ 'secret/foo': ['read', 'sudo'] }, { 'secret/foo': ['deny'] }]],
    ['deny beside other capabilities', [{ 'secret/foo': ['read', 'deny'] }]],
  ] as [string, Rules[]][])('deny wins: %s', (_n, rules) => {
    const a = acl(...rules);
    expect(a.allows('secret/foo', 'read')).toBe(false);
    expect(a.allows('secret/foo', 'read', true)).toBe(false);
    expect(a.capabilities('secret/foo')).toEqual(['deny']);
  });

  test('a glob and an exact rule on the same text are different rules', () => {
    const a = acl({ 'secret/foo': ['deny'] }, { 'secret/foo*': ['read'] });
    expect(a.allows('secret/foo', 'read')).toBe(false);
    expect(a.allows('secret/foobar', 'read')).toBe(true);
  });
});

describe('LIST and trailing slashes', () => {
  test('an exact rule without the slash grants LIST on the slashed path', () => {
    const a = acl({ 'secret/metadata/app': ['list'] });
    expect(a.allows('secret/metadata/app/', 'list')).toBe(true);
    expect(a.allows('secret/metadata/app', 'list')).toBe(true);
    // The fallback is for LIST only.
    expect(a.allows('secret/metadata/app/', 'read')).toBe(false);
  });

  test('a glob ending in / covers LIST of the folder itself', () => {
    const a = acl({ 'secret/metadata/app/*': ['list'] });
    expect(a.allows('secret/metadata/app/', 'list')).toBe(true);
    expect(a.allows('secret/metadata/app/sub/', 'list')).toBe(true);
    expect(a.allows('secret/metadata/', 'list')).toBe(false);
  });

  test('an exact rule with the slash is needed for a slashed non-LIST path', () => {
    const a = acl({ 'secret/metadata/app/': ['list'] });
    expect(a.allows('secret/metadata/app/', 'list')).toBe(true);
    expect(a.allows('secret/metadata/app', 'list')).toBe(false);
  });

  test('LIST tries wildcard rules on the path without its slash first', () => {
    // `secret/foo/*` would match `secret/foo/`, but Vault first looks for `secret/foo`.
    const a = acl({ 'secret/foo*': ['list'], 'secret/foo/*': ['deny'] });
    expect(a.allows('secret/foo/', 'list')).toBe(true);
    expect(a.allows('secret/foo/x', 'read')).toBe(false);
  });
});

describe('sudo and root-protected paths', () => {
  test.each([
    ['sys/auth/userpass', true],
    ['sys/auth/userpass/tune', true],
    ['sys/auth', false], // listing auth methods is not root-protected
    ['sys/audit', true],
    ['sys/audit/file', true],
    ['sys/audit-hash/file', false],
    ['sys/seal', true],
    ['sys/seal-status', false],
    ['sys/step-down', true],
    ['sys/rotate', true],
    ['sys/raw/core/x', true],
    ['sys/leases/lookup/', true],
    ['sys/leases/lookup/secret/', true],
    ['sys/leases/lookup', false], // the default policy's lease lookup
    ['sys/leases/revoke-prefix/secret', true],
    ['sys/revoke-force/secret', true],
    ['sys/mounts/secret', false],
    ['sys/policies/acl/admin', false],
    ['sys/capabilities', false],
    ['auth/token/accessors/', true],
    ['auth/token/accessors', true],
    ['auth/token/revoke-orphan', true],
    ['auth/token/create', false],
  ])('requiresSudo(%s) = %s', (path, expected) => {
    expect(requiresSudo(path, 'update')).toBe(expected);
  });

  test('sudo is needed in addition to the normal capability, in the deciding rule', () => {
    expect(acl({ 'sys/auth/*': ['create', 'update'] }).allows('sys/auth/up', 'update', true)).toBe(false);
    expect(acl({ 'sys/auth/*': ['sudo'] }).allows('sys/auth/up', 'update', true)).toBe(false);
    expect(acl({ 'sys/auth/*': ['update', 'sudo'] }).allows('sys/auth/up', 'update', true)).toBe(true);
    // sudo on a broader rule does not lend itself to the more specific one.
    expect(acl({ 'sys/*': ['sudo', 'update'], 'sys/auth/*': ['update'] }).allows('sys/auth/up', 'update', true)).toBe(false);
  });

  test('deny overrides sudo', () => {
    expect(acl({ 'sys/auth/*': ['update', 'sudo'] }, { 'sys/auth/*': ['deny'] }).allows('sys/auth/up', 'update', true)).toBe(false);
  });
});

describe('root and default policies', () => {
  test('root allows everything and reports ["root"]', () => {
    const a = new Acl([{ name: 'root', rules: [] }]);
    expect(a.root).toBe(true);
    expect(a.allows('sys/raw/anything', 'delete', true)).toBe(true);
    expect(a.capabilities('secret/data/x')).toEqual(['root']);
  });

  const def = new Acl([DEFAULT_POLICY]);
  test.each<[string, Capability, boolean]>([
    ['auth/token/lookup-self', 'read', true],
    ['auth/token/renew-self', 'update', true],
    ['auth/token/revoke-self', 'update', true],
    ['sys/capabilities-self', 'update', true],
    ['sys/leases/lookup', 'update', true],
    ['sys/wrapping/unwrap', 'update', true],
    ['cubbyhole/notes', 'create', true],
    ['cubbyhole/', 'list', true],
    ['cubbyhole/notes', 'patch', false],
    ['auth/token/lookup-self', 'update', false],
    ['auth/token/create', 'update', false],
    ['sys/capabilities', 'update', false],
    ['sys/policies/acl/default', 'read', false],
    ['secret/data/x', 'read', false],
  ])('default: %s %s → %s', (path, cap, allowed) => {
    expect(def.allows(path, cap)).toBe(allowed);
  });

  test('no policy at all denies', () => {
    expect(new Acl([]).allows('secret/foo', 'read')).toBe(false);
    expect(new Acl([]).capabilities('secret/foo')).toEqual(['deny']);
  });
});

describe('Acl.capabilities', () => {
  const a = acl({
    'secret/data/app/*': ['update', 'create', 'read', 'list'],
    'secret/data/app/locked': ['deny'],
    'secret/data/empty': [],
    'sys/auth/*': ['update', 'sudo'],
  });
  test.each([
    ['secret/data/app/x', ['create', 'list', 'read', 'update']],
    ['secret/data/app/locked', ['deny']],
    ['secret/data/empty', ['deny']],
    ['secret/data/other', ['deny']],
    ['sys/auth/up', ['sudo', 'update']],
  ])('%s → %j', (path, expected) => {
    expect(a.capabilities(path)).toEqual(expected);
  });

  test('templated paths are skipped (no identity to fill them)', () => {
    const t = acl({ 'secret/data/{{identity.entity.id}}/*': ['read'] });
    expect(t.allows('secret/data/{{identity.entity.id}}/x', 'read')).toBe(false);
  });
});

describe('parsePolicy', () => {
  const hcl = `
# Read-only on the app's secrets
path "secret/data/app/*" {
  capabilities = ["read", "list"]
}

path "secret/data/app/admin" {
  capabilities = ["deny"]
}

path "/sys/auth/*" {
  capabilities = ["create", "update", "sudo"]
  allowed_parameters = {
    "Type" = ["userpass"]
    "*"    = []
  }
  denied_parameters = { "local" = [] }
  required_parameters = ["type"]
  min_wrapping_ttl = "1m"
  max_wrapping_ttl = 3600
}
`;

  test('HCL', async () => {
    const p = await parsePolicy('Ops', hcl);
    expect(p.name).toBe('ops');
    expect(byPath(p.rules)).toEqual([
      { path: 'secret/data/app/*', capabilities: ['read', 'list'] },
      { path: 'secret/data/app/admin', capabilities: ['deny'] },
      {
        path: 'sys/auth/*',
        capabilities: ['create', 'update', 'sudo'],
        allowedParameters: { type: ['userpass'], '*': [] },
        deniedParameters: { local: [] },
        requiredParameters: ['type'],
        minWrappingTtl: 60,
        maxWrappingTtl: 3600,
      },
    ]);
  });

  test('JSON, in the object and the list forms', async () => {
    const obj = await parsePolicy('j', JSON.stringify({ path: { 'secret/*': { capabilities: ['read'] }, 'secret/x': { policy: 'deny' } } }));
    expect(obj.rules).toEqual([
      { path: 'secret/*', capabilities: ['read'] },
      { path: 'secret/x', capabilities: ['deny'] },
    ]);
    const list = await parsePolicy('j', JSON.stringify({ path: [{ 'secret/*': { capabilities: ['read'] } }, { 'secret/*': [{ capabilities: ['list'] }] }] }));
    expect(list.rules).toEqual([
      { path: 'secret/*', capabilities: ['read'] },
      { path: 'secret/*', capabilities: ['list'] },
    ]);
  });

  test('base64 of HCL and of JSON', async () => {
    const b64 = Buffer.from(hcl).toString('base64');
    expect(byPath((await parsePolicy('b', b64)).rules)).toEqual(byPath((await parsePolicy('b', hcl)).rules));
    const json = '{"path":{"secret/foo":{"capabilities":["read"]}}}';
    expect((await parsePolicy('b', Buffer.from(json).toString('base64'))).rules).toEqual([{ path: 'secret/foo', capabilities: ['read'] }]);
    expect(decodePolicyText(Buffer.from(json).toString('base64'))).toBe(json);
    // Text that is not base64 is left alone.
    expect(decodePolicyText(hcl)).toBe(hcl);
  });

  test.each([
    ['read', ['read', 'list']],
    ['write', ['create', 'read', 'update', 'delete', 'list']],
    ['sudo', ['create', 'read', 'update', 'delete', 'list', 'sudo']],
    ['deny', ['deny']],
  ])('legacy policy = "%s"', async (legacy, caps) => {
    expect((await parsePolicy('l', `path "secret/*" { policy = "${legacy}" }`)).rules[0].capabilities).toEqual(caps);
  });

  test('deny among other capabilities keeps only deny', async () => {
    expect((await parsePolicy('d', 'path "a" { capabilities = ["read", "deny", "sudo"] }')).rules[0].capabilities).toEqual(['deny']);
  });

  test('the same path twice: both blocks kept, merged by the ACL (deny wins)', async () => {
    const p = await parsePolicy('twice', 'path "a" { capabilities = ["read"] }\npath "a" { capabilities = ["deny"] }');
    expect(p.rules).toHaveLength(2);
    expect(new Acl([p]).allows('a', 'read')).toBe(false);
  });

  test('block syntax for allowed_parameters', async () => {
    const p = await parsePolicy('b', 'path "a" {\n capabilities = ["update"]\n allowed_parameters {\n  ttl = ["1h"]\n }\n}');
    expect(p.rules[0].allowedParameters).toEqual({ ttl: ['1h'] });
  });

  test('a policy with no paths is valid', async () => {
    expect((await parsePolicy('c', '# nothing yet\n')).rules).toEqual([]);
  });

  test.each([
    ['path "a" { capabilities = ["reed"] }', 'invalid capability "reed"'],
    ['path "secret/*/x" { capabilities = ["read"] }', "'*' is only allowed at the end"],
    ['path "secret/+*" { capabilities = ["read"] }', "'+*' is forbidden"],
    ['path "a" { capabilitys = ["read"] }', 'invalid key "capabilitys"'],
    ['path "a" { policy = "admin" }', 'invalid policy "admin"'],
    ['path "a" { capabilities = "read", "list" }', 'failed to parse policy'],
    ['path "a" { capabilities = [ }', 'failed to parse policy'],
    ['pth "a" { capabilities = ["read"] }', 'invalid key "pth"'],
    ['{"path": {"a": {"capabilities": ["read"]}}', 'invalid JSON'],
    ['{"path": "a"}', '"path" must be a block'],
    ['path "a" { capabilities = [1] }', 'capabilities must be a list of strings'],
    ['path "a" {\n capabilities = ["read"]\n min_wrapping_ttl = "1h"\n max_wrapping_ttl = "1m"\n}', 'max_wrapping_ttl cannot be less than min_wrapping_ttl'],
    ['path "a" {\n capabilities = ["read"]\n min_wrapping_ttl = "soon"\n}', 'error parsing min_wrapping_ttl'],
    ['path "a" {\n capabilities = ["read"]\n control_group = {}\n}', 'control_group is a Vault Enterprise feature'],
    ['', "'policy' parameter not supplied or empty"],
    ['  \n\t', "'policy' parameter not supplied or empty"],
  ])('rejects %j', async (text, message) => {
    expect(await parseError(text)).toContain(message);
  });

  test('the error names the path and the capability', async () => {
    expect(await parseError('path "secret/data/x" { capabilities = ["read", "writ"] }')).toBe('failed to parse policy: path "secret/data/x": invalid capability "writ"');
  });

  test('policyToHcl round-trips the default policy', async () => {
    const p = await parsePolicy('default', policyToHcl(DEFAULT_POLICY.rules));
    expect(byPath(p.rules)).toEqual(byPath(DEFAULT_POLICY.rules));
  });
});

import { RouteTable, type RouteDef } from '../../src/core/framework';

const noop = async () => ({});
const table = new RouteTable([
  { pattern: 'mounts/:path+/tune', summary: 't', operations: { read: noop } },
  { pattern: 'mounts/:path+', summary: 'm', operations: { read: noop } },
  { pattern: 'users/:name', summary: 'u', operations: { read: noop } },
  { pattern: 'metadata/:path*', summary: 'md', operations: { list: noop } },
  { pattern: 'config', summary: 'c', operations: { read: noop } },
] as RouteDef[]);

test.each([
  ['mounts/a/b/tune', 't', { path: 'a/b' }],
  ['mounts/secret/tune', 't', { path: 'secret' }],
  ['mounts/a/b', 'm', { path: 'a/b' }],
  ['mounts/tune', 'm', { path: 'tune' }],
  ['users/bob', 'u', { name: 'bob' }],
  ['metadata/', 'md', { path: '' }],
  ['metadata/app/', 'md', { path: 'app/' }],
  ['metadata/app/x', 'md', { path: 'app/x' }],
  ['config', 'c', {}],
])('%s matches %s with %j', (path, summary, params) => {
  const m = table.match(path);
  expect(m?.def.summary).toBe(summary);
  expect(m?.params).toEqual(params);
});

test.each(['users', 'users/a/b', 'mounts', 'nope', 'config/x'])('%s matches nothing', (path) => {
  expect(table.match(path)).toBeNull();
});

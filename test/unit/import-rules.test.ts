/**
 * The import rules of STYLE.md, checked mechanically: core knows nothing of HTTP, storage,
 * queues or replication; only storage imports kysely; nothing imports a circle.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';

const SRC = join(__dirname, '..', '..', 'src');

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : p.endsWith('.ts') ? [p] : [];
  });
}

function imports(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  return [...text.matchAll(/^import\s[^;]*?from\s+'([^']+)'/gms), ...text.matchAll(/import\('([^']+)'\)/g)].map((m) => m[1]);
}

function resolveLocal(from: string, spec: string): string | null {
  if (!spec.startsWith('.')) return null;
  const base = resolve(dirname(from), spec);
  for (const c of [base + '.ts', join(base, 'index.ts')]) {
    try {
      if (statSync(c).isFile()) return c;
    } catch {
      /* next */
    }
  }
  return null;
}

const all = files(SRC);
const area = (f: string) => relative(SRC, f).split('/')[0].replace(/\.ts$/, '');

test('core imports nothing from storage, http, queue, replication, merkle, cli or main', () => {
  const bad: string[] = [];
  for (const f of all.filter((f) => area(f) === 'core')) {
    for (const spec of imports(f)) {
      const target = resolveLocal(f, spec);
      if (target && !['core', 'version'].includes(area(target))) bad.push(`${relative(SRC, f)} → ${relative(SRC, target)}`);
    }
  }
  expect(bad).toEqual([]);
});

test('only storage/ imports kysely or pg', () => {
  const bad = all
    .filter((f) => area(f) !== 'storage')
    .flatMap((f) => imports(f).filter((s) => s === 'kysely' || s === 'pg').map((s) => `${relative(SRC, f)} imports ${s}`));
  // replication/ and merkle/ talk to storage through its functions; the one allowed exception
  // is the type-only Kysely handle they pass through.
  expect(bad.filter((b) => !/^(replication|merkle)\/.*imports kysely$/.test(b))).toEqual([]);
});

test('no import cycles between modules (value imports)', () => {
  const graph = new Map<string, string[]>();
  for (const f of all) {
    const text = readFileSync(f, 'utf8');
    const specs = [...text.matchAll(/^import\s(?!type\s)([^;]*?)from\s+'([^']+)'/gms)]
      // imports whose every name is `type X` are erased at compile time
      .filter((m) => !/^\{\s*(type\s+\w+\s*,?\s*)+\}\s*$/.test(m[1].trim()))
      .map((m) => m[2]);
    graph.set(f, specs.map((s) => resolveLocal(f, s)).filter((x): x is string => !!x));
  }
  const cycles: string[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const stack: string[] = [];
  const visit = (f: string) => {
    if (state.get(f) === 'done') return;
    if (state.get(f) === 'visiting') {
      cycles.push(stack.slice(stack.indexOf(f)).concat(f).map((x) => relative(SRC, x)).join(' → '));
      return;
    }
    state.set(f, 'visiting');
    stack.push(f);
    for (const g of graph.get(f) ?? []) visit(g);
    stack.pop();
    state.set(f, 'done');
  };
  for (const f of all) visit(f);
  expect(cycles).toEqual([]);
});

/**
 * `npm run bench [-- scenario ...]`: runs scenarios, prints each figure beside its reference
 * measured in the same run (as a ratio), and writes bench/results/<time>.json.
 * Scenarios: write, read, replication, merkle (BENCH_MERKLE_N entries, default 10^6). BENCH_SECONDS sets the duration of each measurement (default 8).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { cpus } from 'node:os';
import { merkleScenario } from './scenarios/merkle';
import { readScenario } from './scenarios/read';
import { replicationScenario } from './scenarios/replication';
import { writeScenario } from './scenarios/write';

export interface Figure {
  name: string;
  value: number;
  unit: string;
  reference?: { name: string; value: number };
  /** The ratio value ÷ reference the issue asks for. */
  target?: number;
  extra?: Record<string, unknown>;
}

const SCENARIOS: Record<string, (seconds: number) => Promise<Figure[]>> = {
  write: writeScenario,
  read: readScenario,
  replication: replicationScenario,
  merkle: merkleScenario,
};

function fmt(n: number): string {
  return n >= 100 ? n.toFixed(0) : n.toFixed(2);
}

async function main(): Promise<void> {
  const asked = process.argv.slice(2).filter((a) => !a.startsWith('-'));
  const names = asked.length ? asked : Object.keys(SCENARIOS);
  const unknown = names.filter((n) => !SCENARIOS[n]);
  if (unknown.length) throw new Error(`unknown scenario(s): ${unknown.join(', ')}; known: ${Object.keys(SCENARIOS).join(', ')}`);
  const seconds = Number(process.env.BENCH_SECONDS ?? 8);
  const results: Record<string, Figure[]> = {};
  for (const name of names) {
    process.stdout.write(`== ${name} (${seconds}s per measurement)\n`);
    const figures = await SCENARIOS[name](seconds);
    results[name] = figures;
    for (const f of figures) {
      const ratio = f.reference ? f.value / f.reference.value : undefined;
      process.stdout.write(
        `  ${f.name}: ${fmt(f.value)} ${f.unit}` +
          (f.reference ? ` | reference ${f.reference.name}: ${fmt(f.reference.value)} | ratio ${ratio!.toFixed(3)}${f.target ? ` (target ≥ ${f.target}: ${ratio! >= f.target ? 'met' : 'NOT met'})` : ''}` : '') +
          (f.extra ? ` | ${Object.entries(f.extra).map(([k, v]) => `${k}=${typeof v === 'number' ? fmt(v) : v}`).join(' ')}` : '') +
          '\n',
      );
    }
  }
  const dir = join(process.cwd(), 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  writeFileSync(file, JSON.stringify({ node: process.version, cpus: cpus().length, cpu: cpus()[0]?.model, seconds, results }, null, 2));
  process.stdout.write(`wrote ${file}\n`);
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bench failed: ${err?.stack ?? err}\n`);
    process.exit(1);
  },
);

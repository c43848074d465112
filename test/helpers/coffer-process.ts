/**
 * Real `coffer server` processes for cluster and fault tests. Every process started here is
 * registered and killed by `stopAllCoffers()` (call it in afterAll) and at exit.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { vault } from './http';
import { waitFor } from './wait';

// test/helpers under Jest, dist/test/helpers when compiled (bench): find the repo's bin/.
const BIN = [join(__dirname, '..', '..', 'bin', 'coffer.js'), join(__dirname, '..', '..', '..', 'bin', 'coffer.js')].find((p) => existsSync(p))!;

export interface CofferProcess {
  proc: ChildProcess;
  addr: string;
  pid: number;
  /** stdout + stderr so far. */
  output(): string;
  kill(signal?: NodeJS.Signals): Promise<number | null>;
  exited: Promise<number | null>;
}

const running = new Set<CofferProcess>();

export interface StartOptions {
  dbUrl: string;
  /** Extra HCL appended to the generated config. */
  extraHcl?: string;
  logLevel?: string;
  env?: Record<string, string>;
  /** Static seal key (hex), for unattended unseal. */
  staticSealKeyHex?: string;
  clusterName?: string;
  /** Listen on this port (a restarted process keeps its address); default: any free port. */
  port?: number;
  /** Replaces the default plain-HTTP listener block (e.g. a TLS listener). */
  listenerHcl?: string;
  /** Node flags for the process (e.g. `--cpu-prof`, which NODE_OPTIONS refuses); default none. */
  nodeArgs?: string[];
}

const configDirs = new Set<string>();

export function writeConfig(o: StartOptions): string {
  const dir = mkdtempSync(join(tmpdir(), 'coffer-test-'));
  configDirs.add(dir);
  const file = join(dir, 'server.hcl');
  const seal = o.staticSealKeyHex ? `seal "static" {\n  current_key_id = "test-key-1"\n  current_key = "${o.staticSealKeyHex}"\n}\n` : '';
  writeFileSync(
    file,
    `storage "postgresql" {\n  connection_url = "${o.dbUrl}"\n}\n` +
      (o.listenerHcl ?? `listener "tcp" {\n  address = "127.0.0.1:${o.port ?? 0}"\n  tls_disable = true\n}\n`) +
      (o.clusterName ? `cluster_name = "${o.clusterName}"\n` : '') +
      `log_level = "${o.logLevel ?? 'info'}"\n` +
      seal +
      (o.extraHcl ?? ''),
  );
  return file;
}

export async function startCoffer(o: StartOptions): Promise<CofferProcess> {
  return startProcess('server', o);
}

/** A `coffer worker` process (queue workers only; needs a queue "redis" block in extraHcl). */
export async function startCofferWorker(o: StartOptions): Promise<CofferProcess> {
  return startProcess('worker', o);
}

async function startProcess(command: 'server' | 'worker', o: StartOptions): Promise<CofferProcess> {
  const config = writeConfig(o);
  const proc = spawn(process.execPath, [...(o.nodeArgs ?? []), BIN, command, `-config=${config}`], {
    env: { ...process.env, ...(o.env ?? {}) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout!.on('data', (d) => (out += d.toString()));
  proc.stderr!.on('data', (d) => (out += d.toString()));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code, sig) => resolve(code ?? (sig ? -1 : null))));
  const cp: CofferProcess = {
    proc,
    addr: '',
    pid: proc.pid!,
    output: () => out,
    exited,
    async kill(signal = 'SIGKILL') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const code = await exited;
      running.delete(cp);
      return code;
    },
  };
  running.add(cp);
  const started = command === 'server' ? /started on (https?:\/\/[\d.:]+)/ : /==> Coffer worker (started)/;
  const addr = await Promise.race([
    waitFor(`coffer ${command} to start`, () => started.exec(out)?.[1], { timeoutMs: 30_000, intervalMs: 25 }),
    exited.then((code) => {
      throw new Error(`coffer ${command} exited with ${code} before starting:\n${out}`);
    }),
  ]);
  cp.addr = command === 'server' ? addr : '';
  return cp;
}

export async function stopAllCoffers(): Promise<void> {
  await Promise.all([...running].map((p) => p.kill('SIGKILL')));
  for (const d of configDirs) rmSync(d, { recursive: true, force: true });
  configDirs.clear();
}

process.on('exit', () => {
  for (const p of running) p.proc.kill('SIGKILL');
});

/** Initialises the cluster through the API (1 share) and unseals `procs` with it. */
export async function initAndUnseal(procs: CofferProcess[], shares = 1, threshold = 1) {
  const init = await vault(procs[0].addr, 'PUT', 'sys/init', { body: { secret_shares: shares, secret_threshold: threshold } });
  if (init.status !== 200) throw new Error(`init failed: ${init.status} ${JSON.stringify(init.body)}`);
  const keys: string[] = init.body.keys;
  for (const p of procs) await unseal(p, keys.slice(0, threshold));
  return { rootToken: init.body.root_token as string, keys };
}

export async function unseal(p: CofferProcess, keys: string[]): Promise<void> {
  for (const key of keys) {
    const r = await vault(p.addr, 'PUT', 'sys/unseal', { body: { key } });
    if (r.status !== 200) throw new Error(`unseal failed: ${r.status} ${JSON.stringify(r.body)}`);
  }
}

export async function mountKv2(addr: string, token: string, path = 'secret'): Promise<void> {
  const r = await vault(addr, 'POST', `sys/mounts/${path}`, { token, body: { type: 'kv', options: { version: '2' } } });
  if (r.status !== 204) throw new Error(`mount failed: ${r.status} ${JSON.stringify(r.body)}`);
}

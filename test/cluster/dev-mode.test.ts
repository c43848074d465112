/**
 * `coffer server -dev`: no Postgres to set up (embedded PGlite), initialised, unsealed, KV v2
 * at secret/, and Vault's banner with the address and root token a user copies from it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import { join } from 'node:path';
import { vault } from '../helpers/http';
import { waitFor } from '../helpers/wait';

const BIN = join(__dirname, '..', '..', 'bin', 'coffer.js');

interface DevProcess {
  proc: ChildProcess;
  stdout(): string;
  output(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const started: DevProcess[] = [];
afterAll(async () => {
  for (const p of started) {
    if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill('SIGKILL');
  }
  await Promise.all(started.map((p) => p.exited));
});

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

function startDev(args: string[]): DevProcess {
  const proc = spawn(process.execPath, [BIN, 'server', '-dev', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let all = '';
  proc.stdout!.on('data', (d) => {
    stdout += d.toString();
    all += d.toString();
  });
  proc.stderr!.on('data', (d) => (all += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const p: DevProcess = { proc, stdout: () => stdout, output: () => all, exited };
  started.push(p);
  return p;
}

interface Banner {
  rootToken: string;
  vaultAddr: string;
  apiAddress: string;
  unsealKey: string;
}

async function waitForBanner(p: DevProcess): Promise<Banner> {
  return Promise.race([
    waitFor(
      'the dev-mode banner',
      () => {
        const out = p.stdout();
        if (!/Development mode should NOT be used in production installations!/.test(out)) return null;
        const rootToken = /^Root Token: (\S+)$/m.exec(out)?.[1];
        const vaultAddr = /^\s*\$ export VAULT_ADDR='([^']+)'$/m.exec(out)?.[1];
        const apiAddress = /^\s*Api Address: (\S+)$/m.exec(out)?.[1];
        const unsealKey = /^Unseal Key: (\S+)$/m.exec(out)?.[1];
        return rootToken && vaultAddr && apiAddress && unsealKey ? { rootToken, vaultAddr, apiAddress, unsealKey } : null;
      },
      { timeoutMs: 45_000, intervalMs: 50 },
    ),
    p.exited.then(({ code, signal }) => {
      throw new Error(`coffer -dev exited (${code ?? signal}) before printing its banner:\n${p.output()}`);
    }),
  ]);
}

/** What a user does first with a dev server: write and read secret/data/hello. */
async function checkTokenWorks(addr: string, token: string): Promise<void> {
  const health = await vault(addr, 'GET', 'sys/health');
  expect(health.status).toBe(200);
  expect(health.body).toMatchObject({ initialized: true, sealed: false, standby: false });

  const mounts = await vault(addr, 'GET', 'sys/mounts', { token });
  expect(mounts.status).toBe(200);
  expect(mounts.body.data['secret/']).toMatchObject({ type: 'kv', options: { version: '2' } });

  const value = { greeting: `hello-${randomBytes(4).toString('hex')}` };
  const w = await vault(addr, 'PUT', 'secret/data/hello', { token, body: { data: value } });
  expect(w.status).toBe(200);
  expect(w.body.data.version).toBe(1);
  const r = await vault(addr, 'GET', 'secret/data/hello', { token });
  expect(r.status).toBe(200);
  expect(r.body.data.data).toEqual(value);
  expect(r.body.data.metadata.version).toBe(1);

  // The token is what makes it work.
  expect((await vault(addr, 'GET', 'secret/data/hello')).status).toBe(403);
  expect((await vault(addr, 'GET', 'secret/data/hello', { token: `${token}x` })).status).toBe(403);
}

async function stopWithSigterm(p: DevProcess): Promise<void> {
  p.proc.kill('SIGTERM');
  const { code, signal } = await p.exited;
  expect({ code, signal }).toEqual({ code: 0, signal: null });
  expect(p.output()).toMatch(/shutdown triggered \(SIGTERM\)/);
}

describe('coffer server -dev', () => {
  // Both runs start at once: PGlite takes a few seconds to boot, and they do not share anything.
  let withId: { p: DevProcess; port: number; tokenId: string };
  let withoutId: { p: DevProcess; port: number };

  beforeAll(async () => {
    const [port1, port2] = [await freePort(), await freePort()];
    const tokenId = `dev-root-${randomBytes(8).toString('hex')}`;
    withId = { p: startDev([`-dev-listen-address=127.0.0.1:${port1}`, `-dev-root-token-id=${tokenId}`]), port: port1, tokenId };
    withoutId = { p: startDev([`-dev-listen-address=127.0.0.1:${port2}`]), port: port2 };
  });

  test('-dev-root-token-id: the banner shows that token and the address; the token writes and reads secret/; SIGTERM exits 0', async () => {
    const { p, port, tokenId } = withId;
    const banner = await waitForBanner(p);
    expect(banner.rootToken).toBe(tokenId);
    expect(banner.vaultAddr).toBe(`http://127.0.0.1:${port}`);
    expect(banner.apiAddress).toBe(banner.vaultAddr);
    expect(Buffer.from(banner.unsealKey, 'base64')).toHaveLength(32);
    expect(p.stdout()).toMatch(/Storage: embedded/);
    await checkTokenWorks(banner.vaultAddr, banner.rootToken);
    await stopWithSigterm(p);
  });

  test('without -dev-root-token-id: a generated hvs. token that works; SIGTERM exits 0', async () => {
    const { p, port } = withoutId;
    const banner = await waitForBanner(p);
    expect(banner.rootToken).toMatch(/^hvs\.[A-Za-z0-9]{24}$/);
    expect(banner.rootToken).not.toBe(withId.tokenId);
    expect(banner.vaultAddr).toBe(`http://127.0.0.1:${port}`);
    await checkTokenWorks(banner.vaultAddr, banner.rootToken);
    await stopWithSigterm(p);
  });
});

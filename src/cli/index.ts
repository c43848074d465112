/**
 * `coffer` commands. Flags follow Vault's single-dash style (`-config=FILE`, `-dev`); the
 * double-dash spelling works too.
 */
import { Command, Option } from 'commander';
import { ConfigError, loadConfig, REPLICATION_DEFAULTS, type CofferConfig } from './config';
import { createLogger, startServer, startWorker, type RunningServer } from '../main';
import { openPostgres } from '../storage/db';
import { migrateToLatest } from '../storage/migrate';
import { VERSION } from '../version';

/** `-config=x` → `--config=x`: Vault's flags are single-dash, commander's long options double. */
export function normaliseFlags(argv: string[]): string[] {
  return argv.map((a) => (/^-[a-z][a-z-]+(=.*)?$/.test(a) ? '-' + a : a));
}

function devConfig(o: { devListenAddress: string; devStorage?: string; devRedis?: string; logLevel?: string }): CofferConfig {
  return {
    storage: o.devStorage ? { type: 'postgresql', connectionUrl: o.devStorage, maxConnections: 10 } : { type: 'embedded' },
    listeners: [{ address: o.devListenAddress, tlsDisable: true, maxRequestSizeBytes: 32 * 1024 * 1024, requestTimeoutMs: 90_000 }],
    clusterName: 'coffer-dev',
    queue: o.devRedis ? { type: 'redis', url: o.devRedis, prefix: 'coffer-dev' } : undefined,
    ui: false,
    expirySweepIntervalMs: 30_000,
    logLevel: (o.logLevel as CofferConfig['logLevel']) ?? 'info',
    logFormat: 'standard',
    replication: REPLICATION_DEFAULTS,
    telemetry: { unauthenticatedMetricsAccess: false, prometheusRetentionTimeSeconds: 0 },
    merkle: { flushIntervalMs: 200, flushFraction: 0.02, checkpointIntervalMs: 1000, index: true },
  };
}

function banner(s: RunningServer, storage: string): string {
  return [
    '==> Coffer server configuration:',
    '',
    `             Api Address: ${s.apiAddr}`,
    `                 Storage: ${storage}`,
    `                 Version: Coffer v${VERSION}`,
    '',
    '==> Coffer server started! Log data will stream in below:',
    '',
    'WARNING! dev mode is enabled! In this mode, Coffer runs entirely in memory',
    'and starts unsealed with a single unseal key. The root token is already',
    'authenticated to the CLI, so you can immediately begin using Coffer.',
    '',
    'You may need to set the following environment variables:',
    '',
    `    $ export VAULT_ADDR='${s.apiAddr}'`,
    '',
    'The unseal key and root token are displayed below in case you want to',
    'seal/unseal the Vault or re-authenticate.',
    '',
    `Unseal Key: ${s.unsealKey}`,
    `Root Token: ${s.rootToken}`,
    '',
    'Development mode should NOT be used in production installations!',
    '',
  ].join('\n');
}

function onSignals(stop: () => Promise<void>): void {
  let stopping = false;
  const handler = (sig: string) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`==> Coffer shutdown triggered (${sig})\n`);
    stop().then(
      () => process.exit(0),
      () => process.exit(1),
    );
  };
  process.on('SIGTERM', () => handler('SIGTERM'));
  process.on('SIGINT', () => handler('SIGINT'));
}

function fail(err: unknown): never {
  if (err instanceof ConfigError) process.stderr.write(err.message + '\n');
  else process.stderr.write(`Error: ${(err as Error)?.message ?? String(err)}\n`);
  process.exit(1);
}

export function buildProgram(): Command {
  const program = new Command('coffer').description('A secrets service that speaks the Vault HTTP API').version(VERSION, '-v, --version');

  program
    .command('server')
    .description('Start a Coffer server')
    .addOption(new Option('--config <path...>', 'config file or directory (HCL or JSON); repeatable'))
    .option('--dev', 'development mode: in-memory, initialised, unsealed, KV v2 at secret/')
    .option('--dev-root-token-id <id>', 'root token id in dev mode')
    .option('--dev-listen-address <addr>', 'listen address in dev mode', '127.0.0.1:8200')
    .option('--dev-storage <url>', 'dev mode on this Postgres instead of the embedded one')
    .option('--dev-redis <url>', 'dev mode with this Redis for the queue')
    .option('--log-level <level>', 'trace, debug, info, warn, error')
    .action(async (o) => {
      try {
        if (o.dev) {
          const cfg = devConfig(o);
          const s = await startServer(cfg, { rootTokenId: o.devRootTokenId });
          process.stdout.write(banner(s, o.devStorage ? 'postgresql' : 'embedded (PGlite, in memory)'));
          onSignals(() => s.stop());
          return;
        }
        if (!o.config?.length) throw new ConfigError(['no configuration given: use -config=FILE, or -dev']);
        const cfg = await loadConfig(o.config);
        const s = await startServer(o.logLevel ? { ...cfg, logLevel: o.logLevel } : cfg);
        process.stdout.write(`==> Coffer server started on ${s.apiAddr} (version ${VERSION})\n`);
        if (s.clusterAddr) process.stdout.write(`==> Cluster listener (replication, mutual TLS) on ${s.clusterAddr}\n`);
        onSignals(() => s.stop());
      } catch (err) {
        fail(err);
      }
    });

  program
    .command('migrate')
    .description('Apply database migrations and exit')
    .requiredOption('--config <path...>', 'config file or directory')
    .action(async (o) => {
      try {
        const cfg = await loadConfig(o.config);
        if (cfg.storage.type !== 'postgresql') throw new ConfigError(['migrate needs a storage "postgresql" block']);
        const log = createLogger(cfg);
        const db = openPostgres(cfg.storage.connectionUrl, 2);
        const applied = await migrateToLatest(db.db);
        await db.close();
        log.info({ applied }, applied.length ? 'migrations applied' : 'schema is up to date');
        process.stdout.write(applied.length ? `Applied: ${applied.join(', ')}\n` : 'Schema is up to date.\n');
      } catch (err) {
        fail(err);
      }
    });

  program
    .command('worker')
    .description('Run queue workers (expiry; replication shipping) without an API listener')
    .requiredOption('--config <path...>', 'config file or directory')
    .action(async (o) => {
      try {
        const w = await startWorker(await loadConfig(o.config));
        process.stdout.write('==> Coffer worker started\n');
        onSignals(() => w.stop());
      } catch (err) {
        fail(err);
      }
    });

  program
    .command('version')
    .description('Print the version')
    .action(() => {
      process.stdout.write(`Coffer v${VERSION}\n`);
    });
  return program;
}

export function main(argv: string[]): void {
  buildProgram()
    .parseAsync(normaliseFlags(argv), { from: 'user' })
    .catch(fail);
}

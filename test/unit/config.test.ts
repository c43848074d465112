import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, IGNORED_VAULT_KEYS, loadConfig, parseConfig } from '../../src/cli/config';

const KEY_HEX = 'ab'.repeat(32);
const KEY = Buffer.from(KEY_HEX, 'hex');
const OLD_KEY = Buffer.alloc(32, 7);
const MiB = 1024 * 1024;

/** The smallest config that loads: one storage block, one listener. */
const MINIMAL = `
storage "postgresql" { connection_url = "postgres://coffer@db/coffer" }
listener "tcp" {
  address     = "0.0.0.0:8200"
  tls_disable = true
}
`;

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'coffer-config-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function writeTemp(name: string, content: string): string {
  const file = join(dir, name);
  writeFileSync(file, content);
  return file;
}

/** The problems a config produces; fails the test if it loads. */
async function problemsOf(text: string, filename = 'coffer.hcl', env: NodeJS.ProcessEnv = {}): Promise<string[]> {
  const err = await parseConfig(text, filename, env).then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(ConfigError);
  return (err as ConfigError).problems;
}

describe('parseConfig: complete files', () => {
  const fullHcl = `
    # A production-like config, with keys Vault users already write.
    ui            = true
    disable_mlock = true
    api_addr      = "https://vault.example.com:8200"
    cluster_addr  = "https://10.0.0.5:8201"
    cluster_name  = "prod"
    log_level     = "Debug"
    log_format    = "json"

    storage "postgresql" {
      connection_url = "postgresql://coffer:secret@db.internal:5432/coffer?sslmode=require"
      max_parallel   = "25"
    }

    listener "tcp" {
      address              = "0.0.0.0:8200"
      tls_cert_file        = "/etc/coffer/tls.crt"
      tls_key_file         = "/etc/coffer/tls.key"
      max_request_size     = "16MiB"
      max_request_duration = "2m"
    }

    listener "tcp" {
      address     = "127.0.0.1:8300"
      tls_disable = "true"
    }

    seal "static" {
      current_key_id  = "k2"
      current_key     = "${KEY_HEX}"
      previous_key_id = "k1"
      previous_key    = "${OLD_KEY.toString('base64')}"
    }

    queue "redis" {
      url    = "redis://cache.internal:6379/2"
      prefix = "coffer-prod"
    }

    replication {
      best_effort_wal_wait_duration = "5s"
      logshipper_buffer_length      = 1000
      logshipper_buffer_size        = "128MiB"
      ship_linger                   = "40ms"
      ship_linger_min_entries       = 64
    }

    telemetry {
      unauthenticated_metrics_access = true
      prometheus_retention_time      = "12h"
    }

    merkle {
      flush_interval = "500ms"
      flush_fraction = 0.1
    }
  `;

  const expected = {
    storage: {
      type: 'postgresql',
      connectionUrl: 'postgresql://coffer:secret@db.internal:5432/coffer?sslmode=require',
      maxConnections: 25,
    },
    listeners: [
      {
        address: '0.0.0.0:8200',
        tlsDisable: false,
        tlsCertFile: '/etc/coffer/tls.crt',
        tlsKeyFile: '/etc/coffer/tls.key',
        maxRequestSizeBytes: 16 * MiB,
        requestTimeoutMs: 120_000,
      },
      { address: '127.0.0.1:8300', tlsDisable: true, maxRequestSizeBytes: 32 * MiB, requestTimeoutMs: 90_000 },
    ],
    apiAddr: 'https://vault.example.com:8200',
    clusterAddr: 'https://10.0.0.5:8201',
    clusterName: 'prod',
    seal: { type: 'static', currentKeyId: 'k2', currentKey: KEY, previousKeyId: 'k1', previousKey: OLD_KEY },
    queue: { type: 'redis', url: 'redis://cache.internal:6379/2', prefix: 'coffer-prod' },
    ui: true,
    expirySweepIntervalMs: 30_000,
    logLevel: 'debug',
    logFormat: 'json',
    replication: { bestEffortWalWaitDurationMs: 5000, logshipperBufferLength: 1000, logshipperBufferSizeBytes: 128 * MiB, shipLingerMs: 40, shipLingerMinEntries: 64 },
    telemetry: { unauthenticatedMetricsAccess: true, prometheusRetentionTimeSeconds: 43_200 },
    merkle: { flushIntervalMs: 500, flushFraction: 0.1, checkpointIntervalMs: 1000, index: true },
  };

  it('reads every key of an HCL file', async () => {
    expect(await parseConfig(fullHcl, 'coffer.hcl', {})).toEqual(expected);
  });

  it('reads the same config from Vault-style JSON', async () => {
    const json = {
      ui: true,
      disable_mlock: true,
      api_addr: 'https://vault.example.com:8200',
      cluster_addr: 'https://10.0.0.5:8201',
      cluster_name: 'prod',
      log_level: 'debug',
      log_format: 'json',
      storage: { postgresql: { connection_url: expected.storage.connectionUrl, max_parallel: 25 } },
      // Vault's JSON allows a list of { type: body } as well as { type: body }.
      listener: [
        {
          tcp: {
            address: '0.0.0.0:8200',
            tls_cert_file: '/etc/coffer/tls.crt',
            tls_key_file: '/etc/coffer/tls.key',
            max_request_size: 16 * MiB,
            max_request_duration: 120,
          },
        },
        { tcp: { address: '127.0.0.1:8300', tls_disable: 1 } },
      ],
      seal: {
        static: { current_key_id: 'k2', current_key: KEY_HEX, previous_key_id: 'k1', previous_key: OLD_KEY.toString('base64') },
      },
      queue: { redis: [{ url: 'redis://cache.internal:6379/2', prefix: 'coffer-prod' }] },
      replication: { best_effort_wal_wait_duration: '5s', logshipper_buffer_length: '1000', logshipper_buffer_size: '128MiB', ship_linger: '40ms', ship_linger_min_entries: '64' },
      telemetry: [{ unauthenticated_metrics_access: 'true', prometheus_retention_time: 43_200 }],
      merkle: { flush_interval: '500ms', flush_fraction: '0.1' },
    };
    expect(await parseConfig(JSON.stringify(json, null, 2), 'coffer.json', {})).toEqual(expected);
  });

  it('recognises JSON by its leading brace whatever the file is called', async () => {
    const json = `  {"storage": {"embedded": {}}, "listener": {"tcp": {"address": "127.0.0.1:8200", "tls_disable": true}}}`;
    const config = await parseConfig(json, 'coffer.conf', {});
    expect(config.storage).toEqual({ type: 'embedded' });
    expect(config.listeners).toHaveLength(1);
  });

  it('accepts and ignores the Vault keys Coffer has no use for', async () => {
    const ignored = IGNORED_VAULT_KEYS.map((key) => `${key} = "x"`).join('\n');
    expect(IGNORED_VAULT_KEYS).toEqual(
      expect.arrayContaining(['disable_mlock', 'default_lease_ttl', 'max_lease_ttl', 'pid_file', 'raw_storage_endpoint']),
    );
    const config = await parseConfig(`${MINIMAL}\n${ignored}`, 'coffer.hcl', {});
    expect(Object.keys(config)).not.toContain('disable_mlock');
  });

  it('accepts the embedded storage for a single node', async () => {
    const config = await parseConfig('storage "embedded" {}\nlistener "tcp" { tls_disable = true }', 'coffer.hcl', {});
    expect(config.storage).toEqual({ type: 'embedded' });
  });
});

describe('parseConfig: expiry_sweep_interval', () => {
  it('reads a duration and refuses zero', async () => {
    expect((await parseConfig(MINIMAL + '\nexpiry_sweep_interval = "5s"\n', 'coffer.hcl', {})).expirySweepIntervalMs).toBe(5000);
    await expect(parseConfig(MINIMAL + '\nexpiry_sweep_interval = "0s"\n', 'coffer.hcl', {})).rejects.toThrow(/expiry_sweep_interval/);
  });
});

describe('parseConfig: defaults', () => {
  it('fills every default around the minimal config', async () => {
    const config = await parseConfig(MINIMAL, 'coffer.hcl', {});
    expect(config).toEqual({
      storage: { type: 'postgresql', connectionUrl: 'postgres://coffer@db/coffer', maxConnections: 10 },
      listeners: [{ address: '0.0.0.0:8200', tlsDisable: true, maxRequestSizeBytes: 32 * MiB, requestTimeoutMs: 90_000 }],
      ui: false,
      expirySweepIntervalMs: 30_000,
      logLevel: 'info',
      logFormat: 'standard',
      replication: { bestEffortWalWaitDurationMs: 2000, logshipperBufferLength: 16_384, logshipperBufferSizeBytes: 64 * MiB, shipLingerMs: 15, shipLingerMinEntries: 16 },
      telemetry: { unauthenticatedMetricsAccess: false, prometheusRetentionTimeSeconds: 86_400 },
      merkle: { flushIntervalMs: 200, flushFraction: 0.02, checkpointIntervalMs: 1000, index: true },
    });
    for (const absent of ['apiAddr', 'clusterAddr', 'clusterName', 'seal', 'queue']) expect(config).not.toHaveProperty(absent);
  });

  it('defaults a listener address to 127.0.0.1:8200 and zero limits to the defaults, as Vault does', async () => {
    const config = await parseConfig(
      'storage "embedded" {}\nlistener "tcp" {\n tls_disable = 1\n max_request_size = 0\n max_request_duration = 0\n}',
      'coffer.hcl',
      {},
    );
    expect(config.listeners[0]).toEqual({
      address: '127.0.0.1:8200',
      tlsDisable: true,
      maxRequestSizeBytes: 32 * MiB,
      requestTimeoutMs: 90_000,
    });
  });

  it('defaults the redis prefix to "coffer"', async () => {
    const config = await parseConfig(`${MINIMAL}\nqueue "redis" { url = "redis://localhost:6379" }`, 'coffer.hcl', {});
    expect(config.queue).toEqual({ type: 'redis', url: 'redis://localhost:6379', prefix: 'coffer' });
  });

  it('keeps defaults for the keys a partial block leaves out', async () => {
    const config = await parseConfig(`${MINIMAL}\nmerkle { flush_fraction = 0.5 }\nreplication {}`, 'coffer.hcl', {});
    expect(config.merkle).toEqual({ flushIntervalMs: 200, flushFraction: 0.5, checkpointIntervalMs: 1000, index: true });
    expect(config.replication.logshipperBufferLength).toBe(16_384);
  });
});

describe('parseConfig: problems name the key', () => {
  // hcl2json sorts each object's keys, so problems come in alphabetical order, not line order.
  it('reports unknown keys with a suggestion', async () => {
    const problems = await problemsOf(`
      storage "postgresql" { connection_url = "postgres://db/coffer" }
      listener "tcp" {
        adress      = "0.0.0.0:8200"
        tls_disable = true
      }
      log_levle = "info"
      frobnicate = 1
    `);
    expect(problems).toEqual([
      'frobnicate: unknown key',
      'log_levle: unknown key (did you mean "log_level"?)',
      'listener.tcp[0].adress: unknown key (did you mean "address"?)',
    ]);
  });

  it('suggests snake_case for camelCase keys', async () => {
    const problems = await problemsOf(`storage "postgresql" { connectionUrl = "postgres://db/c" }\nlistener "tcp" { tls_disable = true }`);
    expect(problems).toContain('storage.postgresql.connectionUrl: unknown key (did you mean "connection_url"?)');
  });

  it('reports unknown keys inside unlabelled blocks', async () => {
    const problems = await problemsOf(`${MINIMAL}\ntelemetry { disable_hostname = true }\nmerkle { flush = "1s" }`);
    expect(problems).toEqual(['telemetry.disable_hostname: unknown key', 'merkle.flush: unknown key']);
  });

  it('bounds ship_linger (the shipper holds its lock while it lingers)', async () => {
    const problems = await problemsOf(`${MINIMAL}\nreplication {\n  ship_linger = "11s"\n  ship_linger_min_entries = 0\n}`);
    expect(problems).toEqual(['replication.ship_linger: must be at most 10s', 'replication.ship_linger_min_entries: must be at least 1']);
    expect((await parseConfig(`${MINIMAL}\nreplication { ship_linger = "0s" }`, 'coffer.hcl', {})).replication.shipLingerMs).toBe(0);
  });

  it('reports wrong types and bad values with the key path', async () => {
    const problems = await problemsOf(`
      ui         = "sometimes"
      api_addr   = "vault.example.com:8200"
      log_level  = "loud"
      log_format = 5
      cluster_name = ""
      storage "postgresql" {
        connection_url = "mysql://db/coffer"
        max_parallel   = "many"
      }
      listener "tcp" {
        address              = "0.0.0.0"
        tls_disable          = "maybe"
        max_request_size     = "huge"
        max_request_duration = "-5s"
      }
      replication {
        best_effort_wal_wait_duration = true
        logshipper_buffer_length      = 0
        logshipper_buffer_size        = "12XB"
      }
      telemetry { prometheus_retention_time = "forever" }
      merkle {
        flush_interval = "0s"
        flush_fraction = 1.5
      }
    `);
    expect(problems).toEqual([
      'api_addr: expected a https:// or http:// URL',
      'cluster_name: must not be empty',
      'ui: expected true or false, got "sometimes"',
      'log_level: expected one of "trace", "debug", "info", "warn", "error", got "loud"',
      'log_format: expected one of "standard", "json", got number 5',
      'storage.postgresql.connection_url: expected a postgres:// or postgresql:// URL',
      'storage.postgresql.max_parallel: expected a whole number, got "many"',
      'listener.tcp[0].address: expected "host:port", such as "0.0.0.0:8200", got "0.0.0.0"',
      'listener.tcp[0].tls_disable: expected true or false, got "maybe"',
      expect.stringMatching(/^listener\.tcp\[0\]\.max_request_size: invalid size "huge": expected a size such as "32MiB"/),
      'listener.tcp[0].max_request_duration: invalid duration "-5s": must not be negative',
      'listener.tcp[0].tls_cert_file: required unless tls_disable = true',
      'listener.tcp[0].tls_key_file: required unless tls_disable = true',
      expect.stringMatching(/^replication\.best_effort_wal_wait_duration: invalid duration true: expected a duration/),
      'replication.logshipper_buffer_length: must be at least 1',
      expect.stringMatching(/^replication\.logshipper_buffer_size: invalid size "12XB"/),
      expect.stringMatching(/^telemetry\.prometheus_retention_time: invalid duration "forever"/),
      'merkle.flush_interval: must be longer than 0',
      'merkle.flush_fraction: must be at most 1',
    ]);
  });

  it('never echoes a URL, which may hold a password', async () => {
    const problems = await problemsOf(`storage "postgresql" { connection_url = "mysql://root:hunter2@db" }\nlistener "tcp" { tls_disable = true }`);
    expect(problems.join('\n')).not.toContain('hunter2');
  });

  it('rejects unsupported storage, seal, listener and queue types', async () => {
    const problems = await problemsOf(`
      storage "raft" { path = "/vault/data" }
      listener "unix" { address = "/run/vault.sock" }
      seal "awskms" { kms_key_id = "x" }
      queue "kafka" {}
    `);
    expect(problems).toEqual([
      'storage "raft": unsupported storage type; Coffer stores in "postgresql" (or "embedded" for a single node)',
      'seal "awskms": unsupported seal type; Coffer supports "static"',
      'queue "kafka": unsupported queue type; Coffer supports "redis"',
      'listener "unix": unsupported listener type; Coffer listens on "tcp"',
    ]);
  });

  it('rejects more than one storage or seal block', async () => {
    const problems = await problemsOf(`
      ${MINIMAL}
      storage "postgresql" { connection_url = "postgres://other/coffer" }
      seal "static" {
        current_key_id = "a"
        current_key    = "${KEY_HEX}"
      }
      seal "static" {
        current_key_id = "b"
        current_key    = "${KEY_HEX}"
      }
    `);
    expect(problems).toEqual([
      'storage: more than one storage block ("postgresql", "postgresql"); Coffer uses exactly one',
      'seal: more than one seal block ("static", "static"); Coffer uses exactly one',
    ]);
  });

  it('checks each of several storage blocks by index', async () => {
    const problems = await problemsOf(`
      storage "postgresql" { connection_url = 1 }
      storage "raft" {}
      listener "tcp" { tls_disable = true }
    `);
    expect(problems).toEqual([
      'storage: more than one storage block ("postgresql", "raft"); Coffer uses exactly one',
      'storage.postgresql[0].connection_url: expected a postgres:// or postgresql:// URL, got number 1',
      expect.stringMatching(/^storage "raft": unsupported storage type/),
    ]);
  });

  it('rejects a repeated unlabelled block and blocks of the wrong shape', async () => {
    expect(await problemsOf(`${MINIMAL}\nmerkle {}\nmerkle {}`)).toEqual(['merkle: appears 2 times; write one merkle block']);
    expect(await problemsOf(`${MINIMAL}\nreplication = "fast"\nseal = "static"`)).toEqual([
      'seal: expected a block like seal "<type>" { ... }',
      'replication: expected a block like replication { ... }',
    ]);
  });

  it('requires storage and a listener', async () => {
    expect(await problemsOf('ui = true')).toEqual([
      'storage: missing; add storage "postgresql" { connection_url = "postgres://..." } or set COFFER_STORAGE_URL',
      'listener: missing; at least one listener "tcp" { address = "..." } block is required',
    ]);
  });

  it('requires connection_url and the redis url', async () => {
    const problems = await problemsOf(`
      storage "postgresql" { max_parallel = 4 }
      listener "tcp" { tls_disable = true }
      queue "redis" { prefix = "x" }
    `);
    expect(problems).toEqual([
      'storage.postgresql.connection_url: required (or set COFFER_STORAGE_URL)',
      'queue.redis.url: required (or set COFFER_REDIS_URL)',
    ]);
  });

  it('does not call a broken block missing as well', async () => {
    const problems = await problemsOf(`storage "postgresql" { connection_url = "nope" }\nlistener "tcp" { tls_disable = true }`);
    expect(problems).toEqual(['storage.postgresql.connection_url: expected a postgres:// or postgresql:// URL']);
  });

  it('checks the static seal keys', async () => {
    const problems = await problemsOf(`
      ${MINIMAL}
      seal "static" {
        current_key     = "${Buffer.alloc(16).toString('base64')}"
        previous_key_id = "k0"
      }
    `);
    expect(problems).toEqual([
      'seal.static.current_key_id: required',
      'seal.static.previous_key: required when previous_key_id is set',
      'seal.static.current_key: expected a 32-byte key as 64 hex characters or base64 (decodes to 16 bytes)',
    ]);
    expect(
      await problemsOf(`${MINIMAL}\nseal "static" {\n current_key_id = "k"\n current_key = "not a key!"\n previous_key_id = "k"\n previous_key = "${KEY_HEX}"\n}`),
    ).toEqual([
      'seal.static.previous_key_id: must differ from current_key_id',
      'seal.static.current_key: expected a 32-byte key as 64 hex characters or base64',
    ]);
  });

  it('reports an unreadable key file and an unset key variable', async () => {
    const problems = await problemsOf(
      `${MINIMAL}\nseal "static" {\n current_key_id = "k"\n current_key = "file://${dir}/missing.key"\n previous_key_id = "j"\n previous_key = "env://OLD_SEAL_KEY"\n}`,
    );
    expect(problems).toEqual([
      `seal.static.current_key: cannot read key file ${dir}/missing.key (ENOENT)`,
      'seal.static.previous_key: environment variable OLD_SEAL_KEY is not set',
    ]);
  });

  it('reports HCL and JSON syntax errors with their location', async () => {
    expect(await problemsOf('listener "tcp" {\n  address = \n}')).toEqual([
      expect.stringMatching(/^coffer\.hcl:2,\d+(-\d+,\d+)?: Invalid expression/),
    ]);
    expect(await problemsOf('ui = true\nui = false')).toEqual([expect.stringMatching(/^coffer\.hcl:2,\d+-\d+: Attribute redefined/)]);
    expect(await problemsOf('{"ui": true,}', 'coffer.json')).toEqual([expect.stringMatching(/^coffer\.json: invalid JSON: /)]);
    expect(await problemsOf('[1, 2]', 'coffer.json')).toEqual(['coffer.json: expected a JSON object at the top level']);
  });
});

describe('ConfigError', () => {
  it('collects every problem and lists each on its own line of the message', async () => {
    const err = await parseConfig(
      `
      storage "raft" {}
      listener "tcp" { adress = "x" }
      seal "awskms" {}
      log_level = "loud"
    `,
      'prod.hcl',
      {},
    ).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect(err).toBeInstanceOf(Error);
    const { problems, message, name } = err as ConfigError;
    expect(name).toBe('ConfigError');
    expect(problems).toHaveLength(6);
    expect(message.split('\n')).toEqual([
      'Invalid Coffer configuration (prod.hcl), 6 problems:',
      '  log_level: expected one of "trace", "debug", "info", "warn", "error", got "loud"',
      '  storage "raft": unsupported storage type; Coffer stores in "postgresql" (or "embedded" for a single node)',
      '  seal "awskms": unsupported seal type; Coffer supports "static"',
      '  listener.tcp[0].adress: unknown key (did you mean "address"?)',
      '  listener.tcp[0].tls_cert_file: required unless tls_disable = true',
      '  listener.tcp[0].tls_key_file: required unless tls_disable = true',
    ]);
  });
});

describe('parseConfig: environment', () => {
  it('lets Vault and Coffer variables override the file', async () => {
    const config = await parseConfig(
      `${MINIMAL}\napi_addr = "http://file:8200"\nlog_level = "info"\nqueue "redis" {\n url = "redis://file:6379"\n prefix = "file"\n}`,
      'coffer.hcl',
      {
        VAULT_API_ADDR: 'https://env:8200',
        VAULT_CLUSTER_ADDR: 'https://env:8201',
        VAULT_LOG_LEVEL: 'trace',
        VAULT_LOG_FORMAT: 'json',
        COFFER_STORAGE_URL: 'postgres://env/coffer',
        COFFER_REDIS_URL: 'rediss://env:6380',
        COFFER_REDIS_PREFIX: 'env',
      },
    );
    expect(config).toMatchObject({
      apiAddr: 'https://env:8200',
      clusterAddr: 'https://env:8201',
      logLevel: 'trace',
      logFormat: 'json',
      storage: { type: 'postgresql', connectionUrl: 'postgres://env/coffer', maxConnections: 10 },
      queue: { type: 'redis', url: 'rediss://env:6380', prefix: 'env' },
    });
  });

  it('creates the storage and queue blocks from the environment', async () => {
    const config = await parseConfig('storage "postgresql" { max_parallel = 3 }\nlistener "tcp" { tls_disable = true }', 'coffer.hcl', {
      COFFER_STORAGE_URL: 'postgresql://env/coffer',
      COFFER_REDIS_URL: 'redis://env:6379',
    });
    expect(config.storage).toEqual({ type: 'postgresql', connectionUrl: 'postgresql://env/coffer', maxConnections: 3 });
    expect(config.queue).toEqual({ type: 'redis', url: 'redis://env:6379', prefix: 'coffer' });

    const fromNothing = await parseConfig('listener "tcp" { tls_disable = true }', 'coffer.hcl', { COFFER_STORAGE_URL: 'postgres://env/c' });
    expect(fromNothing.storage).toEqual({ type: 'postgresql', connectionUrl: 'postgres://env/c', maxConnections: 10 });
  });

  it('treats empty variables as unset', async () => {
    const config = await parseConfig(MINIMAL, 'coffer.hcl', { VAULT_LOG_LEVEL: '', COFFER_STORAGE_URL: ' ' });
    expect(config.logLevel).toBe('info');
    expect(config.storage).toMatchObject({ connectionUrl: 'postgres://coffer@db/coffer' });
  });

  it('reports bad variables by name', async () => {
    const problems = await problemsOf(MINIMAL, 'coffer.hcl', {
      VAULT_LOG_LEVEL: 'chatty',
      VAULT_API_ADDR: 'nonsense',
      COFFER_STORAGE_URL: 'mysql://x',
      COFFER_REDIS_PREFIX: 'p',
    });
    expect(problems).toEqual([
      'VAULT_API_ADDR: expected a https:// or http:// URL',
      'VAULT_LOG_LEVEL: expected one of "trace", "debug", "info", "warn", "error", got "chatty"',
      'COFFER_STORAGE_URL: expected a postgres:// or postgresql:// URL',
      'COFFER_REDIS_PREFIX: set, but no queue is configured (add queue "redis" { ... } or set COFFER_REDIS_URL)',
    ]);
  });

  it('defaults to process.env', async () => {
    const saved = process.env.VAULT_LOG_FORMAT;
    process.env.VAULT_LOG_FORMAT = 'json';
    try {
      expect((await parseConfig(MINIMAL, 'coffer.hcl')).logFormat).toBe('json');
    } finally {
      if (saved === undefined) delete process.env.VAULT_LOG_FORMAT;
      else process.env.VAULT_LOG_FORMAT = saved;
    }
  });
});

describe('parseConfig: static seal keys', () => {
  const sealWith = (current: string, previous?: string) =>
    `${MINIMAL}\nseal "static" {\n current_key_id = "k2"\n current_key = "${current}"\n${
      previous ? ` previous_key_id = "k1"\n previous_key = "${previous}"\n` : ''
    }}`;

  it('reads a literal key as hex or base64', async () => {
    expect((await parseConfig(sealWith(KEY_HEX), 'c.hcl', {})).seal).toEqual({ type: 'static', currentKeyId: 'k2', currentKey: KEY });
    expect((await parseConfig(sealWith(KEY_HEX.toUpperCase()), 'c.hcl', {})).seal?.currentKey).toEqual(KEY);
    expect((await parseConfig(sealWith(KEY.toString('base64')), 'c.hcl', {})).seal?.currentKey).toEqual(KEY);
    expect((await parseConfig(sealWith(OLD_KEY.toString('base64url')), 'c.hcl', {})).seal?.currentKey).toEqual(OLD_KEY);
  });

  it('reads a key from file://', async () => {
    const file = writeTemp('seal.key', `${KEY.toString('base64')}\n`);
    const config = await parseConfig(sealWith(`file://${file}`), 'c.hcl', {});
    expect(config.seal?.currentKey).toEqual(KEY);
  });

  it('reads a key from env://', async () => {
    const config = await parseConfig(sealWith(`env://COFFER_SEAL_KEY`, 'env://COFFER_OLD_SEAL_KEY'), 'c.hcl', {
      COFFER_SEAL_KEY: KEY_HEX,
      COFFER_OLD_SEAL_KEY: OLD_KEY.toString('base64'),
    });
    expect(config.seal).toEqual({ type: 'static', currentKeyId: 'k2', currentKey: KEY, previousKeyId: 'k1', previousKey: OLD_KEY });
  });

  it('never echoes key material', async () => {
    const problems = await problemsOf(sealWith('c2VjcmV0LXZhbHVl'));
    expect(problems.join('\n')).not.toContain('c2VjcmV0LXZhbHVl');
  });
});

describe('parseConfig: result', () => {
  it('is frozen all the way down, except Buffers', async () => {
    const config = await parseConfig(`${MINIMAL}\nseal "static" {\n current_key_id = "k"\n current_key = "${KEY_HEX}"\n}`, 'c.hcl', {});
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.storage)).toBe(true);
    expect(Object.isFrozen(config.listeners)).toBe(true);
    expect(Object.isFrozen(config.listeners[0])).toBe(true);
    expect(Object.isFrozen(config.replication)).toBe(true);
    expect(Object.isFrozen(config.seal)).toBe(true);
    expect(Buffer.isBuffer(config.seal?.currentKey)).toBe(true);
    expect(() => {
      (config as { ui: boolean }).ui = true;
    }).toThrow(TypeError);
    expect(() => config.listeners.push(config.listeners[0]!)).toThrow(TypeError);
  });
});

describe('loadConfig', () => {
  it('merges files like repeated -config flags: later scalars win, listeners concatenate', async () => {
    const base = writeTemp('base.hcl', `${MINIMAL}\nlog_level = "warn"\nui = true\nmerkle { flush_fraction = 0.5 }`);
    const extra = writeTemp(
      'extra.json',
      JSON.stringify({
        log_level: 'error',
        listener: { tcp: { address: '127.0.0.1:9200', tls_disable: true } },
        merkle: { flush_interval: '1s' },
        storage: { postgresql: { connection_url: 'postgres://second/coffer' } },
      }),
    );
    const config = await loadConfig([base, extra], {});
    expect(config.logLevel).toBe('error');
    expect(config.ui).toBe(true);
    expect(config.listeners.map((l) => l.address)).toEqual(['0.0.0.0:8200', '127.0.0.1:9200']);
    expect(config.merkle).toEqual({ flushIntervalMs: 1000, flushFraction: 0.5, checkpointIntervalMs: 1000, index: true });
    expect(config.storage).toEqual({ type: 'postgresql', connectionUrl: 'postgres://second/coffer', maxConnections: 10 });
    expect(Object.isFrozen(config)).toBe(true);
  });

  it('reads the .hcl and .json files of a directory in name order', async () => {
    const confDir = join(dir, 'conf.d');
    mkdirSync(confDir);
    writeFileSync(join(confDir, '10-storage.hcl'), 'storage "embedded" {}\nlog_level = "debug"');
    writeFileSync(join(confDir, '20-listener.json'), '{"listener": {"tcp": {"tls_disable": true}}, "log_level": "trace"}');
    writeFileSync(join(confDir, 'README.md'), 'not config');
    const config = await loadConfig([confDir], {});
    expect(config.storage).toEqual({ type: 'embedded' });
    expect(config.logLevel).toBe('trace');
    expect(config.listeners).toHaveLength(1);
  });

  it('names the file each problem comes from when there are several', async () => {
    const a = writeTemp('a.hcl', `${MINIMAL}\nlog_levl = "x"`);
    const b = writeTemp('b.hcl', 'listener "tcp" { adress = "x" }');
    await expect(loadConfig([a, b], {})).rejects.toMatchObject({
      problems: [
        `${a}: log_levl: unknown key (did you mean "log_level"?)`,
        `${b}: listener.tcp[0].adress: unknown key (did you mean "address"?)`,
        `${b}: listener.tcp[0].tls_cert_file: required unless tls_disable = true`,
        `${b}: listener.tcp[0].tls_key_file: required unless tls_disable = true`,
      ],
    });
  });

  it('reports missing paths, empty directories and an empty list', async () => {
    const empty = join(dir, 'empty.d');
    mkdirSync(empty);
    await expect(loadConfig([join(dir, 'nope.hcl'), empty], {})).rejects.toMatchObject({
      problems: [`${join(dir, 'nope.hcl')}: cannot read (ENOENT)`, `${empty}: directory holds no .hcl or .json files`],
    });
    await expect(loadConfig([], {})).rejects.toMatchObject({ problems: ['no configuration file given'] });
  });
});

/**
 * Server configuration: Vault's config file format, read once into a validated, frozen object.
 *
 * A file is HCL, or JSON when its name ends in `.json` or its text starts with `{`. Keys are
 * Vault's snake_case names (`storage "postgresql" { connection_url }`, `listener "tcp" {...}`,
 * `api_addr`, ...), so an existing Vault config boots as long as it uses what Coffer has; the
 * Vault keys Coffer accepts and ignores are listed once, in `IGNORED_VAULT_KEYS`.
 *
 * Pipeline: text → document (hcl2json or JSON.parse; both give blocks as maps of arrays)
 * → one `Layer` per file (every key checked, values converted, unknown keys reported)
 * → layers merged like Vault's repeated `-config` flags (later scalars and blocks win,
 * listeners concatenate) → environment overrides → defaults and required keys → deep freeze.
 *
 * Nothing stops at the first mistake: every problem is collected with the key path it came
 * from (`listener.tcp[0].adress: unknown key (did you mean "address"?)`) and all are thrown
 * together in one `ConfigError`. Messages never echo key material or URLs, which may hold
 * passwords.
 */
import { promises as fs } from 'node:fs';
import * as path from 'node:path';
import { z } from 'zod';
import { parseDurationMs, parseDurationSeconds, parseSizeBytes } from '../core/units';

export interface ListenerConfig {
  address: string;
  tlsDisable: boolean;
  tlsCertFile?: string;
  tlsKeyFile?: string;
  /** Where the cluster listener (replication over mutual TLS) binds; Vault's `cluster_address`. */
  clusterAddress?: string;
  maxRequestSizeBytes: number;
  requestTimeoutMs: number;
}

export interface CofferConfig {
  storage: { type: 'postgresql'; connectionUrl: string; maxConnections: number } | { type: 'embedded' };
  listeners: ListenerConfig[];
  apiAddr?: string;
  clusterAddr?: string;
  /** Undefined unless configured: the caller picks a name (Vault generates one at init). */
  clusterName?: string;
  seal?: { type: 'static'; currentKeyId: string; currentKey: Buffer; previousKeyId?: string; previousKey?: Buffer };
  queue?: { type: 'redis'; url: string; prefix: string };
  ui: boolean;
  /** How often the active node sweeps Postgres for expired tokens and leases (the backstop
   * behind the queue's delayed jobs). Coffer-specific: `expiry_sweep_interval`. */
  expirySweepIntervalMs: number;
  logLevel: LogLevel;
  logFormat: LogFormat;
  replication: {
    bestEffortWalWaitDurationMs: number;
    logshipperBufferLength: number;
    logshipperBufferSizeBytes: number;
    /** After a batch of at least shipLingerMinEntries entries that reached the WAL head, wait this long before the next (Coffer's). */
    shipLingerMs: number;
    shipLingerMinEntries: number;
  };
  telemetry: { unauthenticatedMetricsAccess: boolean; prometheusRetentionTimeSeconds: number };
  /** The merkle index. `index = false` is for benchmarks only (no reconciliation without it). */
  merkle: { flushIntervalMs: number; flushFraction: number; checkpointIntervalMs: number; index: boolean };
}

export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error';
export type LogFormat = 'standard' | 'json';

/** Top-level Vault keys that Coffer accepts and ignores, so a Vault config file still loads. */
export const IGNORED_VAULT_KEYS: readonly string[] = [
  'disable_mlock',
  'disable_cache',
  'default_lease_ttl',
  'max_lease_ttl',
  'plugin_directory',
  'pid_file',
  'disable_clustering',
  'raw_storage_endpoint',
  'introspection_endpoint',
];

/** Every problem found in the configuration, one per line of the message. */
export class ConfigError extends Error {
  readonly problems: string[];

  constructor(problems: string[], origin = 'configuration') {
    const count = problems.length === 1 ? '1 problem' : `${problems.length} problems`;
    super(`Invalid Coffer configuration (${origin}), ${count}:\n${problems.map((p) => `  ${p}`).join('\n')}`);
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

/** Parses one config file's text; `filename` picks the syntax and names it in messages. */
export async function parseConfig(text: string, filename: string, env: NodeJS.ProcessEnv = process.env): Promise<CofferConfig> {
  return assemble([{ filename, text }], env, filename, new Problems());
}

/**
 * Loads and merges config files and directories (each directory contributes its `.hcl` and
 * `.json` files in name order), like Vault's repeated `-config` flags.
 */
export async function loadConfig(paths: string[], env: NodeJS.ProcessEnv = process.env): Promise<CofferConfig> {
  if (paths.length === 0) throw new ConfigError(['no configuration file given']);
  const problems = new Problems();
  const sources = await readSources(paths, problems);
  return assemble(sources, env, paths.join(', '), problems);
}

// ---------------------------------------------------------------------------------------------
// Defaults
// ---------------------------------------------------------------------------------------------

const MiB = 1024 * 1024;

/** The replication stanza's defaults (`-dev` too). */
export const REPLICATION_DEFAULTS: CofferConfig['replication'] = {
  bestEffortWalWaitDurationMs: 2_000,
  logshipperBufferLength: 16_384,
  logshipperBufferSizeBytes: 64 * MiB,
  // ~8 concurrent KV v2 writes; 15 ms kept lag p99 under 100 ms at half the peak rate (bench).
  shipLingerMs: 15,
  shipLingerMinEntries: 16,
};

const DEFAULTS = {
  listenerAddress: '127.0.0.1:8200',
  maxRequestSizeBytes: 32 * MiB,
  requestTimeoutMs: 90_000,
  maxConnections: 10,
  queuePrefix: 'coffer',
  ui: false,
  expirySweepIntervalMs: 30_000,
  logLevel: 'info',
  logFormat: 'standard',
  replication: REPLICATION_DEFAULTS,
  telemetry: { unauthenticatedMetricsAccess: false, prometheusRetentionTimeSeconds: 24 * 3600 },
  merkle: { flushIntervalMs: 200, flushFraction: 0.02, checkpointIntervalMs: 1_000, index: true },
} as const;

// ---------------------------------------------------------------------------------------------
// Problems: collected with their key path, formatted at the end
// ---------------------------------------------------------------------------------------------

interface Problem {
  file?: string;
  path: string;
  message: string;
}

/** A shared list of problems; `inFile` gives a view that tags what it adds with a file name. */
class Problems {
  constructor(
    private readonly list: Problem[] = [],
    private readonly file?: string,
  ) {}

  inFile(file: string): Problems {
    return new Problems(this.list, file);
  }

  add(path: string, message: string): void {
    this.list.push({ file: this.file, path, message });
  }

  /** Whether something was already said about `path` or a key under it (in any file). */
  has(path: string): boolean {
    return this.list.some((p) => p.path === path || p.path.startsWith(`${path}.`) || p.path.startsWith(`${path}[`));
  }

  get count(): number {
    return this.list.length;
  }

  lines(): string[] {
    return this.list.map((p) => [p.file, p.path, p.message].filter(Boolean).join(': '));
  }
}

// ---------------------------------------------------------------------------------------------
// Reading files and documents
// ---------------------------------------------------------------------------------------------

interface Source {
  filename: string;
  text: string;
}

type Document = Record<string, unknown>;

async function readSources(paths: string[], problems: Problems): Promise<Source[]> {
  const sources: Source[] = [];
  for (const given of paths) {
    try {
      const files = (await fs.stat(given)).isDirectory() ? await configFilesIn(given) : [given];
      if (files.length === 0) problems.add(given, 'directory holds no .hcl or .json files');
      for (const filename of files) sources.push({ filename, text: await fs.readFile(filename, 'utf8') });
    } catch (err) {
      problems.add(given, `cannot read (${errorCode(err)})`);
    }
  }
  return sources;
}

async function configFilesIn(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir, { withFileTypes: true });
  return entries
    .filter((e) => e.isFile() && /\.(hcl|json)$/i.test(e.name))
    .map((e) => path.join(dir, e.name))
    .sort();
}

async function assemble(sources: Source[], env: NodeJS.ProcessEnv, origin: string, problems: Problems): Promise<CofferConfig> {
  const layers: Layer[] = [];
  let unreadable = problems.count > 0;
  for (const source of sources) {
    const document = await parseDocument(source, problems);
    if (!document) {
      unreadable = true;
      continue;
    }
    const scoped = sources.length > 1 ? problems.inFile(source.filename) : problems;
    layers.push(await readLayer(document, env, scoped));
  }
  // With a file missing or unparsable, "no storage/listener" would only be noise.
  const config = unreadable ? undefined : buildConfig(applyEnv(mergeLayers(layers), env, problems), problems);
  if (!config || problems.count > 0) throw new ConfigError(problems.lines(), origin);
  return deepFreeze(config);
}

function parseDocument(source: Source, problems: Problems): Promise<Document | undefined> {
  const text = source.text.replace(/^\uFEFF/, '');
  const isJson = source.filename.toLowerCase().endsWith('.json') || text.trimStart().startsWith('{');
  return isJson ? Promise.resolve(parseJson(source.filename, text, problems)) : parseHcl(source.filename, text, problems);
}

function parseJson(filename: string, text: string, problems: Problems): Document | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    problems.add(filename, `invalid JSON: ${(err as Error).message}`);
    return undefined;
  }
  if (isBody(value)) return value;
  problems.add(filename, 'expected a JSON object at the top level');
  return undefined;
}

type HclParse = (filename: string, text: string) => Promise<Document>;

/**
 * `@cdktf/hcl2json` is required on first use: requiring it starts loading a 1.7 MB gzipped Go
 * WASM module, which JSON-only callers should not pay for. A plain `require` (typed here) also
 * keeps the package's `/// <reference lib="dom" />` out of the project's type-check.
 */
async function parseHcl(filename: string, text: string, problems: Problems): Promise<Document | undefined> {
  const { parse } = require('@cdktf/hcl2json') as { parse: HclParse };
  try {
    return await parse(filename, text);
  } catch (err) {
    // "parse config: [coffer.hcl:3,12-4,1: Invalid expression; Expected ...]"
    const detail = (err as Error).message.replace(/^parse config: \[/, '').replace(/\]$/, '');
    const located = /^(\S+:\d+,\d+(?:-\d+(?:,\d+)?)?): ([\s\S]*)$/.exec(detail);
    problems.add(located?.[1] ?? filename, located?.[2] ?? detail);
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// Leaf values: zod schemas whose messages read well after "<key path>: "
// ---------------------------------------------------------------------------------------------

/** A schema from a function that returns the converted value or throws a readable Error. */
function parsedBy<T>(parse: (v: unknown) => T): z.ZodType<T, z.ZodTypeDef, unknown> {
  return z.unknown().transform((v, ctx) => {
    try {
      return parse(v);
    } catch (err) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
      return z.NEVER;
    }
  });
}

/** A trimmed, non-empty string, or a readable Error. */
function nonEmptyString(v: unknown): string {
  if (typeof v !== 'string') throw new Error(`expected a string, got ${kindOf(v)}`);
  if (v.trim() === '') throw new Error('must not be empty');
  return v.trim();
}

const text = parsedBy(nonEmptyString);

const bool = parsedBy((v) => {
  if (typeof v === 'boolean') return v;
  if (v === 1 || v === 0) return v === 1;
  const word = typeof v === 'string' ? v.trim().toLowerCase() : undefined;
  if (word === 'true' || word === 't' || word === '1') return true;
  if (word === 'false' || word === 'f' || word === '0') return false;
  throw new Error(`expected true or false, got ${kindOf(v)}`);
});

const wholeNumber = parsedBy((v) => {
  if (typeof v === 'number' && Number.isSafeInteger(v)) return v;
  if (typeof v === 'string' && /^\s*\d+\s*$/.test(v)) return Number(v);
  throw new Error(`expected a whole number, got ${kindOf(v)}`);
});

const decimalNumber = parsedBy((v) => {
  if (typeof v === 'number' && Number.isFinite(v)) return v;
  if (typeof v === 'string' && /^\s*\d*\.?\d+\s*$/.test(v)) return Number(v);
  throw new Error(`expected a number, got ${kindOf(v)}`);
});

const positiveInt = wholeNumber.pipe(z.number().min(1, 'must be at least 1'));
const fraction = decimalNumber.pipe(z.number().gt(0, 'must be greater than 0').max(1, 'must be at most 1'));
const durationMs = parsedBy(parseDurationMs);
const positiveDurationMs = durationMs.pipe(z.number().positive('must be longer than 0'));
const durationSeconds = parsedBy(parseDurationSeconds);
/** ship_linger: the shipper holds its ship lock meanwhile, and a SIGTERM may wait for it. */
const lingerMs = durationMs.pipe(z.number().max(10_000, 'must be at most 10s'));
const sizeBytes = parsedBy(parseSizeBytes);
const positiveSizeBytes = sizeBytes.pipe(z.number().min(1, 'must be at least 1 byte'));

const hostPort = parsedBy((v) => {
  const address = nonEmptyString(v);
  const port = /^(?:\[[^\]]+\]|[^:[\]]*):(\d{1,5})$/.exec(address)?.[1];
  if (port === undefined || Number(port) > 65535) throw new Error(`expected "host:port", such as "0.0.0.0:8200", got ${kindOf(v)}`);
  return address;
});

function urlWithScheme(...schemes: string[]): z.ZodType<string, z.ZodTypeDef, unknown> {
  const expected = `expected a ${schemes.map((s) => `${s}//`).join(' or ')} URL`;
  return parsedBy((v) => {
    if (typeof v !== 'string') throw new Error(`${expected}, got ${kindOf(v)}`);
    const url = v.trim();
    if (!URL.canParse(url) || !schemes.includes(new URL(url).protocol)) throw new Error(expected);
    return url;
  });
}

const httpUrl = urlWithScheme('https:', 'http:');
const postgresUrl = urlWithScheme('postgres:', 'postgresql:');
const redisUrl = urlWithScheme('redis:', 'rediss:');

function choice<T extends string>(allowed: readonly T[], aliases: Readonly<Record<string, T>> = {}): z.ZodType<T, z.ZodTypeDef, unknown> {
  return parsedBy((v) => {
    const word = typeof v === 'string' ? v.trim().toLowerCase() : '';
    const found = allowed.find((a) => a === word) ?? aliases[word];
    if (found) return found;
    throw new Error(`expected one of ${allowed.map((a) => `"${a}"`).join(', ')}, got ${kindOf(v)}`);
  });
}

const logLevel = choice<LogLevel>(['trace', 'debug', 'info', 'warn', 'error'], { warning: 'warn', err: 'error' });
const logFormat = choice<LogFormat>(['standard', 'json']);

function kindOf(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v);
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list or block';
  if (typeof v === 'object') return 'an object or block';
  return `${typeof v} ${String(v)}`;
}

// ---------------------------------------------------------------------------------------------
// Blocks and fields
// ---------------------------------------------------------------------------------------------

type FieldSpec = Record<string, z.ZodTypeAny>;
type Fields<S extends FieldSpec> = { [K in keyof S]?: z.output<S[K]> };
type Body = Record<string, unknown>;

function isBody(v: unknown): v is Body {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function keyPath(at: string, key: string): string {
  return at === '' ? key : `${at}.${key}`;
}

/**
 * Reads the keys of `spec` from a block body, reporting unknown keys (anything not in `spec`
 * or `otherKeys`) and invalid values. Returns only the keys that were present and valid.
 */
function readFields<S extends FieldSpec>(body: Body, spec: S, at: string, problems: Problems, otherKeys: readonly string[] = []): Fields<S> {
  reportUnknownKeys(body, [...Object.keys(spec), ...otherKeys], at, problems);
  const fields: Fields<S> = {};
  for (const key of Object.keys(spec) as (keyof S & string)[]) {
    if (!Object.hasOwn(body, key)) continue;
    const parsed = spec[key]!.safeParse(body[key]);
    if (parsed.success) fields[key] = parsed.data as z.output<S[typeof key]>;
    else problems.add(keyPath(at, key), parsed.error.issues.map((i) => i.message).join('; '));
  }
  return fields;
}

function reportUnknownKeys(body: Body, known: readonly string[], at: string, problems: Problems): void {
  for (const key of Object.keys(body)) {
    if (!known.includes(key)) problems.add(keyPath(at, key), `unknown key${suggestion(key, known)}`);
  }
}

/** Reports keys of `required` absent from the body (present-but-invalid keys were reported already). */
function requireKeys(body: Body, required: readonly string[], at: string, problems: Problems, why = 'required'): void {
  for (const key of required) if (!Object.hasOwn(body, key)) problems.add(keyPath(at, key), why);
}

function suggestion(key: string, candidates: readonly string[]): string {
  const squash = (s: string) => s.toLowerCase().replace(/[-_]/g, '');
  const limit = Math.max(1, Math.floor(key.length / 3));
  let best: { candidate: string; distance: number } | undefined;
  for (const candidate of candidates) {
    const distance = squash(candidate) === squash(key) ? 0 : editDistance(key, candidate);
    if (distance <= limit && (!best || distance < best.distance)) best = { candidate, distance };
  }
  return best ? ` (did you mean "${best.candidate}"?)` : '';
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(previous[j]! + 1, current[j - 1]! + 1, previous[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    previous = current;
  }
  return previous[b.length]!;
}

interface TypedBlock {
  type: string;
  body: Body;
}

/**
 * The instances of a labelled block (`listener "tcp" { ... }`) in either shape: hcl2json's
 * `{ tcp: [body, ...] }`, or Vault JSON's `{ tcp: body }` and `[{ tcp: body }, ...]`.
 */
function typedBlocks(name: string, value: unknown, problems: Problems): TypedBlock[] {
  const blocks: TypedBlock[] = [];
  for (const group of Array.isArray(value) ? value : [value]) {
    if (!isBody(group)) {
      notABlock(name, `${name} "<type>" { ... }`, problems);
      return [];
    }
    for (const [type, bodies] of Object.entries(group)) {
      for (const body of Array.isArray(bodies) ? bodies : [bodies]) {
        if (!isBody(body)) {
          notABlock(name, `${name} "<type>" { ... }`, problems);
          return [];
        }
        blocks.push({ type, body });
      }
    }
  }
  return blocks;
}

/** The body of an unlabelled block (`replication { ... }`), which may appear once. */
function singleBody(name: string, value: unknown, problems: Problems): Body | undefined {
  const bodies = Array.isArray(value) ? value : [value];
  if (!bodies.every(isBody)) {
    notABlock(name, `${name} { ... }`, problems);
    return undefined;
  }
  if (bodies.length > 1) problems.add(name, `appears ${bodies.length} times; write one ${name} block`);
  return bodies.length === 1 ? bodies[0] : undefined;
}

function notABlock(name: string, example: string, problems: Problems): void {
  problems.add(name, `expected a block like ${example}`);
}

type BlockReader<T> = (body: Body, at: string, problems: Problems) => T | undefined | Promise<T | undefined>;

/** Reads a block that may appear once, with one of the supported type labels. */
async function readOneTyped<T>(
  name: string,
  value: unknown,
  readers: Readonly<Record<string, BlockReader<T>>>,
  unsupported: string,
  problems: Problems,
): Promise<T | undefined> {
  const blocks = typedBlocks(name, value, problems);
  if (blocks.length > 1) {
    const types = blocks.map((b) => `"${b.type}"`).join(', ');
    problems.add(name, `more than one ${name} block (${types}); Coffer uses exactly one`);
  }
  const results: (T | undefined)[] = [];
  for (const [index, block] of blocks.entries()) {
    const reader = Object.hasOwn(readers, block.type) ? readers[block.type] : undefined;
    if (!reader) {
      problems.add(`${name} "${block.type}"`, unsupported);
      continue;
    }
    const at = blocks.length > 1 ? `${name}.${block.type}[${index}]` : `${name}.${block.type}`;
    results.push(await reader(block.body, at, problems));
  }
  return blocks.length === 1 ? results[0] : undefined;
}

// ---------------------------------------------------------------------------------------------
// One file → Layer
// ---------------------------------------------------------------------------------------------

type Settings = Pick<CofferConfig, 'apiAddr' | 'clusterAddr' | 'clusterName' | 'ui' | 'logLevel' | 'logFormat' | 'expirySweepIntervalMs'>;
type StorageLayer = { type: 'postgresql'; connectionUrl?: string; maxConnections?: number } | { type: 'embedded' };
type QueueLayer = { type: 'redis'; url?: string; prefix?: string };
type SealConfig = NonNullable<CofferConfig['seal']>;

/** What one file says: only the keys it sets, already converted. */
interface Layer {
  /** Top-level keys the file used, valid or not (so a broken block is not also "missing"). */
  seen: Set<string>;
  settings: Partial<Settings>;
  storage?: StorageLayer;
  seal?: SealConfig;
  queue?: QueueLayer;
  listeners: ListenerConfig[];
  replication: Partial<CofferConfig['replication']>;
  telemetry: Partial<CofferConfig['telemetry']>;
  merkle: Partial<CofferConfig['merkle']>;
}

const SETTINGS_FIELDS = {
  api_addr: httpUrl,
  cluster_addr: httpUrl,
  cluster_name: text,
  ui: bool,
  expiry_sweep_interval: positiveDurationMs,
  log_level: logLevel,
  log_format: logFormat,
};

const BLOCK_NAMES = ['storage', 'listener', 'seal', 'queue', 'replication', 'telemetry', 'merkle'] as const;

async function readLayer(doc: Document, env: NodeJS.ProcessEnv, problems: Problems): Promise<Layer> {
  const f = readFields(doc, SETTINGS_FIELDS, '', problems, [...BLOCK_NAMES, ...IGNORED_VAULT_KEYS]);
  const block = (name: (typeof BLOCK_NAMES)[number]) => (Object.hasOwn(doc, name) ? doc[name] : undefined);
  return {
    seen: new Set(Object.keys(doc)),
    settings: compact({
      apiAddr: f.api_addr,
      clusterAddr: f.cluster_addr,
      clusterName: f.cluster_name,
      ui: f.ui,
      expirySweepIntervalMs: f.expiry_sweep_interval,
      logLevel: f.log_level,
      logFormat: f.log_format,
    }),
    storage: block('storage') === undefined ? undefined : await readStorage(block('storage'), problems),
    seal: block('seal') === undefined ? undefined : await readSeal(block('seal'), env, problems),
    queue: block('queue') === undefined ? undefined : await readQueue(block('queue'), problems),
    listeners: block('listener') === undefined ? [] : readListeners(block('listener'), problems),
    replication: readReplication(block('replication'), problems),
    telemetry: readTelemetry(block('telemetry'), problems),
    merkle: readMerkle(block('merkle'), problems),
  };
}

const POSTGRES_FIELDS = { connection_url: postgresUrl, max_parallel: positiveInt };

function readStorage(value: unknown, problems: Problems): Promise<StorageLayer | undefined> {
  return readOneTyped<StorageLayer>(
    'storage',
    value,
    {
      postgresql: (body, at, p) => {
        const f = readFields(body, POSTGRES_FIELDS, at, p);
        return compact({ type: 'postgresql' as const, connectionUrl: f.connection_url, maxConnections: f.max_parallel });
      },
      embedded: (body, at, p) => {
        readFields(body, {}, at, p);
        return { type: 'embedded' };
      },
    },
    'unsupported storage type; Coffer stores in "postgresql" (or "embedded" for a single node)',
    problems,
  );
}

const LISTENER_FIELDS = {
  address: hostPort,
  tls_disable: bool,
  tls_cert_file: text,
  tls_key_file: text,
  cluster_address: hostPort,
  max_request_size: sizeBytes,
  max_request_duration: durationMs,
};

function readListeners(value: unknown, problems: Problems): ListenerConfig[] {
  let tcpCount = 0;
  return typedBlocks('listener', value, problems).flatMap((block) => {
    if (block.type === 'tcp') return [readTcpListener(block.body, `listener.tcp[${tcpCount++}]`, problems)];
    problems.add(`listener "${block.type}"`, 'unsupported listener type; Coffer listens on "tcp"');
    return [];
  });
}

/** As in Vault, a zero max_request_size or max_request_duration means the default. */
function readTcpListener(body: Body, at: string, problems: Problems): ListenerConfig {
  const f = readFields(body, LISTENER_FIELDS, at, problems);
  const tlsDisable = f.tls_disable ?? false;
  if (!tlsDisable) requireKeys(body, ['tls_cert_file', 'tls_key_file'], at, problems, 'required unless tls_disable = true');
  return compact({
    address: f.address ?? DEFAULTS.listenerAddress,
    tlsDisable,
    tlsCertFile: f.tls_cert_file,
    tlsKeyFile: f.tls_key_file,
    clusterAddress: f.cluster_address,
    maxRequestSizeBytes: f.max_request_size || DEFAULTS.maxRequestSizeBytes,
    requestTimeoutMs: f.max_request_duration || DEFAULTS.requestTimeoutMs,
  });
}

const STATIC_SEAL_FIELDS = { current_key_id: text, current_key: text, previous_key_id: text, previous_key: text };

function readSeal(value: unknown, env: NodeJS.ProcessEnv, problems: Problems): Promise<SealConfig | undefined> {
  return readOneTyped<SealConfig>(
    'seal',
    value,
    { static: (body, at, p) => readStaticSeal(body, at, env, p) },
    'unsupported seal type; Coffer supports "static"',
    problems,
  );
}

async function readStaticSeal(body: Body, at: string, env: NodeJS.ProcessEnv, problems: Problems): Promise<SealConfig | undefined> {
  const f = readFields(body, STATIC_SEAL_FIELDS, at, problems);
  requireKeys(body, ['current_key_id', 'current_key'], at, problems);
  if (Object.hasOwn(body, 'previous_key')) requireKeys(body, ['previous_key_id'], at, problems, 'required when previous_key is set');
  if (Object.hasOwn(body, 'previous_key_id')) requireKeys(body, ['previous_key'], at, problems, 'required when previous_key_id is set');
  if (f.previous_key_id !== undefined && f.previous_key_id === f.current_key_id) {
    problems.add(`${at}.previous_key_id`, 'must differ from current_key_id');
  }
  const currentKey = await resolveSealKey(f.current_key, `${at}.current_key`, env, problems);
  const previousKey = await resolveSealKey(f.previous_key, `${at}.previous_key`, env, problems);
  if (f.current_key_id === undefined || currentKey === undefined) return undefined;
  return compact({ type: 'static' as const, currentKeyId: f.current_key_id, currentKey, previousKeyId: f.previous_key_id, previousKey });
}

/** A seal key given as `file:///path`, `env://VAR` or inline, as 64 hex characters or base64. */
async function resolveSealKey(reference: string | undefined, at: string, env: NodeJS.ProcessEnv, problems: Problems): Promise<Buffer | undefined> {
  let material: string;
  if (reference === undefined) {
    return undefined;
  } else if (reference.startsWith('file://')) {
    const file = reference.slice('file://'.length);
    try {
      material = (await fs.readFile(file, 'utf8')).trim();
    } catch (err) {
      problems.add(at, `cannot read key file ${file} (${errorCode(err)})`);
      return undefined;
    }
  } else if (reference.startsWith('env://')) {
    const name = reference.slice('env://'.length);
    material = env[name]?.trim() ?? '';
    if (material === '') {
      problems.add(at, `environment variable ${name} is not set`);
      return undefined;
    }
  } else {
    material = reference;
  }
  const key = decodeKey(material);
  if (key?.length === 32) return key;
  problems.add(at, `expected a 32-byte key as 64 hex characters or base64${key ? ` (decodes to ${key.length} bytes)` : ''}`);
  return undefined;
}

function decodeKey(material: string): Buffer | undefined {
  if (/^[0-9a-f]{64}$/i.test(material)) return Buffer.from(material, 'hex');
  if (/^[A-Za-z0-9+/_-]+={0,2}$/.test(material)) return Buffer.from(material, 'base64');
  return undefined;
}

const REDIS_FIELDS = { url: redisUrl, prefix: text };

function readQueue(value: unknown, problems: Problems): Promise<QueueLayer | undefined> {
  return readOneTyped<QueueLayer>(
    'queue',
    value,
    {
      redis: (body, at, p) => {
        const f = readFields(body, REDIS_FIELDS, at, p);
        return compact({ type: 'redis' as const, url: f.url, prefix: f.prefix });
      },
    },
    'unsupported queue type; Coffer supports "redis"',
    problems,
  );
}

const REPLICATION_FIELDS = {
  best_effort_wal_wait_duration: durationMs,
  logshipper_buffer_length: positiveInt,
  logshipper_buffer_size: positiveSizeBytes,
  ship_linger: lingerMs,
  ship_linger_min_entries: positiveInt,
};

function readReplication(value: unknown, problems: Problems): Layer['replication'] {
  const body = value === undefined ? undefined : singleBody('replication', value, problems);
  if (!body) return {};
  const f = readFields(body, REPLICATION_FIELDS, 'replication', problems);
  return compact({
    bestEffortWalWaitDurationMs: f.best_effort_wal_wait_duration,
    logshipperBufferLength: f.logshipper_buffer_length,
    logshipperBufferSizeBytes: f.logshipper_buffer_size,
    shipLingerMs: f.ship_linger,
    shipLingerMinEntries: f.ship_linger_min_entries,
  });
}

const TELEMETRY_FIELDS = { unauthenticated_metrics_access: bool, prometheus_retention_time: durationSeconds };

function readTelemetry(value: unknown, problems: Problems): Layer['telemetry'] {
  const body = value === undefined ? undefined : singleBody('telemetry', value, problems);
  if (!body) return {};
  const f = readFields(body, TELEMETRY_FIELDS, 'telemetry', problems);
  return compact({
    unauthenticatedMetricsAccess: f.unauthenticated_metrics_access,
    prometheusRetentionTimeSeconds: f.prometheus_retention_time,
  });
}

const MERKLE_FIELDS = { flush_interval: positiveDurationMs, flush_fraction: fraction, checkpoint_interval: positiveDurationMs, index: bool };

function readMerkle(value: unknown, problems: Problems): Layer['merkle'] {
  const body = value === undefined ? undefined : singleBody('merkle', value, problems);
  if (!body) return {};
  const f = readFields(body, MERKLE_FIELDS, 'merkle', problems);
  return compact({ flushIntervalMs: f.flush_interval, flushFraction: f.flush_fraction, checkpointIntervalMs: f.checkpoint_interval, index: f.index });
}

// ---------------------------------------------------------------------------------------------
// Layers → config
// ---------------------------------------------------------------------------------------------

/** Later files win for settings and whole blocks; listeners from every file are kept. */
function mergeLayers(layers: Layer[]): Layer {
  const empty: Layer = { seen: new Set(), settings: {}, listeners: [], replication: {}, telemetry: {}, merkle: {} };
  return layers.reduce<Layer>(
    (acc, next) => ({
      seen: new Set([...acc.seen, ...next.seen]),
      settings: { ...acc.settings, ...next.settings },
      storage: next.storage ?? acc.storage,
      seal: next.seal ?? acc.seal,
      queue: next.queue ?? acc.queue,
      listeners: [...acc.listeners, ...next.listeners],
      replication: { ...acc.replication, ...next.replication },
      telemetry: { ...acc.telemetry, ...next.telemetry },
      merkle: { ...acc.merkle, ...next.merkle },
    }),
    empty,
  );
}

/** Environment variables beat files; an empty variable counts as unset. */
function applyEnv(layer: Layer, env: NodeJS.ProcessEnv, problems: Problems): Layer {
  const read = <T>(name: string, schema: z.ZodType<T, z.ZodTypeDef, unknown>): T | undefined => {
    const raw = env[name];
    if (raw === undefined || raw.trim() === '') return undefined;
    const parsed = schema.safeParse(raw);
    if (!parsed.success) problems.add(name, parsed.error.issues.map((i) => i.message).join('; '));
    return parsed.success ? parsed.data : undefined;
  };
  const settings = compact({
    apiAddr: read('VAULT_API_ADDR', httpUrl),
    clusterAddr: read('VAULT_CLUSTER_ADDR', httpUrl),
    logLevel: read('VAULT_LOG_LEVEL', logLevel),
    logFormat: read('VAULT_LOG_FORMAT', logFormat),
  });
  const storageUrl = read('COFFER_STORAGE_URL', postgresUrl);
  const queueUrl = read('COFFER_REDIS_URL', redisUrl);
  const queuePrefix = read('COFFER_REDIS_PREFIX', text);
  if (queuePrefix !== undefined && !layer.queue && queueUrl === undefined) {
    problems.add('COFFER_REDIS_PREFIX', 'set, but no queue is configured (add queue "redis" { ... } or set COFFER_REDIS_URL)');
  }
  const hasQueue = layer.queue || queueUrl !== undefined;
  return {
    ...layer,
    settings: { ...layer.settings, ...settings },
    storage: storageUrl === undefined ? layer.storage : { ...postgresOrNew(layer.storage), connectionUrl: storageUrl },
    queue: hasQueue ? { type: 'redis', ...layer.queue, ...compact({ url: queueUrl, prefix: queuePrefix }) } : undefined,
  };
}

function postgresOrNew(storage: StorageLayer | undefined): StorageLayer & { type: 'postgresql' } {
  return storage?.type === 'postgresql' ? storage : { type: 'postgresql' };
}

/** Applies defaults and checks required keys; undefined when something required is missing. */
function buildConfig(layer: Layer, problems: Problems): CofferConfig | undefined {
  const storage = finishStorage(layer, problems);
  const listeners = finishListeners(layer, problems);
  const queue = finishQueue(layer.queue, problems);
  if (!storage || !listeners) return undefined;
  const { settings } = layer;
  return compact({
    storage,
    listeners,
    apiAddr: settings.apiAddr,
    clusterAddr: settings.clusterAddr,
    clusterName: settings.clusterName,
    seal: layer.seal,
    queue,
    ui: settings.ui ?? DEFAULTS.ui,
    expirySweepIntervalMs: settings.expirySweepIntervalMs ?? DEFAULTS.expirySweepIntervalMs,
    logLevel: settings.logLevel ?? DEFAULTS.logLevel,
    logFormat: settings.logFormat ?? DEFAULTS.logFormat,
    replication: { ...DEFAULTS.replication, ...layer.replication },
    telemetry: { ...DEFAULTS.telemetry, ...layer.telemetry },
    merkle: { ...DEFAULTS.merkle, ...layer.merkle },
  });
}

function finishStorage(layer: Layer, problems: Problems): CofferConfig['storage'] | undefined {
  const storage = layer.storage;
  if (!storage) {
    if (!layer.seen.has('storage')) {
      problems.add('storage', 'missing; add storage "postgresql" { connection_url = "postgres://..." } or set COFFER_STORAGE_URL');
    }
    return undefined;
  }
  if (storage.type === 'embedded') return storage;
  if (storage.connectionUrl === undefined) {
    const at = 'storage.postgresql.connection_url';
    if (!problems.has(at)) problems.add(at, 'required (or set COFFER_STORAGE_URL)');
    return undefined;
  }
  return { type: 'postgresql', connectionUrl: storage.connectionUrl, maxConnections: storage.maxConnections ?? DEFAULTS.maxConnections };
}

function finishListeners(layer: Layer, problems: Problems): ListenerConfig[] | undefined {
  if (layer.listeners.length > 0) return layer.listeners;
  if (!layer.seen.has('listener')) problems.add('listener', 'missing; at least one listener "tcp" { address = "..." } block is required');
  return undefined;
}

function finishQueue(queue: QueueLayer | undefined, problems: Problems): CofferConfig['queue'] {
  if (!queue) return undefined;
  if (queue.url === undefined) {
    const at = 'queue.redis.url';
    if (!problems.has(at)) problems.add(at, 'required (or set COFFER_REDIS_URL)');
    return undefined;
  }
  return { type: 'redis', url: queue.url, prefix: queue.prefix ?? DEFAULTS.queuePrefix };
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/** The object without its undefined-valued keys, so optional fields are absent, not undefined. */
function compact<T extends object>(value: T): { [K in keyof T]: T[K] } {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as T;
}

/** Object.freeze all the way down; Buffers (typed arrays) cannot be frozen and are left as they are. */
function deepFreeze<T>(value: T): T {
  if (typeof value !== 'object' || value === null || ArrayBuffer.isView(value)) return value;
  for (const child of Object.values(value)) deepFreeze(child);
  return Object.freeze(value);
}

function errorCode(err: unknown): string {
  return (err as NodeJS.ErrnoException).code ?? (err as Error).message;
}

/**
 * Parsing Vault ACL policy text (HCL or JSON, raw or base64-encoded) into a `Policy`, with
 * Vault's validation and error wording (`vault/policy.go`, `parseACLPolicyWithTemplating`).
 *
 * HCL goes through @cdktf/hcl2json, which renders `path "x" { ... }` blocks as
 * `{ path: { x: [ { ... } ] } }`. It is loaded lazily with a plain require and a local type:
 * its .d.ts pulls in lib "dom", which would leak browser globals into every file of the project.
 * The first parse pays for loading its WebAssembly module (~150 ms); later ones do not. Blocks
 * come back keyed (and sorted) by path, so the rules' order is not the text's; the ACL does not
 * depend on order, and the text itself is stored verbatim beside the rules.
 *
 * Vault's HCL 1 also reads JSON; hcl2json (HCL 2 native syntax) does not, so text whose first
 * non-blank character is `{` is parsed as JSON here (a native HCL body never starts that way).
 *
 * Parsed but NOT enforced by the ACL (sys/policies refuses policies that use them, failing closed): allowed_parameters, denied_parameters, required_parameters,
 * min_wrapping_ttl, max_wrapping_ttl. Refused: mfa_methods and control_group (Enterprise gates
 * that, silently ignored, would let requests through that the author meant to hold).
 */
import { InvalidRequest } from './errors';
import { CAPABILITIES, type Capability, type PathRule, type Policy } from './policy';
import { parseDurationSeconds } from './units';

interface Hcl2Json {
  parse(filename: string, contents: string): Promise<Record<string, unknown>>;
}

let hcl2json: Hcl2Json | null = null;

function loadHcl2Json(): Hcl2Json {
  // A plain require, not an import: see the header.
  hcl2json ??= require('@cdktf/hcl2json') as Hcl2Json;
  return hcl2json;
}

/** Vault's pre-capabilities `policy = "..."` values and what each expands to. */
const LEGACY_POLICIES: Readonly<Record<string, readonly Capability[]>> = {
  deny: ['deny'],
  read: ['read', 'list'],
  write: ['create', 'read', 'update', 'delete', 'list'],
  sudo: ['create', 'read', 'update', 'delete', 'list', 'sudo'],
};

const PATH_KEYS = new Set([
  'comment',
  'policy',
  'capabilities',
  'allowed_parameters',
  'denied_parameters',
  'required_parameters',
  'min_wrapping_ttl',
  'max_wrapping_ttl',
  'subscribe_event_types',
]);
const UNSUPPORTED_PATH_KEYS = new Set(['mfa_methods', 'control_group']);
const TOP_KEYS = new Set(['name', 'path']);

/** Policy names are case-insensitive in Vault: trimmed and lowercased before use. */
export function sanitizePolicyName(name: string): string {
  return name.trim().toLowerCase();
}

/**
 * Vault accepts the policy text base64-encoded: if the whole text is valid standard base64
 * (line breaks ignored, as Go's decoder does) it is decoded. Decoded bytes that are not UTF-8
 * text mean it was not base64 after all, and the text is kept as sent.
 */
export function decodePolicyText(text: string): string {
  const compact = text.replace(/[\r\n]/g, '');
  if (!compact || compact.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(compact)) return text;
  const bytes = Buffer.from(compact, 'base64');
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    return text;
  }
}

/** Parses policy text (HCL or JSON, raw or base64) into rules; throws InvalidRequest. */
export async function parsePolicy(name: string, text: string): Promise<Policy> {
  const source = decodePolicyText(text);
  if (!source.trim()) throw new InvalidRequest("'policy' parameter not supplied or empty");
  let tree: unknown;
  if (source.trimStart().startsWith('{')) {
    try {
      tree = JSON.parse(source);
    } catch (err) {
      throw fail(`invalid JSON: ${(err as Error).message}`);
    }
  } else {
    try {
      tree = await loadHcl2Json().parse('policy.hcl', source);
    } catch (err) {
      throw fail(String((err as Error)?.message ?? err).replace(/^parse config: /, ''));
    }
  }
  if (!isObject(tree)) throw fail('does not contain a root object');
  for (const key of Object.keys(tree)) if (!TOP_KEYS.has(key)) throw fail(`invalid key "${key}"`);
  const rules: PathRule[] = [];
  if (tree.path !== undefined) for (const [path, body] of pathBlocks(tree.path)) rules.push(parseRule(path, body));
  return { name: sanitizePolicyName(name), rules };
}

function fail(msg: string): InvalidRequest {
  return new InvalidRequest(`failed to parse policy: ${msg}`);
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * The (path, body) pairs of the `path` key, in order. Accepts hcl2json's `{x: [body, ...]}`,
 * Vault's JSON `{x: body}`, and HCL-1 JSON's list form `[{x: body}, ...]`.
 */
function pathBlocks(v: unknown): [string, unknown][] {
  if (Array.isArray(v)) return v.flatMap(pathBlocks);
  if (!isObject(v)) throw fail('"path" must be a block: path "<path>" { capabilities = [...] }');
  const out: [string, unknown][] = [];
  for (const [path, body] of Object.entries(v)) {
    if (Array.isArray(body)) for (const b of body) out.push([path, b]);
    else out.push([path, body]);
  }
  return out;
}

function parseRule(key: string, body: unknown): PathRule {
  const at = (msg: string) => fail(`path ${JSON.stringify(key)}: ${msg}`);
  if (!isObject(body)) throw at('expected a block of attributes');
  for (const k of Object.keys(body)) {
    if (UNSUPPORTED_PATH_KEYS.has(k)) throw at(`${k} is a Vault Enterprise feature that Coffer does not support`);
    if (!PATH_KEYS.has(k)) throw at(`invalid key "${k}"`);
  }

  // Paths in Vault start after the `/` of the API path.
  const path = key.startsWith('/') ? key.slice(1) : key;
  if (path.includes('+*')) throw at("invalid use of wildcards ('+*' is forbidden)");
  if (path.slice(0, -1).includes('*')) throw at("invalid use of wildcards ('*' is only allowed at the end of a path)");

  const caps: string[] = [];
  if (body.capabilities !== undefined) caps.push(...stringList(body.capabilities, 'capabilities', at));
  if (body.policy !== undefined) {
    const legacy = typeof body.policy === 'string' ? LEGACY_POLICIES[body.policy] : undefined;
    if (!legacy) throw at(`invalid policy ${JSON.stringify(body.policy)}`);
    // As in Vault: legacy deny replaces, the others add to any explicit capabilities.
    if (body.policy === 'deny') caps.splice(0, caps.length);
    caps.push(...legacy);
  }
  for (const c of caps) if (!(CAPABILITIES as readonly string[]).includes(c)) throw at(`invalid capability ${JSON.stringify(c)}`);
  const capabilities: Capability[] = caps.includes('deny') ? ['deny'] : [...new Set(caps as Capability[])];

  const rule: PathRule = { path, capabilities };
  if (body.allowed_parameters !== undefined) rule.allowedParameters = parameters(body.allowed_parameters, 'allowed_parameters', at);
  if (body.denied_parameters !== undefined) rule.deniedParameters = parameters(body.denied_parameters, 'denied_parameters', at);
  if (body.required_parameters !== undefined) rule.requiredParameters = stringList(body.required_parameters, 'required_parameters', at);
  for (const [field, prop] of [['min_wrapping_ttl', 'minWrappingTtl'], ['max_wrapping_ttl', 'maxWrappingTtl']] as const) {
    if (body[field] === undefined) continue;
    try {
      rule[prop] = parseDurationSeconds(body[field]);
    } catch (err) {
      throw fail(`error parsing ${field}: ${(err as Error).message}`);
    }
  }
  if (rule.minWrappingTtl && rule.maxWrappingTtl && rule.maxWrappingTtl < rule.minWrappingTtl) {
    throw fail('max_wrapping_ttl cannot be less than min_wrapping_ttl');
  }
  return rule;
}

function stringList(v: unknown, field: string, at: (m: string) => InvalidRequest): string[] {
  const list = typeof v === 'string' ? [v] : v;
  if (!Array.isArray(list) || !list.every((x) => typeof x === 'string')) throw at(`${field} must be a list of strings`);
  return list;
}

/**
 * `allowed_parameters = { "key" = [values] }`, keys lowercased as in Vault. hcl2json renders
 * the block form `allowed_parameters { ... }` as a list of objects; those are merged.
 */
function parameters(v: unknown, field: string, at: (m: string) => InvalidRequest): Record<string, unknown[]> {
  const maps = Array.isArray(v) ? v : [v];
  const out: Record<string, unknown[]> = {};
  for (const m of maps) {
    if (!isObject(m)) throw at(`${field} must be a map of parameter names to lists of values`);
    for (const [k, vals] of Object.entries(m)) {
      if (!Array.isArray(vals)) throw at(`${field}: the value of ${JSON.stringify(k)} must be a list`);
      out[k.toLowerCase()] = vals;
    }
  }
  return out;
}

/** Renders rules as policy HCL (for built-in policies that have no stored text). */
export function policyToHcl(rules: readonly PathRule[]): string {
  return rules.map((r) => `path ${JSON.stringify(r.path)} {\n    capabilities = [${r.capabilities.map((c) => JSON.stringify(c)).join(', ')}]\n}\n`).join('\n');
}

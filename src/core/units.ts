/**
 * Durations and sizes as Vault writes them in configuration and API parameters.
 *
 * Durations follow Go's `time.ParseDuration` ("90s", "1h30m", "1.5h", "500ms", "250us") plus
 * Vault's `d` for days ("7d", "1d12h"); a bare whole number, as a JSON number or a digit string,
 * means seconds, as in Vault's `parseutil.ParseDurationSecond`. Values are parsed exactly in
 * integer nanoseconds, so "1.1s" is 1100 ms and not 1100.0000000000002.
 *
 * Sizes follow `humanize.ParseBytes`, which Vault uses for capacity strings: decimal units
 * ("10MB" = 10 000 000) and binary units ("32MiB" = 33 554 432), case-insensitive; a bare whole
 * number means bytes.
 *
 * Every parser throws a plain `Error` whose message says what was wrong and what is accepted,
 * without any location: callers (the config loader, HTTP handlers) prefix the key it came from.
 */

const NS_PER_UNIT: Readonly<Record<string, bigint>> = {
  ns: 1n,
  us: 1_000n,
  'µs': 1_000n, // U+00B5 micro sign
  'μs': 1_000n, // U+03BC Greek mu
  ms: 1_000_000n,
  s: 1_000_000_000n,
  m: 60_000_000_000n,
  h: 3_600_000_000_000n,
  d: 86_400_000_000_000n,
};

const BYTES_PER_UNIT: Readonly<Record<string, bigint>> = {
  '': 1n, b: 1n,
  k: 1000n, kb: 1000n, ki: 1024n, kib: 1024n,
  m: 1000n ** 2n, mb: 1000n ** 2n, mi: 1024n ** 2n, mib: 1024n ** 2n,
  g: 1000n ** 3n, gb: 1000n ** 3n, gi: 1024n ** 3n, gib: 1024n ** 3n,
  t: 1000n ** 4n, tb: 1000n ** 4n, ti: 1024n ** 4n, tib: 1024n ** 4n,
  p: 1000n ** 5n, pb: 1000n ** 5n, pi: 1024n ** 5n, pib: 1024n ** 5n,
};

const DURATION_HINT = 'expected a duration such as "90s", "1h30m", "500ms" or "7d", or a whole number of seconds';
const SIZE_HINT = 'expected a size such as "32MiB", "10MB" or "512KiB", or a whole number of bytes';

/** Seconds in a Vault duration: `parseDurationSeconds("1h30m") === 5400`, `("500ms") === 0.5`. */
export function parseDurationSeconds(v: unknown): number {
  return Number(parseDurationNs(v)) / 1e9;
}

/** Milliseconds in a Vault duration: `parseDurationMs("2s") === 2000`, `(90) === 90000`. */
export function parseDurationMs(v: unknown): number {
  return Number(parseDurationNs(v)) / 1e6;
}

/** Bytes in a Vault size: `parseSizeBytes("32MiB") === 33554432`, `("10MB") === 10000000`. */
export function parseSizeBytes(v: unknown): number {
  if (typeof v === 'number') return wholeNonNegative(v, 'size', SIZE_HINT);
  if (typeof v !== 'string') throw new Error(`invalid size ${describe(v)}: ${SIZE_HINT}`);
  const match = /^(\d+)(?:\.(\d+))?\s*([a-z]*)$/i.exec(v.trim());
  const perUnit = match ? BYTES_PER_UNIT[match[3]!.toLowerCase()] : undefined;
  if (!match || perUnit === undefined) throw new Error(`invalid size ${describe(v)}: ${SIZE_HINT}`);
  const bytes = scaleDecimal(match[1]!, match[2] ?? '', perUnit);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`invalid size ${describe(v)}: too large`);
  return Number(bytes);
}

/**
 * Go's `time.Duration.String()` for a number of seconds: 3600 → "1h0m0s", 2764800 → "768h0m0s",
 * 90 → "1m30s", 1.5 → "1.5s", 0.25 → "250ms", 0 → "0s". Negative values get a leading "-".
 */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) throw new Error(`cannot format ${seconds} as a duration`);
  const ns = secondsToNs(Math.abs(seconds));
  const text = ns < NS_PER_UNIT.s! ? formatSubSecond(ns) : formatHms(ns);
  return seconds < 0 && ns !== 0n ? `-${text}` : text;
}

function parseDurationNs(v: unknown): bigint {
  if (typeof v === 'number') return secondsToNs(wholeOrFractionalSeconds(v));
  if (typeof v !== 'string') throw new Error(`invalid duration ${describe(v)}: ${DURATION_HINT}`);
  const text = v.trim();
  if (text.startsWith('-')) throw new Error(`invalid duration ${describe(v)}: must not be negative`);
  const unsigned = text.startsWith('+') ? text.slice(1) : text;
  if (/^\d+$/.test(unsigned)) return BigInt(unsigned) * NS_PER_UNIT.s!;
  const ns = sumDurationComponents(unsigned);
  if (ns === undefined) throw new Error(`invalid duration ${describe(v)}: ${DURATION_HINT}`);
  return ns;
}

/** "1h30m" → nanoseconds, or undefined when the text is not a run of <number><unit> pairs. */
function sumDurationComponents(text: string): bigint | undefined {
  const component = /(\d*)(?:\.(\d*))?(ns|us|µs|μs|ms|s|m|h|d)/y;
  let total = 0n;
  let at = 0;
  while (at < text.length) {
    component.lastIndex = at;
    const match = component.exec(text);
    if (!match || (match[1] === '' && !match[2])) return undefined;
    total += scaleDecimal(match[1] || '0', match[2] ?? '', NS_PER_UNIT[match[3]!]!);
    at = component.lastIndex;
  }
  return at === 0 ? undefined : total;
}

/** `whole.fraction × perUnit`, truncated toward zero, computed exactly. */
function scaleDecimal(whole: string, fraction: string, perUnit: bigint): bigint {
  const scaledFraction = fraction === '' ? 0n : (BigInt(fraction) * perUnit) / 10n ** BigInt(fraction.length);
  return BigInt(whole) * perUnit + scaledFraction;
}

function wholeOrFractionalSeconds(v: number): number {
  if (!Number.isFinite(v)) throw new Error(`invalid duration ${v}: ${DURATION_HINT}`);
  if (v < 0) throw new Error(`invalid duration ${v}: must not be negative`);
  return v;
}

function wholeNonNegative(v: number, what: string, hint: string): number {
  if (!Number.isSafeInteger(v)) throw new Error(`invalid ${what} ${v}: ${hint}`);
  if (v < 0) throw new Error(`invalid ${what} ${v}: must not be negative`);
  return v;
}

/** Non-negative seconds → nanoseconds, exact for the whole part. */
function secondsToNs(seconds: number): bigint {
  const whole = Math.trunc(seconds);
  return BigInt(whole) * NS_PER_UNIT.s! + BigInt(Math.round((seconds - whole) * 1e9));
}

function formatSubSecond(ns: bigint): string {
  if (ns === 0n) return '0s';
  if (ns < NS_PER_UNIT.us!) return `${ns}ns`;
  if (ns < NS_PER_UNIT.ms!) return `${decimal(ns, NS_PER_UNIT.us!)}µs`;
  return `${decimal(ns, NS_PER_UNIT.ms!)}ms`;
}

function formatHms(ns: bigint): string {
  const totalSeconds = ns / NS_PER_UNIT.s!;
  const secondsPart = `${decimal(ns % NS_PER_UNIT.m!, NS_PER_UNIT.s!)}s`;
  if (totalSeconds < 60n) return secondsPart;
  const minutes = (totalSeconds / 60n) % 60n;
  const hours = totalSeconds / 3600n;
  return hours > 0n ? `${hours}h${minutes}m${secondsPart}` : `${minutes}m${secondsPart}`;
}

/** `value / unit` as a decimal string without trailing zeros: (1500n, 1000n) → "1.5". */
function decimal(value: bigint, unit: bigint): string {
  const whole = value / unit;
  const rest = value % unit;
  if (rest === 0n) return `${whole}`;
  const digits = unit.toString().length - 1;
  return `${whole}.${rest.toString().padStart(digits, '0').replace(/0+$/, '')}`;
}

function describe(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v);
  if (v === null || v === undefined) return String(v);
  if (typeof v === 'object') return Array.isArray(v) ? 'list' : 'object';
  return String(v);
}

import { formatDuration, parseDurationMs, parseDurationSeconds, parseSizeBytes } from '../../src/core/units';

describe('parseDurationSeconds / parseDurationMs', () => {
  it.each([
    ['90s', 90],
    ['1h30m', 5400],
    ['1h30m15s', 5415],
    ['72h', 259_200],
    ['1d', 86_400],
    ['1d12h', 129_600],
    ['7d', 604_800],
    ['1.5h', 5400],
    ['.5s', 0.5],
    ['500ms', 0.5],
    ['2s', 2],
    ['0', 0],
    ['0s', 0],
    ['+5m', 300],
    [' 10m ', 600],
    ['250us', 0.00025],
    ['250µs', 0.00025],
    ['1.1s', 1.1],
  ])('%j is %d seconds', (input, seconds) => {
    expect(parseDurationSeconds(input)).toBe(seconds);
  });

  it('reads whole numbers and digit strings as seconds', () => {
    expect(parseDurationSeconds(90)).toBe(90);
    expect(parseDurationSeconds('3600')).toBe(3600);
    expect(parseDurationSeconds(1.5)).toBe(1.5);
    expect(parseDurationMs(90)).toBe(90_000);
    expect(parseDurationMs('30')).toBe(30_000);
  });

  it('gives milliseconds exactly', () => {
    expect(parseDurationMs('500ms')).toBe(500);
    expect(parseDurationMs('2s')).toBe(2000);
    expect(parseDurationMs('1.1s')).toBe(1100);
    expect(parseDurationMs('1h')).toBe(3_600_000);
    expect(parseDurationMs('1500us')).toBe(1.5);
  });

  it.each([['abc'], [''], ['5'.repeat(3) + 'x'], ['1.5'], ['h'], ['.s'], ['5 s'], ['1h 30m'], ['1y'], ['s5']])(
    'rejects %j with a message naming what is accepted',
    (input) => {
      expect(() => parseDurationSeconds(input)).toThrow(/invalid duration .*expected a duration such as "90s"/);
    },
  );

  it('rejects negative durations', () => {
    expect(() => parseDurationSeconds('-5s')).toThrow('invalid duration "-5s": must not be negative');
    expect(() => parseDurationMs(-1)).toThrow('invalid duration -1: must not be negative');
  });

  it('rejects values that are not strings or numbers', () => {
    expect(() => parseDurationSeconds(true)).toThrow('invalid duration true');
    expect(() => parseDurationSeconds(null)).toThrow('invalid duration null');
    expect(() => parseDurationSeconds({})).toThrow('invalid duration object');
    expect(() => parseDurationSeconds(Number.NaN)).toThrow('invalid duration NaN');
    expect(() => parseDurationSeconds(Infinity)).toThrow('invalid duration Infinity');
  });
});

describe('parseSizeBytes', () => {
  it.each([
    ['32MiB', 32 * 1024 * 1024],
    ['10MB', 10_000_000],
    ['512KiB', 512 * 1024],
    ['1GiB', 1024 ** 3],
    ['1gib', 1024 ** 3],
    ['2 GB', 2_000_000_000],
    ['64mb', 64_000_000],
    ['1.5KiB', 1536],
    ['1.001KB', 1001],
    ['100', 100],
    ['100B', 100],
    ['4k', 4000],
    ['1Ki', 1024],
    ['1TiB', 1024 ** 4],
  ])('%j is %d bytes', (input, bytes) => {
    expect(parseSizeBytes(input)).toBe(bytes);
  });

  it('reads whole numbers as bytes', () => {
    expect(parseSizeBytes(0)).toBe(0);
    expect(parseSizeBytes(33_554_432)).toBe(33_554_432);
  });

  it.each([['lots'], [''], ['12XB'], ['MiB'], ['-5MB'], ['1,5MB']])('rejects %j', (input) => {
    expect(() => parseSizeBytes(input)).toThrow(/invalid size .*expected a size such as "32MiB"/);
  });

  it('rejects negative, fractional and non-numeric values', () => {
    expect(() => parseSizeBytes(-1)).toThrow('invalid size -1: must not be negative');
    expect(() => parseSizeBytes(1.5)).toThrow('invalid size 1.5');
    expect(() => parseSizeBytes(false)).toThrow('invalid size false');
    expect(() => parseSizeBytes('99999PiB')).toThrow('too large');
  });
});

describe('formatDuration', () => {
  it.each([
    [0, '0s'],
    [1, '1s'],
    [45, '45s'],
    [90, '1m30s'],
    [3600, '1h0m0s'],
    [5415, '1h30m15s'],
    [2_764_800, '768h0m0s'],
    [86_400, '24h0m0s'],
    [1.5, '1.5s'],
    [61.25, '1m1.25s'],
    [0.5, '500ms'],
    [0.0015, '1.5ms'],
    [0.000_002, '2µs'],
    [0.000_000_003, '3ns'],
    [-90, '-1m30s'],
  ])('%d seconds is %j', (seconds, text) => {
    expect(formatDuration(seconds)).toBe(text);
  });

  it('round-trips through parseDurationSeconds', () => {
    for (const seconds of [0, 1, 59, 60, 61, 3599, 3600, 86_399, 2_764_800, 0.25, 12.5]) {
      expect(parseDurationSeconds(formatDuration(seconds))).toBe(seconds);
    }
  });

  it('rejects non-finite input', () => {
    expect(() => formatDuration(Infinity)).toThrow('cannot format Infinity');
  });
});

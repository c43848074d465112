/** When the shipper lingers after a batch (replication { ship_linger, ship_linger_min_entries }). */
import { shouldLinger } from '../../src/replication/manager';

const LINGER_MS = 15;
const MIN = 16;

test.each([
  // [what, step, stopping, lingers]
  ['a batch at the threshold that reached the head', { sent: true, entries: 16, atHead: true }, false, true],
  ['a big batch that reached the head', { sent: true, entries: 900, atHead: true }, false, true],
  ['a small batch (light traffic ships at once)', { sent: true, entries: 15, atHead: true }, false, false],
  // A batch cut by the row or byte bound: its distinct keys (entries) may be far fewer than its
  // WAL rows, but the head is further on — a backlog, so no wait.
  ['a batch short of the head, however few its keys', { sent: true, entries: 20, atHead: false }, false, false],
  ['nothing sent', { sent: false }, false, false],
  ['stopping', { sent: true, entries: 100, atHead: true }, true, false],
] as const)('%s', (_what, step, stopping, lingers) => {
  expect(shouldLinger(step, LINGER_MS, MIN, stopping)).toBe(lingers);
});

test('ship_linger = "0s" turns it off', () => {
  expect(shouldLinger({ sent: true, entries: 100, atHead: true }, 0, MIN, false)).toBe(false);
});

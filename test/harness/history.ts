/**
 * A history checker for fault scenarios. Load: writer loops, each the only writer of its own keys
 * (so the writes of a key are totally ordered by issue), every value unique. Every attempt is
 * recorded: key, value, acknowledged or not, HTTP status (or the client error), X-Vault-Index.
 *
 * Verification on a cluster (primary or secondary), per key:
 *  - lost: an acknowledged write whose value is absent and not replaced by a LATER write of the
 *    same key (later = issued after it; an unacknowledged later write may have committed);
 *  - phantom: a value that was never written;
 *  - per key, acknowledged X-Vault-Index values increase (commit order = LSN order, invariant 2).
 * And positions: `PositionMonitor` samples last_wal / last_remote_wal and reports any decrease.
 *
 * `report()` collects one table row per scenario; `printTable()` prints them.
 */
import { vault } from '../helpers/http';
import { perfStatus } from '../helpers/replication';

export interface Attempt {
  key: string;
  value: string;
  seq: number;
  acked: boolean;
  status: number;
  /** Client-side failure (reset, refused, timeout), when no HTTP status came back. */
  error: string | null;
  index: number | null;
  at: number;
  addr: string;
  /** The start of the answer's body when it was not a 2xx. */
  detail?: string;
}

export interface WriteOptions {
  /** KV v1 mount path. */
  mount: string;
  /** Addresses to write to, chosen round robin per attempt (re-read every time: processes come and go). */
  targets: () => string[];
  token: (addr: string) => string;
  writers: number;
  keysPerWriter: number;
  /** Pause after each attempt. */
  pauseMs?: number;
  /** Client timeout per request. */
  timeoutMs?: number;
}

/** One write, by fetch with a timeout; never throws. */
async function put(addr: string, token: string, path: string, value: string, timeoutMs: number): Promise<{ status: number; error: string | null; index: number | null; body: any }> {
  try {
    const res = await fetch(`${addr}/v1/${path}`, {
      method: 'POST',
      headers: { 'X-Vault-Token': token, 'Content-Type': 'application/json' },
      body: JSON.stringify({ v: value }),
      signal: AbortSignal.timeout(timeoutMs),
    });
    const text = await res.text();
    let body: any = text;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      // keep text
    }
    const ix = res.headers.get('x-vault-index');
    return { status: res.status, error: null, index: ix !== null && /^\d+$/.test(ix) ? Number(ix) : null, body };
  } catch (err) {
    const e = err as Error & { cause?: { code?: string; message?: string } };
    return { status: -1, error: e.cause?.code ?? e.cause?.message ?? e.name ?? e.message, index: null, body: null };
  }
}

export class History {
  readonly attempts: Attempt[] = [];
  /** Per key, the values written, in issue order. */
  private readonly byKey = new Map<string, Attempt[]>();
  private stopped = true;
  private loops: Promise<void>[] = [];
  private rr = 0;
  private seq = 0;
  /** Unexpected answers (a 5xx is recorded here with its body, for the scenario to judge). */
  readonly answers = new Map<string, number>();

  constructor(readonly scenario: string) {}

  start(o: WriteOptions): void {
    this.stopped = false;
    this.loops.push(...Array.from({ length: o.writers }, (_, w) => this.loop(o, this.loops.length + w)));
  }

  private async loop(o: WriteOptions, w: number): Promise<void> {
    for (let i = 0; !this.stopped; i++) {
      const targets = o.targets();
      if (!targets.length) {
        await new Promise((r) => setTimeout(r, 20));
        continue;
      }
      const addr = targets[this.rr++ % targets.length];
      const key = `${this.scenario}/w${w}/k${i % o.keysPerWriter}`;
      const seq = this.seq++;
      const value = `${this.scenario}:${w}:${seq}`;
      const r = await put(addr, o.token(addr), `${o.mount}/${key}`, value, o.timeoutMs ?? 10_000);
      this.recordAttempt({ key, value, seq, acked: r.status >= 200 && r.status < 300, status: r.status, error: r.error, index: r.index, at: Date.now(), addr, detail: r.status >= 300 ? JSON.stringify(r.body).slice(0, 200) : undefined });
      const label = r.error ? `error ${r.error}` : String(r.status);
      this.answers.set(label, (this.answers.get(label) ?? 0) + 1);
      if (o.pauseMs) await new Promise((res) => setTimeout(res, o.pauseMs));
    }
  }

  recordAttempt(a: Attempt): void {
    this.attempts.push(a);
    const list = this.byKey.get(a.key) ?? [];
    list.push(a);
    this.byKey.set(a.key, list);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
    this.loops = [];
  }

  get acked(): number {
    return this.attempts.filter((a) => a.acked).length;
  }

  /** Attempts with a given outcome label ("200", "503", "error ECONNRESET", ...). */
  count(pred: (a: Attempt) => boolean): number {
    return this.attempts.filter(pred).length;
  }

  /** Number of acknowledged writes so far (for waits). */
  ackedSince(t: number): number {
    return this.attempts.filter((a) => a.acked && a.at >= t).length;
  }

  /**
   * Reads every key written on `addr` (KV v1 at `mount`) and checks it against the history.
   * Returns the problems (empty: none).
   */
  async verify(where: string, addr: string, token: string, mount: string, concurrency = 8): Promise<{ lost: string[]; phantom: string[]; indexOrder: string[]; keys: number }> {
    const keys = [...this.byKey.keys()];
    const lost: string[] = [];
    const phantom: string[] = [];
    const indexOrder: string[] = [];
    let next = 0;
    const worker = async () => {
      for (let i = next++; i < keys.length; i = next++) {
        const key = keys[i];
        const writes = this.byKey.get(key)!;
        const r = await vault(addr, 'GET', `${mount}/${key}`, { token });
        if (r.status !== 200 && r.status !== 404) throw new Error(`${where}: reading ${key}: ${r.status} ${JSON.stringify(r.body)}`);
        const got: string | null = r.status === 200 ? (r.body?.data?.v ?? null) : null;
        const pos = got === null ? -1 : writes.findIndex((a) => a.value === got);
        if (got !== null && pos < 0) phantom.push(`${where} ${key} = ${got}`);
        let lastAcked = -1;
        writes.forEach((a, j) => {
          if (a.acked) lastAcked = j;
        });
        if (lastAcked >= 0 && pos < lastAcked) lost.push(`${where} ${key}: acked ${writes[lastAcked].value}, found ${got ?? 'nothing'}`);
        let prev = -1;
        for (const a of writes) {
          if (!a.acked || a.index === null) continue;
          if (a.index <= prev) indexOrder.push(`${key}: X-Vault-Index ${a.index} after ${prev}`);
          prev = a.index;
        }
      }
    };
    await Promise.all(Array.from({ length: concurrency }, worker));
    return { lost, phantom, indexOrder, keys: keys.length };
  }
}

/** Samples a cluster's replication positions and reports any that went backwards. */
export class PositionMonitor {
  readonly decreases: string[] = [];
  samples = 0;
  private last = { wal: -1, remote: -1 };
  private stopped = false;
  private readonly loop: Promise<void>;

  constructor(
    private readonly what: string,
    private readonly addrs: () => string[],
    intervalMs = 100,
  ) {
    this.loop = (async () => {
      let i = 0;
      while (!this.stopped) {
        const list = this.addrs();
        const addr = list[i++ % Math.max(1, list.length)];
        if (addr) {
          const st = await perfStatus(addr).catch(() => null);
          if (st) {
            this.samples++;
            const wal = Number(st.last_wal ?? 0);
            const remote = Number(st.last_remote_wal ?? 0);
            if (wal < this.last.wal) this.decreases.push(`${this.what} last_wal ${this.last.wal} → ${wal} (${addr})`);
            if (remote < this.last.remote) this.decreases.push(`${this.what} last_remote_wal ${this.last.remote} → ${remote} (${addr})`);
            this.last = { wal: Math.max(wal, this.last.wal), remote: Math.max(remote, this.last.remote) };
          }
        }
        await new Promise((r) => setTimeout(r, intervalMs));
      }
    })();
  }

  async stop(): Promise<string[]> {
    this.stopped = true;
    await this.loop;
    return this.decreases;
  }
}

export interface Row {
  scenario: string;
  attempts: number;
  acked: number;
  lost: number;
  phantom: number;
  convergenceMs: number | null;
  notes: string;
}

export const table: Row[] = [];

export function report(row: Row): void {
  table.push(row);
  // eslint-disable-next-line no-console
  console.log(`[faults] ${row.scenario}: ${row.acked}/${row.attempts} acked, lost ${row.lost}, phantom ${row.phantom}, convergence ${row.convergenceMs ?? '-'} ms. ${row.notes}`);
}

export function printTable(rows: Row[] = table): string {
  const head = ['scenario', 'attempts', 'acked', 'lost', 'phantom', 'converge ms', 'notes'];
  const body = rows.map((r) => [r.scenario, String(r.attempts), String(r.acked), String(r.lost), String(r.phantom), r.convergenceMs === null ? '-' : String(r.convergenceMs), r.notes]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => '| ' + cells.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |';
  const out = [line(head), '|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|', ...body.map(line)].join('\n');
  // eslint-disable-next-line no-console
  console.log(`[faults] results\n${out}`);
  return out;
}

/**
 * A small closed-loop HTTP load generator (keep-alive, fixed concurrency) and an open-loop
 * variant at a target rate, both reporting throughput and latency percentiles.
 */
import http from 'node:http';

export interface LoadResult {
  requests: number;
  errors: number;
  seconds: number;
  perSecond: number;
  p50Ms: number;
  p99Ms: number;
}

export interface RequestSpec {
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: string;
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

function once(agent: http.Agent, base: URL, spec: RequestSpec): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { agent, host: base.hostname, port: base.port, method: spec.method, path: spec.path, headers: { ...(spec.headers ?? {}), ...(spec.body ? { 'content-length': Buffer.byteLength(spec.body) } : {}) } },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      },
    );
    req.on('error', reject);
    if (spec.body) req.write(spec.body);
    req.end();
  });
}

function summarise(lat: number[], errors: number, seconds: number): LoadResult {
  lat.sort((a, b) => a - b);
  return { requests: lat.length, errors, seconds, perSecond: lat.length / seconds, p50Ms: percentile(lat, 50), p99Ms: percentile(lat, 99) };
}

/** `concurrency` loops, each sending the next request as soon as the previous answered. */
export async function closedLoop(baseUrl: string, concurrency: number, seconds: number, next: (i: number) => RequestSpec): Promise<LoadResult> {
  const base = new URL(baseUrl);
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const lat: number[] = [];
  let errors = 0;
  let counter = 0;
  const end = Date.now() + seconds * 1000;
  const started = process.hrtime.bigint();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (Date.now() < end) {
        const t0 = process.hrtime.bigint();
        try {
          const status = await once(agent, base, next(counter++));
          if (status >= 400) errors++;
          else lat.push(Number(process.hrtime.bigint() - t0) / 1e6);
        } catch {
          errors++;
        }
      }
    }),
  );
  const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
  agent.destroy();
  return summarise(lat, errors, elapsed);
}

/**
 * Open-loop pacing: starts `start(i, due)` for i = 0 … rate·seconds−1 at `due` (performance.now()
 * time), whatever earlier ones are doing, and waits for all of them.
 */
export async function paced(rate: number, seconds: number, start: (i: number, due: number) => Promise<void>): Promise<void> {
  const total = Math.floor(rate * seconds);
  const started = performance.now();
  const inflight: Promise<void>[] = [];
  for (let i = 0; i < total; i++) {
    const due = started + (i * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 1) await new Promise((r) => setTimeout(r, wait));
    inflight.push(start(i, due));
  }
  await Promise.all(inflight);
}

/** Requests started at a fixed rate regardless of answers (latency without coordinated omission). */
export async function openLoop(baseUrl: string, ratePerSecond: number, seconds: number, next: (i: number) => RequestSpec): Promise<LoadResult> {
  const base = new URL(baseUrl);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
  const lat: number[] = [];
  let errors = 0;
  const started = Date.now();
  await paced(ratePerSecond, seconds, (i, due) => {
    const t0 = Date.now() + (due - performance.now());
    return once(agent, base, next(i)).then(
      (status) => {
        if (status >= 400) errors++;
        else lat.push(Date.now() - t0);
      },
      () => {
        errors++;
      },
    );
  });
  agent.destroy();
  return summarise(lat, errors, (Date.now() - started) / 1000);
}

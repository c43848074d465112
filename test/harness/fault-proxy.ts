/**
 * A small TCP fault proxy (the toxiproxy model, in-process: Node has no toxiproxy here).
 *
 * It sits between two parties (a secondary and its primary's API, a primary and a secondary's
 * API, a cluster and its Postgres) and, per direction, can add latency (+ seeded jitter), throttle
 * bandwidth, reset connections at random (RST, via socket.resetAndDestroy) or after N bytes
 * (toxiproxy's limit_data + reset_peer: a cut in the middle of a stream). Per proxy it can cut
 * (close every connection now and refuse new ones: a partition, as seen from userspace),
 * half-open (accept connections but never forward a byte either way: a black hole for the
 * connections, which only the peer's own timeouts end), and heal. Counters say what it did.
 *
 * "upstream" = client → target (requests), "downstream" = target → client (answers).
 *
 * Several targets make it a fail-over load balancer: a new connection goes to the next target
 * round robin, skipping one that refuses the connection.
 *
 * Replay: `capture()` records whole HTTP/1.1 requests going upstream (head + Content-Length body;
 * a chunked request is not captured), optionally only those a predicate keeps; `replay()` and
 * `replayAll()` re-send the exact bytes of captured requests later, each on a new connection
 * straight to a target (bypassing mode and toxics), once or several times, in captured order,
 * reversed or shuffled (seeded), and return the answers. A duplicated, redelivered or reordered
 * request, as a faulty network or a confused peer would produce.
 *
 * Everything random draws from the seeded rng handed in, so a run can be replayed (as far as
 * timing lets a multi-process test be replayed).
 */
import net, { type AddressInfo } from 'node:net';

export type Direction = 'upstream' | 'downstream';

export interface Toxics {
  /** Added to every chunk's delivery, in ms. */
  latencyMs?: number;
  /** Uniform ± jitter around latencyMs, in ms (seeded). */
  jitterMs?: number;
  /** Bytes per second (0 or absent: unlimited). */
  bandwidthBps?: number;
  /** Probability, per chunk, that the connection is reset (both ends) instead of forwarding it. */
  resetProbability?: number;
  /**
   * Reset a connection once this many bytes went this way on it (the bytes before are forwarded,
   * the rest never): a cut mid-stream. A function is called once per connection (seeded offsets).
   */
  limitBytes?: number | (() => number);
}

export interface ProxyCounters {
  accepted: number;
  /** Connections refused or dropped at once because the proxy was cut. */
  refused: number;
  /** Connections held without forwarding (half-open). */
  blackholed: number;
  /** Connections that could not reach any target. */
  upstreamFailures: number;
  bytesUpstream: number;
  bytesDownstream: number;
  /** Connections reset by a toxic (random or limitBytes). */
  resets: number;
  /** Connections closed by cut(). */
  cutConnections: number;
  active: number;
}

type Mode = 'open' | 'cut' | 'half-open';

/** One whole HTTP request seen going upstream (client → target). */
export interface CapturedRequest {
  /** Capture order (0, 1, …), over all connections of the proxy. */
  seq: number;
  at: number;
  /** Which accepted connection carried it (1, 2, …). */
  conn: number;
  method: string;
  path: string;
  /** Header names lowercased (last value wins). */
  headers: Record<string, string>;
  body: Buffer;
  /** The exact bytes on the wire: head, blank line, body. */
  raw: Buffer;
}

export interface ReplayResponse {
  status: number;
  headers: Record<string, string>;
  body: string;
  /** The body parsed as JSON, or null. */
  json: any;
}

export interface ReplayOptions {
  /** How many times each request is sent (default 1). */
  times?: number;
  /** Order of the requests (repeats of one request stay together unless shuffled). */
  order?: 'captured' | 'reverse' | 'shuffle';
  /** Where to send (default: the proxy's first target). */
  target?: { host: string; port: number };
  /** Per request, in ms (default 15 s). */
  timeoutMs?: number;
}

/** Incremental parser of HTTP/1.1 requests on one connection (Content-Length bodies only). */
class RequestParser {
  private buf: Buffer = Buffer.alloc(0);
  private broken = false;

  constructor(private readonly emit: (r: Omit<CapturedRequest, 'seq' | 'at' | 'conn'>) => void) {}

  push(chunk: Buffer): void {
    if (this.broken || !chunk.length) return;
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      const headEnd = this.buf.indexOf('\r\n\r\n');
      if (headEnd < 0) {
        if (this.buf.length > 64 * 1024) this.broken = true; // not HTTP as we know it
        return;
      }
      const lines = this.buf.subarray(0, headEnd).toString('latin1').split('\r\n');
      const [method, path] = lines[0].split(' ');
      const headers: Record<string, string> = {};
      for (const l of lines.slice(1)) {
        const i = l.indexOf(':');
        if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
      }
      if (headers['transfer-encoding'] && !/^identity$/i.test(headers['transfer-encoding'])) {
        this.broken = true; // chunked: not captured (stop parsing this connection)
        return;
      }
      const len = Number(headers['content-length'] ?? 0);
      if (!Number.isInteger(len) || len < 0) {
        this.broken = true;
        return;
      }
      const total = headEnd + 4 + len;
      if (this.buf.length < total) return;
      const raw = Buffer.from(this.buf.subarray(0, total));
      this.buf = this.buf.subarray(total);
      this.emit({ method: method ?? '', path: path ?? '', headers, body: raw.subarray(headEnd + 4), raw });
    }
  }
}

export interface Rng {
  next(): number;
}

interface Pipe {
  client: net.Socket;
  upstream: net.Socket | null;
  bytes: Record<Direction, number>;
  limits: Record<Direction, number>;
  closed: boolean;
  id: number;
  parser: RequestParser | null;
}

/** Resets a socket with RST where Node supports it (>= 16.17 / 18.3), else destroys it. */
export function resetSocket(s: net.Socket): void {
  const r = (s as net.Socket & { resetAndDestroy?: () => void }).resetAndDestroy;
  if (typeof r === 'function' && !s.destroyed && s.readyState !== 'opening') {
    try {
      r.call(s);
      return;
    } catch {
      // fall through
    }
  }
  s.destroy();
}

export class FaultProxy {
  readonly counters: ProxyCounters = { accepted: 0, refused: 0, blackholed: 0, upstreamFailures: 0, bytesUpstream: 0, bytesDownstream: 0, resets: 0, cutConnections: 0, active: 0 };
  private readonly toxics: Record<Direction, Toxics> = { upstream: {}, downstream: {} };
  private readonly pipes = new Set<Pipe>();
  private server: net.Server | null = null;
  private mode: Mode = 'open';
  private nextTarget = 0;
  private capturing: ((r: CapturedRequest) => boolean) | null = null;
  private nextConn = 0;
  /** Requests recorded since `capture()` (cleared by `capture()` and `stopCapture(true)`). */
  readonly captured: CapturedRequest[] = [];
  /** Requests sent by replay(). */
  replayed = 0;
  port = 0;

  constructor(
    public targets: { host: string; port: number }[],
    private readonly rng: Rng,
    readonly name = 'proxy',
  ) {}

  /** A proxy to `http://host:port` style addresses. */
  static forUrls(urls: string[], rng: Rng, name?: string): FaultProxy {
    return new FaultProxy(urls.map(parseHostPort), rng, name);
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get state(): Mode {
    return this.mode;
  }

  async listen(port = this.port): Promise<void> {
    const server = net.createServer({ allowHalfOpen: false, noDelay: true }, (c) => this.accept(c));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', () => undefined);
    this.server = server;
    this.port = (server.address() as AddressInfo).port;
  }

  /** Sets (replaces) the toxics of one direction or both. */
  setToxics(dir: Direction | 'both', t: Toxics): void {
    for (const d of dir === 'both' ? (['upstream', 'downstream'] as const) : [dir]) this.toxics[d] = { ...t };
  }

  clearToxics(): void {
    this.toxics.upstream = {};
    this.toxics.downstream = {};
  }

  /**
   * A partition: every connection is closed now (reset) and new ones are refused (the listener
   * stops: ECONNREFUSED, as for a process or host that is down).
   */
  async cut(): Promise<void> {
    this.mode = 'cut';
    const server = this.server;
    this.server = null;
    const closed = server ? new Promise<void>((r) => server.close(() => r())) : Promise.resolve();
    for (const p of [...this.pipes]) {
      this.counters.cutConnections++;
      this.closePipe(p, true);
    }
    await closed;
  }

  /** Accept connections but forward nothing either way, and stop forwarding on open ones. */
  async halfOpen(): Promise<void> {
    if (!this.server) await this.listen();
    this.mode = 'half-open';
    for (const p of this.pipes) {
      p.client.pause();
      p.upstream?.pause();
    }
  }

  /** Back to forwarding (toxics stay as set): a cut proxy listens again on the same port. */
  async heal(): Promise<void> {
    const wasHalf = this.mode === 'half-open';
    this.mode = 'open';
    if (!this.server) await this.listen();
    if (wasHalf) {
      // Held connections never got their data through: close them, as a peer would time out.
      for (const p of [...this.pipes]) this.closePipe(p, true);
    }
  }

  /**
   * Starts recording whole HTTP requests going upstream on every connection accepted from now
   * on (and on open ones, from their next request head: a connection mid-request is picked up at
   * the first complete head found). `keep` filters (e.g. by path); the list starts empty.
   */
  capture(keep: ((r: CapturedRequest) => boolean) | string = () => true): void {
    this.captured.length = 0;
    this.capturing = typeof keep === 'string' ? (r) => r.path.startsWith(keep) : keep;
    for (const p of this.pipes) p.parser ??= this.parserFor(p);
  }

  /** Stops recording; returns what was captured (and forgets it if `clear`). */
  stopCapture(clear = false): CapturedRequest[] {
    this.capturing = null;
    for (const p of this.pipes) p.parser = null;
    const out = [...this.captured];
    if (clear) this.captured.length = 0;
    return out;
  }

  private parserFor(p: Pipe): RequestParser {
    return new RequestParser((r) => {
      const full: CapturedRequest = { ...r, seq: -1, at: Date.now(), conn: p.id };
      if (this.capturing && this.capturing(full)) {
        full.seq = this.captured.length;
        this.captured.push(full);
      }
    });
  }

  /**
   * Re-sends one captured request's exact bytes on a new connection straight to a target
   * (bypassing the proxy's mode and toxics), `times` times in a row; the answers in order.
   */
  async replay(req: CapturedRequest, o: Omit<ReplayOptions, 'order'> = {}): Promise<ReplayResponse[]> {
    const out: ReplayResponse[] = [];
    for (let i = 0; i < (o.times ?? 1); i++) out.push(await this.sendRaw(req.raw, o.target ?? this.targets[0], o.timeoutMs ?? 15_000));
    return out;
  }

  /** Replays several requests (each `times` times), in the order asked, one after the other. */
  async replayAll(reqs: CapturedRequest[], o: ReplayOptions = {}): Promise<{ req: CapturedRequest; res: ReplayResponse }[]> {
    let list: CapturedRequest[] = [];
    for (const r of reqs) for (let i = 0; i < (o.times ?? 1); i++) list.push(r);
    if (o.order === 'reverse') list.reverse();
    else if (o.order === 'shuffle') {
      list = [...list];
      for (let i = list.length - 1; i > 0; i--) {
        const j = Math.floor(this.rng.next() * (i + 1));
        [list[i], list[j]] = [list[j], list[i]];
      }
    }
    const out: { req: CapturedRequest; res: ReplayResponse }[] = [];
    for (const req of list) out.push({ req, res: (await this.replay(req, { target: o.target, timeoutMs: o.timeoutMs }))[0] });
    return out;
  }

  /** Writes raw request bytes on a fresh connection and reads one HTTP response. */
  private sendRaw(raw: Buffer, target: { host: string; port: number }, timeoutMs: number): Promise<ReplayResponse> {
    this.replayed++;
    return new Promise<ReplayResponse>((resolve, reject) => {
      const s = net.connect({ host: target.host, port: target.port, noDelay: true });
      let buf: Buffer = Buffer.alloc(0);
      let done = false;
      const finish = (err: Error | null, res?: ReplayResponse) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        s.destroy();
        if (err) reject(err);
        else resolve(res!);
      };
      const timer = setTimeout(() => finish(new Error(`replay to ${target.host}:${target.port}: no complete answer in ${timeoutMs} ms`)), timeoutMs);
      const tryParse = (eof: boolean) => {
        const r = parseResponse(buf, eof);
        if (r) finish(null, r);
        else if (eof) finish(new Error(`replay to ${target.host}:${target.port}: connection closed before a complete answer (${buf.length} bytes)`));
      };
      s.on('error', (e) => finish(e));
      s.on('connect', () => s.write(raw));
      s.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        tryParse(false);
      });
      s.on('end', () => tryParse(true));
      s.on('close', () => tryParse(true));
    });
  }

  /** Resets every open connection now (RST), without refusing new ones. */
  resetAll(): number {
    const n = this.pipes.size;
    for (const p of [...this.pipes]) {
      this.counters.resets++;
      this.closePipe(p, true);
    }
    return n;
  }

  /** Stops the proxy for good: resets every connection and stops listening. */
  async shutdown(): Promise<void> {
    this.mode = 'cut';
    const server = this.server;
    this.server = null;
    const closed = server ? new Promise<void>((r) => server.close(() => r())) : Promise.resolve();
    for (const q of [...this.pipes]) this.closePipe(q, true);
    await closed;
  }

  private closePipe(p: Pipe, reset: boolean): void {
    if (p.closed) return;
    p.closed = true;
    this.pipes.delete(p);
    this.counters.active = this.pipes.size;
    for (const s of [p.client, p.upstream]) {
      if (!s) continue;
      if (reset) resetSocket(s);
      else s.destroy();
    }
  }

  private limitFor(d: Direction): number {
    const l = this.toxics[d].limitBytes;
    if (l === undefined) return Infinity;
    return typeof l === 'function' ? l() : l;
  }

  private accept(client: net.Socket): void {
    client.on('error', () => undefined);
    if (this.mode === 'cut') {
      this.counters.refused++;
      resetSocket(client);
      return;
    }
    this.counters.accepted++;
    const p: Pipe = { client, upstream: null, bytes: { upstream: 0, downstream: 0 }, limits: { upstream: this.limitFor('upstream'), downstream: this.limitFor('downstream') }, closed: false, id: ++this.nextConn, parser: null };
    if (this.capturing) p.parser = this.parserFor(p);
    this.pipes.add(p);
    this.counters.active = this.pipes.size;
    client.on('close', () => this.closePipe(p, false));
    if (this.mode === 'half-open') {
      this.counters.blackholed++;
      client.pause();
      return;
    }
    this.connectUpstream(p, client, 0);
  }

  private connectUpstream(p: Pipe, client: net.Socket, attempt: number): void {
    if (attempt >= this.targets.length) {
      this.counters.upstreamFailures++;
      this.closePipe(p, true);
      return;
    }
    const target = this.targets[this.nextTarget++ % this.targets.length];
    const up = net.connect({ host: target.host, port: target.port, noDelay: true });
    let connected = false;
    up.on('error', () => {
      if (!connected && !p.closed) {
        up.destroy();
        this.connectUpstream(p, client, attempt + 1);
      }
    });
    up.once('connect', () => {
      connected = true;
      if (p.closed) return void up.destroy();
      p.upstream = up;
      up.on('error', () => this.closePipe(p, true));
      up.on('close', () => this.closePipe(p, false));
      // End-of-stream in either direction ends the other once pending data is delivered.
      this.pump(p, client, up, 'upstream');
      this.pump(p, up, client, 'downstream');
      if (this.mode === 'half-open') {
        client.pause();
        up.pause();
      }
    });
  }

  /**
   * Forwards `from` → `to` through the direction's toxics. Chunks keep their order (one FIFO,
   * one timer): each is delivered at max(arrival + latency ± jitter, previous delivery) + its
   * transmission time at the throttled bandwidth.
   */
  private pump(p: Pipe, from: net.Socket, to: net.Socket, d: Direction): void {
    const HIGH_WATER = 1 << 20;
    const fifo: { data: Buffer; at: number; resetAfter: boolean }[] = [];
    let queuedBytes = 0;
    let lastDelivery = 0;
    let ended = false;
    let timer: NodeJS.Timeout | null = null;
    const drain = () => {
      timer = null;
      if (p.closed) return;
      const now = Date.now();
      while (fifo.length && fifo[0].at <= now) {
        const item = fifo.shift()!;
        queuedBytes -= item.data.length;
        if (item.data.length) to.write(item.data);
        if (item.resetAfter) {
          this.counters.resets++;
          // Let the kernel take the bytes written, then RST both sides.
          setImmediate(() => this.closePipe(p, true));
          return;
        }
      }
      if (fifo.length) timer = setTimeout(drain, fifo[0].at - now);
      else if (ended) to.end();
      if (queuedBytes < HIGH_WATER / 2 && from.isPaused() && this.mode === 'open') from.resume();
    };
    from.on('data', (chunk: Buffer) => {
      if (p.closed || this.mode === 'half-open') return; // half-open: swallowed, a black hole
      const t = this.toxics[d];
      if (t.resetProbability && this.rng.next() < t.resetProbability) {
        this.counters.resets++;
        this.closePipe(p, true);
        return;
      }
      let data = chunk;
      let resetAfter = false;
      if (p.bytes[d] + data.length >= p.limits[d]) {
        data = data.subarray(0, Math.max(0, p.limits[d] - p.bytes[d]));
        resetAfter = true;
        from.pause();
      }
      p.bytes[d] += data.length;
      // Only bytes actually forwarded are captured: a request cut mid-stream is never complete.
      if (d === 'upstream' && p.parser) p.parser.push(data);
      if (d === 'upstream') this.counters.bytesUpstream += data.length;
      else this.counters.bytesDownstream += data.length;
      const now = Date.now();
      const latency = Math.max(0, (t.latencyMs ?? 0) + (t.jitterMs ? (this.rng.next() * 2 - 1) * t.jitterMs : 0));
      const txMs = t.bandwidthBps ? (data.length / t.bandwidthBps) * 1000 : 0;
      lastDelivery = Math.max(now + latency, lastDelivery) + txMs;
      fifo.push({ data, at: lastDelivery, resetAfter });
      queuedBytes += data.length;
      if (queuedBytes > HIGH_WATER) from.pause();
      if (!timer) {
        if (fifo[0].at <= now) drain();
        else timer = setTimeout(drain, fifo[0].at - now);
      }
    });
    from.on('end', () => {
      ended = true;
      if (!fifo.length && !p.closed) to.end();
    });
  }
}

/** One HTTP/1.1 response from the start of `buf` (Content-Length, chunked, or up to EOF); null if incomplete. */
export function parseResponse(buf: Buffer, eof: boolean): ReplayResponse | null {
  const headEnd = buf.indexOf('\r\n\r\n');
  if (headEnd < 0) return null;
  const lines = buf.subarray(0, headEnd).toString('latin1').split('\r\n');
  const status = Number(lines[0].split(' ')[1]);
  const headers: Record<string, string> = {};
  for (const l of lines.slice(1)) {
    const i = l.indexOf(':');
    if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
  }
  let rest = buf.subarray(headEnd + 4);
  let body: Buffer;
  if (/chunked/i.test(headers['transfer-encoding'] ?? '')) {
    const parts: Buffer[] = [];
    for (;;) {
      const eol = rest.indexOf('\r\n');
      if (eol < 0) return null;
      const size = parseInt(rest.subarray(0, eol).toString('latin1'), 16);
      if (Number.isNaN(size)) return null;
      if (size === 0) break;
      if (rest.length < eol + 2 + size + 2) return null;
      parts.push(rest.subarray(eol + 2, eol + 2 + size));
      rest = rest.subarray(eol + 2 + size + 2);
    }
    body = Buffer.concat(parts);
  } else if (headers['content-length'] !== undefined) {
    const len = Number(headers['content-length']);
    if (rest.length < len) return null;
    body = rest.subarray(0, len);
  } else if (status === 204 || status === 304 || (status >= 100 && status < 200)) {
    body = Buffer.alloc(0);
  } else {
    if (!eof) return null;
    body = rest;
  }
  const text = body.toString('utf8');
  let json: any = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  return { status, headers, body: text, json };
}

export function parseHostPort(url: string): { host: string; port: number } {
  const u = new URL(url.includes('://') ? url : `tcp://${url}`);
  return { host: u.hostname, port: Number(u.port) };
}

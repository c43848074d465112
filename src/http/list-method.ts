/**
 * Accepting Vault's non-standard `LIST` HTTP method.
 *
 * Vault clients (`curl -X LIST`, the Vault CLI, node-vault) send requests such as
 * `LIST /v1/secret/metadata/ HTTP/1.1`. Node's HTTP parser, llhttp, recognises methods from
 * a table compiled into it and answers any other method with HPE_INVALID_METHOD / 400
 * before JavaScript ever sees the request; there is no option to extend that table
 * (nodejs/node#17248). Vault itself treats `LIST /p` exactly like `GET /p?list=true`, so
 * we make that translation below the parser.
 *
 * A plain `net.Server` (or `tls.Server`) accepts each connection and wraps its socket in a
 * `ListRewritingSocket`: a Duplex that passes bytes through unchanged except for request
 * lines starting with `LIST `, which become `GET <target>?list=true` (or `&list=true` when
 * the target already has a query). The wrapped socket is handed to an ordinary
 * `http.Server` with `emit('connection', ...)`, so everything above it — Express, timeouts,
 * keep-alive, `Expect: 100-continue` — is stock Node.
 *
 * To rewrite request lines and nothing else (a request body may well contain the text
 * `LIST /x HTTP/1.1`), `ListRequestRewriter` follows HTTP/1.1 message framing: it reads
 * each head, then skips exactly the body that head announces (Content-Length bytes, or a
 * chunked body with its chunk sizes, extensions and trailers). Bytes are streamed through
 * as they arrive; only the first five bytes of a request line are held back, until it is
 * clear whether they spell `LIST `. Whatever llhttp would reject (conflicting framing
 * headers, malformed chunk sizes, oversized heads) switches the rewriter to pass
 * everything through untouched, leaving the rejection to llhttp, which closes the
 * connection. After a CONNECT or an accepted Upgrade the rest of the stream is another
 * protocol and is passed through as well.
 */
import * as http from 'node:http';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { Duplex } from 'node:stream';

export interface ListenOptions {
  host: string;
  port: number;
  tls?: { cert: Buffer; key: Buffer };
  requestTimeoutMs?: number;
  headersTimeoutMs?: number;
  keepAliveTimeoutMs?: number;
}

export interface RunningListener {
  address: { host: string; port: number };
  httpServer: http.Server;
  /** Stops accepting, ends idle keep-alive connections, waits for in-flight requests, then resolves. */
  close(): Promise<void>;
}

/** Vault's default max_request_duration. */
const DEFAULT_REQUEST_TIMEOUT_MS = 90_000;
const DEFAULT_HEADERS_TIMEOUT_MS = 60_000;
const DEFAULT_KEEP_ALIVE_TIMEOUT_MS = 5_000;

/** Past this many bytes in one head (or chunk-size line, or trailer block) we stop tracking. */
const MAX_SECTION_BYTES = 64 * 1024;

const LIST_PREFIX = 'LIST ';
const GET_PREFIX = Buffer.from('GET ', 'latin1');
const LIST_QUERY_FIRST = Buffer.from('?list=true', 'latin1');
const LIST_QUERY_NEXT = Buffer.from('&list=true', 'latin1');

const CR = 0x0d;
const LF = 0x0a;
const SP = 0x20;
const HASH = 0x23;
const QUESTION = 0x3f;

// ---------------------------------------------------------------------------------------
// Framing: what follows a request head
// ---------------------------------------------------------------------------------------

/** The parts of a request head that decide where the next request starts. */
interface RequestHead {
  method: string;
  contentLength: string[];
  transferEncoding: string[];
  connection: string[];
  upgrade: boolean;
}

/** The headers whose values (possibly repeated, possibly folded) we keep. */
type ListedHeader = 'contentLength' | 'transferEncoding' | 'connection';

type BodyFraming =
  | { kind: 'length'; bytes: number }
  | { kind: 'chunked' }
  /** Not HTTP/1.1 requests any more: a tunnel, an upgrade, or something llhttp rejects. */
  | { kind: 'opaque' };

function emptyHead(): RequestHead {
  return { method: '', contentLength: [], transferEncoding: [], connection: [], upgrade: false };
}

function listTokens(values: string[]): string[] {
  return values
    .join(',')
    .split(',')
    .map((token) => token.trim().toLowerCase())
    .filter((token) => token !== '');
}

/** Mirrors llhttp's strict (non-lenient) rules for request bodies. */
function bodyFraming(head: RequestHead, upgradeAccepted: boolean): BodyFraming {
  if (head.method === 'CONNECT') return { kind: 'opaque' };
  if (upgradeAccepted && head.upgrade && listTokens(head.connection).includes('upgrade')) {
    return { kind: 'opaque' };
  }
  if (head.transferEncoding.length > 0) {
    // llhttp rejects Content-Length alongside Transfer-Encoding, and request codings not ending in chunked.
    if (head.contentLength.length > 0) return { kind: 'opaque' };
    const codings = listTokens(head.transferEncoding);
    return codings[codings.length - 1] === 'chunked' ? { kind: 'chunked' } : { kind: 'opaque' };
  }
  if (head.contentLength.length === 0) return { kind: 'length', bytes: 0 };
  // llhttp rejects duplicate Content-Length headers and anything but digits.
  const value = head.contentLength[0];
  if (head.contentLength.length > 1 || !/^\d{1,15}$/.test(value)) return { kind: 'opaque' };
  return { kind: 'length', bytes: Number(value) };
}

/** Parses a chunk-size line (`1a;name=value`); undefined when llhttp would reject it. */
function chunkSize(line: string): number | undefined {
  const semicolon = line.indexOf(';');
  const size = (semicolon === -1 ? line : line.slice(0, semicolon)).trimEnd();
  return /^[0-9a-fA-F]{1,12}$/.test(size) ? parseInt(size, 16) : undefined;
}

// ---------------------------------------------------------------------------------------
// The byte-stream rewriter
// ---------------------------------------------------------------------------------------

/** Collects one chunk's output: runs of the input chunk, interleaved with inserted bytes. */
class Output {
  private readonly parts: Buffer[] = [];
  private runStart = 0;
  private runEnd = 0;

  constructor(private readonly chunk: Buffer) {}

  pass(start: number, end: number): void {
    if (start === end) return;
    if (start !== this.runEnd) this.flushRun();
    if (this.runStart === this.runEnd) this.runStart = start;
    this.runEnd = end;
  }

  insert(bytes: Buffer): void {
    this.flushRun();
    this.parts.push(bytes);
  }

  result(): Buffer {
    if (this.parts.length === 0 && this.runStart === 0 && this.runEnd === this.chunk.length) return this.chunk;
    this.flushRun();
    return this.parts.length === 1 ? this.parts[0] : Buffer.concat(this.parts);
  }

  private flushRun(): void {
    if (this.runStart !== this.runEnd) this.parts.push(this.chunk.subarray(this.runStart, this.runEnd));
    this.runStart = this.runEnd = 0;
  }
}

type State =
  /** Before a request line: skipping blank lines, holding bytes that may spell `LIST `. */
  | 'request-start'
  /** Copying a LIST request's target until the point where `?list=true` goes. */
  | 'list-target'
  /** The rest of the request line, and the header lines. */
  | 'head-line'
  | 'body'
  | 'chunk-size'
  | 'chunk-data'
  /** The CRLF after a chunk's data. */
  | 'chunk-end'
  | 'trailer-line'
  | 'passthrough';

/**
 * Rewrites `LIST <target> HTTP/1.x` request lines in an HTTP/1.1 client-to-server byte
 * stream into `GET <target>?list=true HTTP/1.x`, tracking message framing so that only
 * request lines are ever touched. Feed it chunks in order; `flush()` at end of stream.
 * Exported for tests.
 */
export class ListRequestRewriter {
  private state: State = 'request-start';
  /** Bytes of a request line held back while they could still be the start of `LIST `. */
  private held = '';
  /** Where in the current chunk the held bytes start; -1 when they came with an earlier chunk. */
  private heldStart = -1;
  /** The current line so far (latin1), for head, chunk-size and trailer lines. */
  private line = '';
  private sectionBytes = 0;
  private inRequestLine = true;
  private targetHasQuery = false;
  private head = emptyHead();
  private lastHeader: ListedHeader | undefined;
  /** Body or chunk bytes still to pass through. */
  private remaining = 0;

  /** `upgradeAccepted()` says whether the HTTP server will take over a connection on `Upgrade:`. */
  constructor(private readonly upgradeAccepted: () => boolean = () => false) {}

  transform(chunk: Buffer): Buffer {
    const out = new Output(chunk);
    this.heldStart = -1;
    let i = 0;
    while (i < chunk.length) i = this.step(chunk, i, out);
    return out.result();
  }

  /** End of stream: releases any bytes held back. */
  flush(): Buffer {
    const held = Buffer.from(this.held, 'latin1');
    this.held = '';
    return held;
  }

  /** Consumes at least one byte of `chunk` from `i`; returns the index of the next unconsumed byte. */
  private step(chunk: Buffer, i: number, out: Output): number {
    switch (this.state) {
      case 'request-start':
        return this.requestStart(chunk, i, out);
      case 'list-target':
        return this.listTarget(chunk, i, out);
      case 'body':
      case 'chunk-data':
        return this.skipBody(chunk, i, out);
      case 'passthrough':
        out.pass(i, chunk.length);
        return chunk.length;
      default:
        return this.lineBytes(chunk, i, out);
    }
  }

  private requestStart(chunk: Buffer, i: number, out: Output): number {
    const byte = chunk[i];
    if (this.held === '') {
      if (byte === CR || byte === LF) {
        out.pass(i, i + 1); // llhttp skips blank lines before a request
        return i + 1;
      }
      this.heldStart = i;
    }
    this.held += String.fromCharCode(byte);
    if (this.held === LIST_PREFIX) {
      out.insert(GET_PREFIX);
      this.head.method = 'LIST';
      this.countSection(GET_PREFIX.length);
      this.state = 'list-target';
      this.held = '';
    } else if (!LIST_PREFIX.startsWith(this.held)) {
      if (this.heldStart >= 0) out.pass(this.heldStart, i + 1);
      else out.insert(Buffer.from(this.held, 'latin1'));
      this.line = this.held;
      this.countSection(this.held.length);
      this.state = 'head-line';
      this.held = '';
    }
    return i + 1;
  }

  /** Copies the target of a LIST request line; appends the list parameter where it ends. */
  private listTarget(chunk: Buffer, i: number, out: Output): number {
    let end = i;
    for (; end < chunk.length; end++) {
      const byte = chunk[end];
      if (byte === SP || byte === HASH || byte === CR || byte === LF) break;
      if (byte === QUESTION) this.targetHasQuery = true;
    }
    out.pass(i, end);
    if (!this.countSection(end - i)) return end;
    if (end < chunk.length) {
      out.insert(this.targetHasQuery ? LIST_QUERY_NEXT : LIST_QUERY_FIRST);
      this.state = 'head-line'; // the byte at `end` belongs to the rest of the request line
    }
    return end;
  }

  private skipBody(chunk: Buffer, i: number, out: Output): number {
    const end = Math.min(chunk.length, i + this.remaining);
    out.pass(i, end);
    this.remaining -= end - i;
    if (this.remaining === 0) {
      if (this.state === 'body') this.startRequest();
      else this.state = 'chunk-end';
    }
    return end;
  }

  /** Passes bytes through up to the end of the current line, and handles the line once complete. */
  private lineBytes(chunk: Buffer, i: number, out: Output): number {
    const lf = chunk.indexOf(LF, i);
    const end = lf === -1 ? chunk.length : lf + 1;
    out.pass(i, end);
    if (!this.countSection(end - i)) return end;
    this.line += chunk.toString('latin1', i, end);
    if (lf !== -1) {
      const line = this.line.replace(/\r?\n$/, '');
      this.line = '';
      this.onLine(line);
    }
    return end;
  }

  private onLine(line: string): void {
    switch (this.state) {
      case 'head-line':
        return this.onHeadLine(line);
      case 'chunk-size':
        return this.onChunkSizeLine(line);
      case 'chunk-end':
        return this.onChunkEndLine(line);
      case 'trailer-line':
        if (line === '') this.startRequest();
        return;
    }
  }

  private onHeadLine(line: string): void {
    if (this.inRequestLine) {
      this.inRequestLine = false;
      if (this.head.method === '') this.head.method = line.split(' ', 1)[0];
    } else if (line === '') {
      this.onHeadComplete();
    } else if (line[0] === ' ' || line[0] === '\t') {
      this.continueHeader(line);
    } else {
      this.addHeader(line);
    }
  }

  private addHeader(line: string): void {
    const colon = line.indexOf(':');
    if (colon === -1) return; // llhttp rejects this line
    const name = line.slice(0, colon).toLowerCase();
    const value = line.slice(colon + 1).trim();
    this.lastHeader = undefined;
    if (name === 'content-length') this.lastHeader = 'contentLength';
    else if (name === 'transfer-encoding') this.lastHeader = 'transferEncoding';
    else if (name === 'connection') this.lastHeader = 'connection';
    else if (name === 'upgrade') this.head.upgrade = true;
    if (this.lastHeader) this.head[this.lastHeader].push(value);
  }

  /** An obsolete folded header line: part of the previous header's value. */
  private continueHeader(line: string): void {
    if (!this.lastHeader) return;
    const values = this.head[this.lastHeader];
    values[values.length - 1] += ' ' + line.trim();
  }

  private onHeadComplete(): void {
    const framing = bodyFraming(this.head, this.upgradeAccepted());
    if (framing.kind === 'opaque') {
      this.state = 'passthrough';
    } else if (framing.kind === 'chunked') {
      this.startSection('chunk-size');
    } else if (framing.bytes > 0) {
      this.remaining = framing.bytes;
      this.state = 'body';
    } else {
      this.startRequest();
    }
  }

  private onChunkSizeLine(line: string): void {
    const size = chunkSize(line);
    if (size === undefined) {
      this.state = 'passthrough';
    } else if (size === 0) {
      this.startSection('trailer-line');
    } else {
      this.remaining = size;
      this.state = 'chunk-data';
    }
  }

  private onChunkEndLine(line: string): void {
    if (line === '') this.startSection('chunk-size');
    else this.state = 'passthrough'; // llhttp expects CRLF right after chunk data
  }

  private startRequest(): void {
    this.startSection('request-start');
    this.inRequestLine = true;
    this.targetHasQuery = false;
    this.head = emptyHead();
    this.lastHeader = undefined;
  }

  private startSection(state: State): void {
    this.state = state;
    this.line = '';
    this.sectionBytes = 0;
  }

  /** Counts bytes against the section cap; past it, gives up tracking. Returns whether still tracking. */
  private countSection(bytes: number): boolean {
    this.sectionBytes += bytes;
    if (this.sectionBytes <= MAX_SECTION_BYTES) return true;
    this.state = 'passthrough';
    this.line = '';
    return false;
  }
}

// ---------------------------------------------------------------------------------------
// The socket wrapper http.Server reads from
// ---------------------------------------------------------------------------------------

/**
 * A Duplex over an accepted socket that rewrites LIST request lines on the way in and
 * writes straight through on the way out. It mimics as much of `net.Socket` as
 * `http.Server` and request handlers use: address getters, timeouts, `destroySoon`,
 * half-close, backpressure both ways, and destruction propagating both ways.
 */
class ListRewritingSocket extends Duplex {
  private readonly rewriter: ListRequestRewriter;
  /** The callback of a write waiting for the raw socket to drain. */
  private pendingWrite: ((error?: Error | null) => void) | null = null;
  private receivedData = false;

  constructor(
    readonly raw: net.Socket,
    upgradeAccepted: () => boolean,
  ) {
    // Half-open like an http.Server's sockets: http decides when to end its side.
    super({ allowHalfOpen: true });
    this.rewriter = new ListRequestRewriter(upgradeAccepted);
    void raw.remoteAddress; // net.Socket caches the peer address once read; read it while connected
    raw.on('data', (chunk: Buffer) => this.onRawData(chunk));
    raw.on('end', () => this.onRawEnd());
    raw.on('drain', () => this.releasePendingWrite());
    raw.on('timeout', () => this.emit('timeout'));
    raw.on('error', (error) => this.destroy(error));
    raw.on('close', () => this.destroy());
  }

  get remoteAddress(): string | undefined {
    return this.raw.remoteAddress;
  }
  get remotePort(): number | undefined {
    return this.raw.remotePort;
  }
  get remoteFamily(): string | undefined {
    return this.raw.remoteFamily;
  }
  get localAddress(): string | undefined {
    return this.raw.localAddress;
  }
  get localPort(): number | undefined {
    return this.raw.localPort;
  }
  get bytesRead(): number {
    return this.raw.bytesRead;
  }
  get bytesWritten(): number {
    return this.raw.bytesWritten;
  }
  /** Express's `req.protocol` / `req.secure` read this. */
  get encrypted(): boolean | undefined {
    return this.raw instanceof tls.TLSSocket ? true : undefined;
  }
  get authorized(): boolean | undefined {
    return this.raw instanceof tls.TLSSocket ? this.raw.authorized : undefined;
  }

  /** False until the client has sent a byte: such a connection has no request to finish. */
  get hasReceivedData(): boolean {
    return this.receivedData;
  }

  getPeerCertificate(detailed?: boolean): tls.PeerCertificate | tls.DetailedPeerCertificate | null {
    return this.raw instanceof tls.TLSSocket ? this.raw.getPeerCertificate(detailed === true) : null;
  }

  address(): net.AddressInfo | object {
    return this.raw.address();
  }

  setTimeout(ms: number, callback?: () => void): this {
    this.raw.setTimeout(ms);
    if (callback) {
      if (ms === 0) this.removeListener('timeout', callback);
      else this.once('timeout', callback);
    }
    return this;
  }

  setNoDelay(noDelay?: boolean): this {
    this.raw.setNoDelay(noDelay);
    return this;
  }

  setKeepAlive(enable?: boolean, initialDelay?: number): this {
    this.raw.setKeepAlive(enable, initialDelay);
    return this;
  }

  /** Like net.Socket's: end, and destroy once everything written has been flushed. */
  destroySoon(): void {
    if (this.writable) this.end();
    if (this.writableFinished) this.destroy();
    else this.once('finish', () => this.destroy());
  }

  override _read(): void {
    this.raw.resume();
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.raw.write(chunk)) callback();
    else this.pendingWrite = callback;
  }

  override _writev(
    chunks: Array<{ chunk: Buffer; encoding: BufferEncoding }>,
    callback: (error?: Error | null) => void,
  ): void {
    this.raw.cork();
    let flowing = true;
    for (const { chunk } of chunks) flowing = this.raw.write(chunk);
    this.raw.uncork();
    if (flowing) callback();
    else this.pendingWrite = callback;
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.raw.end(callback); // `finish` only once the raw socket has flushed, so destroySoon loses nothing
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.pendingWrite = null;
    this.raw.destroy();
    callback(error);
  }

  private onRawData(chunk: Buffer): void {
    this.receivedData = true;
    const rewritten = this.rewriter.transform(chunk);
    if (rewritten.length > 0 && !this.push(rewritten)) this.raw.pause();
  }

  private onRawEnd(): void {
    const held = this.rewriter.flush();
    if (held.length > 0) this.push(held);
    this.push(null);
  }

  private releasePendingWrite(): void {
    const callback = this.pendingWrite;
    this.pendingWrite = null;
    callback?.();
  }
}

// ---------------------------------------------------------------------------------------
// Listening and graceful close
// ---------------------------------------------------------------------------------------

/** Tracks connections and responses so that, once draining, every connection closes as soon as it is idle. */
class ConnectionDrain {
  private readonly sockets = new Set<ListRewritingSocket>();
  private readonly inFlight = new Set<http.ServerResponse>();
  draining = false;

  constructor(private readonly server: http.Server) {
    server.on('request', (_req: http.IncomingMessage, res: http.ServerResponse) => this.track(res));
  }

  adopt(socket: ListRewritingSocket): void {
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
  }

  start(): void {
    this.draining = true;
    for (const res of this.inFlight) this.closeAfter(res);
    // Idle between requests, by Node's own bookkeeping.
    this.server.closeIdleConnections();
    // Node counts a connection that has not sent anything yet as busy; it is not.
    for (const socket of this.sockets) if (!socket.hasReceivedData) socket.destroy();
  }

  private track(res: http.ServerResponse): void {
    this.inFlight.add(res);
    if (this.draining) this.closeAfter(res);
    res.once('close', () => {
      this.inFlight.delete(res);
      // Covers responses whose headers went out (keep-alive) before draining began.
      if (this.draining) this.server.closeIdleConnections();
    });
  }

  private closeAfter(res: http.ServerResponse): void {
    if (!res.headersSent) res.setHeader('Connection', 'close');
  }
}

function createHttpServer(opts: ListenOptions): http.Server {
  const server = http.createServer({
    requestTimeout: opts.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
    headersTimeout: opts.headersTimeoutMs ?? DEFAULT_HEADERS_TIMEOUT_MS,
  });
  server.keepAliveTimeout = opts.keepAliveTimeoutMs ?? DEFAULT_KEEP_ALIVE_TIMEOUT_MS;
  return server;
}

function createSocketServer(opts: ListenOptions): net.Server {
  const options = { allowHalfOpen: true, noDelay: true };
  return opts.tls ? tls.createServer({ ...options, cert: opts.tls.cert, key: opts.tls.key }) : net.createServer(options);
}

function listenOn(server: net.Server, host: string, port: number): Promise<net.AddressInfo> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve(server.address() as net.AddressInfo);
    });
  });
}

/** Serves `handler` over HTTP/1.1 (HTTPS when `opts.tls` is set), accepting Vault's LIST method. */
export async function listen(handler: http.RequestListener, opts: ListenOptions): Promise<RunningListener> {
  const httpServer = createHttpServer(opts);
  // Before the handler, so that requests arriving while draining get `Connection: close`.
  const drain = new ConnectionDrain(httpServer);
  httpServer.on('request', handler);
  // An http.Server starts the connection list behind headersTimeout, requestTimeout and
  // closeIdleConnections() when it emits 'listening'. This one never listens itself.
  httpServer.emit('listening');

  const socketServer = createSocketServer(opts);
  const upgradeAccepted = (): boolean => httpServer.listenerCount('upgrade') > 0;
  socketServer.on(opts.tls ? 'secureConnection' : 'connection', (raw: net.Socket) => {
    // A TLS handshake can complete after close() has begun: too late.
    if (drain.draining) return void raw.destroy();
    const socket = new ListRewritingSocket(raw, upgradeAccepted);
    drain.adopt(socket);
    httpServer.emit('connection', socket);
  });

  let address: net.AddressInfo;
  try {
    address = await listenOn(socketServer, opts.host, opts.port);
  } catch (error) {
    httpServer.close(); // stops the connection checker started above
    throw error;
  }
  socketServer.on('error', (error) => httpServer.emit('error', error));

  let closing: Promise<void> | undefined;
  const shutdown = async (): Promise<void> => {
    // Resolves once the listener is closed and every accepted socket has closed.
    const socketsClosed = new Promise<void>((resolve) => socketServer.close(() => resolve()));
    drain.start();
    await socketsClosed;
    httpServer.close();
  };

  return {
    address: { host: opts.host, port: address.port },
    httpServer,
    close: () => (closing ??= shutdown()),
  };
}

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
 * A plain `net.Server` (or `tls.Server`) accepts each connection, makes its socket's
 * readable side pass bytes through unchanged except for request lines starting with `LIST `,
 * which become `GET <target>?list=true` (or `&list=true` when the target already has a
 * query), and hands the socket itself to an ordinary `http.Server` with
 * `emit('connection', ...)`, so everything above it — Express, timeouts, keep-alive,
 * `Expect: 100-continue`, writes — is stock Node on a real socket (see `rewriteReads`).
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
  private chunk: Buffer = EMPTY;
  private parts: Buffer[] = [];
  private runStart = 0;
  private runEnd = 0;

  /** Starts on a new chunk (one Output is reused for every chunk of a connection). */
  reset(chunk: Buffer): void {
    this.chunk = chunk;
    this.runStart = this.runEnd = 0;
  }

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
    const chunk = this.chunk;
    this.chunk = EMPTY;
    if (this.parts.length === 0 && this.runStart === 0 && this.runEnd === chunk.length) return chunk;
    this.flushRun(chunk);
    const parts = this.parts;
    this.parts = [];
    if (parts.length === 0) return EMPTY;
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }

  private flushRun(chunk = this.chunk): void {
    if (this.runStart !== this.runEnd) this.parts.push(chunk.subarray(this.runStart, this.runEnd));
    this.runStart = this.runEnd = 0;
  }
}

const EMPTY = Buffer.alloc(0);
const LIST_BYTES = Buffer.from(LIST_PREFIX, 'latin1');
const COLON = 0x3a;
const HTAB = 0x09;
/** Header names that decide framing, as lower-case bytes. */
const FRAMING_HEADERS: Array<[Buffer, ListedHeader | 'upgrade']> = [
  [Buffer.from('content-length', 'latin1'), 'contentLength'],
  [Buffer.from('transfer-encoding', 'latin1'), 'transferEncoding'],
  [Buffer.from('connection', 'latin1'), 'connection'],
  [Buffer.from('upgrade', 'latin1'), 'upgrade'],
];

/** Whether chunk[start..] is `name` (case-insensitively) followed by a colon. */
function isHeaderName(chunk: Buffer, start: number, end: number, name: Buffer): boolean {
  if (end - start <= name.length || chunk[start + name.length] !== COLON) return false;
  for (let k = 0; k < name.length; k++) {
    const byte = chunk[start + k];
    const want = name[k];
    // Letters match either case; anything else ('-') must match exactly.
    if (byte !== want && !(want >= 0x61 && want <= 0x7a && byte === want - 0x20)) return false;
  }
  return true;
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
 *
 * It runs on every byte a client sends, so the common case is kept cheap: a line that lies
 * whole in one chunk is inspected in place (its first bytes decide whether it matters for
 * framing) and only the few framing headers are turned into strings; a chunk that needs no
 * change is returned as the same buffer.
 */
export class ListRequestRewriter {
  private state: State = 'request-start';
  /** Bytes of a request line held back (at the end of a chunk) while they could still be the start of `LIST `. */
  private held = '';
  /** The current line so far (latin1) when it began in an earlier chunk. */
  private line = '';
  private sectionBytes = 0;
  private inRequestLine = true;
  private targetHasQuery = false;
  private head = emptyHead();
  private lastHeader: ListedHeader | undefined;
  /** Body or chunk bytes still to pass through. */
  private remaining = 0;
  private readonly out = new Output();

  /** `upgradeAccepted()` says whether the HTTP server will take over a connection on `Upgrade:`. */
  constructor(private readonly upgradeAccepted: () => boolean = () => false) {}

  transform(chunk: Buffer): Buffer {
    if (this.state === 'passthrough') return chunk;
    const out = this.out;
    out.reset(chunk);
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

  /** Consumes bytes of `chunk` from `i` (at least one, or hands over to another state); returns the index of the next unconsumed byte. */
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
    if (this.held !== '') return this.continueHeld(chunk, i, out);
    const byte = chunk[i];
    if (byte === CR || byte === LF) {
      out.pass(i, i + 1); // llhttp skips blank lines before a request
      return i + 1;
    }
    let n = 0;
    while (n < LIST_BYTES.length && i + n < chunk.length && chunk[i + n] === LIST_BYTES[n]) n++;
    if (n === LIST_BYTES.length) {
      this.startListTarget(out);
      return i + n;
    }
    if (i + n < chunk.length) {
      // Not LIST: an ordinary request line, which the head-line state takes from its start.
      this.state = 'head-line';
      return i;
    }
    // The chunk ends within what could still be `LIST `: hold those bytes back.
    this.held = chunk.toString('latin1', i);
    return chunk.length;
  }

  /** A request line whose first bytes were held back from an earlier chunk: one byte at a time. */
  private continueHeld(chunk: Buffer, i: number, out: Output): number {
    const held = this.held + String.fromCharCode(chunk[i]);
    if (held === LIST_PREFIX) {
      this.held = '';
      this.startListTarget(out);
      return i + 1;
    }
    if (LIST_PREFIX.startsWith(held)) {
      this.held = held;
      return i + 1;
    }
    // Not LIST after all: release the held bytes; the line goes on from byte i.
    out.insert(Buffer.from(this.held, 'latin1'));
    this.line = this.held;
    this.countSection(this.held.length);
    this.held = '';
    this.state = 'head-line';
    return i;
  }

  private startListTarget(out: Output): void {
    out.insert(GET_PREFIX);
    this.head.method = 'LIST';
    this.countSection(GET_PREFIX.length);
    this.state = 'list-target';
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
    if (lf === -1) {
      this.line += chunk.toString('latin1', i, end);
    } else if (this.line === '' && this.state === 'head-line') {
      // The whole line is in this chunk: look at it in place. Its end excludes CRLF (or LF).
      this.onHeadLineBytes(chunk, i, lf > i && chunk[lf - 1] === CR ? lf - 1 : lf);
    } else {
      const line = (this.line + chunk.toString('latin1', i, end)).replace(/\r?\n$/, '');
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

  /** `onHeadLine` for a line lying whole in `chunk` between `start` and `end`: strings only for what matters. */
  private onHeadLineBytes(chunk: Buffer, start: number, end: number): void {
    if (this.inRequestLine) {
      this.inRequestLine = false;
      if (this.head.method === '') {
        // Only CONNECT changes framing; other methods need not be spelled out.
        const sp = chunk.indexOf(SP, start);
        this.head.method = chunk[start] === 0x43 /* C */ ? chunk.toString('latin1', start, sp === -1 || sp > end ? end : sp) : '-';
      }
      return;
    }
    if (start === end) return this.onHeadComplete();
    const first = chunk[start];
    if (first === SP || first === HTAB) return this.continueHeader(chunk.toString('latin1', start, end));
    const lower = first | 0x20;
    if (lower === 0x63 /* c */ || lower === 0x74 /* t */ || lower === 0x75 /* u */) {
      for (const [name] of FRAMING_HEADERS) {
        if (isHeaderName(chunk, start, end, name)) return this.addHeader(chunk.toString('latin1', start, end));
      }
    }
    // Any other header: it ends a folded framing header (a line without a colon is one llhttp rejects).
    const colon = chunk.indexOf(COLON, start);
    if (colon !== -1 && colon < end) this.lastHeader = undefined;
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
    const head = this.head;
    head.method = '';
    head.upgrade = false;
    if (head.contentLength.length) head.contentLength = [];
    if (head.transferEncoding.length) head.transferEncoding = [];
    if (head.connection.length) head.connection = [];
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
// Rewriting on the accepted socket itself
// ---------------------------------------------------------------------------------------

/** Set on a socket once the client has sent a byte: a connection without it has no request to finish. */
const RECEIVED_DATA = Symbol('coffer.receivedData');

type RewrittenSocket = net.Socket & { [RECEIVED_DATA]?: boolean; _handle?: { _consumed?: boolean } | null };

/**
 * Makes `socket` deliver rewritten bytes to whoever reads it. The http.Server reads the socket
 * itself (no wrapper stream in between: responses are written straight to it, and timeouts,
 * half-close, `destroySoon` and TLS properties are the real socket's), so the rewriting sits
 * where the socket's bytes enter its readable side: `push()`, which Node's stream machinery
 * calls for every chunk read from the handle (and with null at end of stream).
 *
 * An http.Server normally hands a native socket's handle to its parser in C++ ("consume"),
 * so that bytes never reach JavaScript; marking the handle as consumed already makes it read
 * through `push()` and 'data' events instead, as it does for any stream. The listener tests
 * (test/unit/list-method.test.ts) would fail at once if a Node version stopped honouring this.
 */
function rewriteReads(socket: RewrittenSocket, upgradeAccepted: () => boolean): void {
  const rewriter = new ListRequestRewriter(upgradeAccepted);
  const push = socket.push;
  socket.push = function rewrittenPush(this: RewrittenSocket, chunk: unknown, encoding?: BufferEncoding): boolean {
    if (chunk === null) {
      const held = rewriter.flush();
      if (held.length > 0) push.call(this, held);
      return push.call(this, null);
    }
    if (!Buffer.isBuffer(chunk)) return push.call(this, chunk, encoding);
    this[RECEIVED_DATA] = true;
    const out = rewriter.transform(chunk);
    // Everything held back (part of a request line): keep reading.
    return out.length > 0 ? push.call(this, out) : true;
  };
  if (socket._handle) socket._handle._consumed = true;
}

// ---------------------------------------------------------------------------------------
// Listening and graceful close
// ---------------------------------------------------------------------------------------

/** Tracks connections and responses so that, once draining, every connection closes as soon as it is idle. */
/** How long a draining server waits for a request already on the wire of an idle or just-opened connection. */
const DRAIN_SILENT_GRACE_MS = 1000;

class ConnectionDrain {
  private readonly sockets = new Set<RewrittenSocket>();
  private readonly inFlight = new Set<http.ServerResponse>();
  draining = false;

  constructor(private readonly server: http.Server) {
    server.on('request', (_req: http.IncomingMessage, res: http.ServerResponse) => this.track(res));
  }

  adopt(socket: RewrittenSocket): void {
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
  }

  private graceOver = false;

  start(): void {
    this.draining = true;
    for (const res of this.inFlight) this.closeAfter(res);
    // A connection idle between requests (its last answer said keep-alive), like one that has
    // not sent anything yet, may have its next request already on the wire: a client under
    // load writes it the moment the previous answer arrives. Closing it now would reset that
    // request. So both get a moment for it to arrive (it is then answered with
    // Connection: close, and the connection ends with it); after that, the connections still
    // idle or silent are closed.
    const afterGrace = setTimeout(() => {
      this.graceOver = true;
      this.server.closeIdleConnections();
      for (const socket of this.sockets) if (!socket[RECEIVED_DATA]) socket.destroy();
    }, DRAIN_SILENT_GRACE_MS);
    afterGrace.unref();
  }

  private track(res: http.ServerResponse): void {
    this.inFlight.add(res);
    if (this.draining) this.closeAfter(res);
    res.once('close', () => {
      this.inFlight.delete(res);
      // A keep-alive answer whose headers went out before draining began leaves its
      // connection idle: closed with the others once the grace is over.
      if (this.draining && this.graceOver) this.server.closeIdleConnections();
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
    rewriteReads(raw, upgradeAccepted);
    drain.adopt(raw);
    httpServer.emit('connection', raw);
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

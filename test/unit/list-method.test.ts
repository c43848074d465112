import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { listen, ListRequestRewriter, type ListenOptions, type RunningListener } from '../../src/http/list-method';
import { seededRng } from '../helpers/rng';

const run = promisify(execFile);
const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

interface Seen {
  method: string;
  url: string;
  body: string;
  encrypted: boolean;
  remoteAddress: string | undefined;
}

const listeners: RunningListener[] = [];
const clients: net.Socket[] = [];

afterEach(async () => {
  for (const socket of clients.splice(0)) socket.destroy();
  await Promise.all(listeners.splice(0).map((listener) => listener.close()));
});

/** Starts a listener whose handler records each request and answers with it as JSON. */
async function recordingServer(
  opts: Partial<ListenOptions> = {},
): Promise<{ listener: RunningListener; port: number; seen: Seen[] }> {
  const seen: Seen[] = [];
  const listener = await listen(
    (req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (chunk: Buffer) => chunks.push(chunk));
      req.on('end', () => {
        const socket = req.socket as net.Socket & { encrypted?: boolean };
        const entry: Seen = {
          method: req.method ?? '',
          url: req.url ?? '',
          body: Buffer.concat(chunks).toString('latin1'),
          encrypted: socket.encrypted === true,
          remoteAddress: socket.remoteAddress,
        };
        seen.push(entry);
        res.setHeader('Content-Type', 'application/json');
        res.end(JSON.stringify(entry));
      });
    },
    { host: '127.0.0.1', port: 0, ...opts },
  );
  listeners.push(listener);
  return { listener, port: listener.address.port, seen };
}

interface RawResponse {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** A raw TCP client: writes exact bytes, reads responses off the wire. */
class RawClient {
  private received = Buffer.alloc(0);
  private closed = false;
  private readonly wakers = new Set<() => void>();

  private constructor(readonly socket: net.Socket) {
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      this.received = Buffer.concat([this.received, chunk]);
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  static connect(port: number): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1', () => resolve(new RawClient(socket)));
      socket.once('error', reject);
      clients.push(socket);
    });
  }

  /** Writes each piece separately, pausing between them so they arrive as separate TCP segments. */
  async write(...pieces: Array<string | Buffer>): Promise<void> {
    for (const [index, piece] of pieces.entries()) {
      if (index > 0) await sleep(3);
      this.socket.write(typeof piece === 'string' ? Buffer.from(piece, 'latin1') : piece);
    }
  }

  async readResponse(): Promise<RawResponse> {
    return this.take((buffer, closed) => parseResponse(buffer, closed));
  }

  /** Reads exactly `n` bytes. */
  async readBytes(n: number): Promise<string> {
    return this.take((buffer) =>
      buffer.length >= n ? { value: buffer.toString('latin1', 0, n), size: n } : undefined,
    );
  }

  private async take<T>(parse: (buffer: Buffer, closed: boolean) => { value: T; size: number } | undefined): Promise<T> {
    for (;;) {
      const parsed = parse(this.received, this.closed);
      if (parsed) {
        this.received = this.received.subarray(parsed.size);
        return parsed.value;
      }
      if (this.closed) throw new Error(`connection closed; unparsed: ${JSON.stringify(this.received.toString('latin1'))}`);
      await new Promise<void>((resolve) => this.wakers.add(resolve));
    }
  }

  private wake(): void {
    for (const wake of this.wakers) wake();
    this.wakers.clear();
  }
}

function parseResponse(buffer: Buffer, closed: boolean): { value: RawResponse; size: number } | undefined {
  const headEnd = buffer.indexOf('\r\n\r\n');
  if (headEnd === -1) return undefined;
  const [statusLine, ...headerLines] = buffer.toString('latin1', 0, headEnd).split('\r\n');
  const status = Number(statusLine.split(' ')[1]);
  const headers: Record<string, string> = {};
  for (const line of headerLines) {
    const colon = line.indexOf(':');
    headers[line.slice(0, colon).toLowerCase()] = line.slice(colon + 1).trim();
  }
  const bodyStart = headEnd + 4;
  let bodyEnd: number;
  if (status < 200) bodyEnd = bodyStart;
  else if (headers['content-length'] !== undefined) bodyEnd = bodyStart + Number(headers['content-length']);
  else if (closed) bodyEnd = buffer.length;
  else return undefined;
  if (buffer.length < bodyEnd) return undefined;
  return { value: { status, headers, body: buffer.toString('latin1', bodyStart, bodyEnd) }, size: bodyEnd };
}

function request(
  port: number,
  method: string,
  urlPath: string,
  options: { body?: string; agent?: http.Agent | false } = {},
): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: urlPath, agent: options.agent ?? false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString() }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(options.body);
  });
}

const host = 'Host: 127.0.0.1\r\n';

// ---------------------------------------------------------------------------------------
// Over real sockets
// ---------------------------------------------------------------------------------------

describe('listen(): the LIST method over plain HTTP', () => {
  test('a raw LIST request reaches the handler as GET with list=true', async () => {
    const { port, seen } = await recordingServer();
    const client = await RawClient.connect(port);
    await client.write(`LIST /v1/secret/ HTTP/1.1\r\n${host}\r\n`);
    const response = await client.readResponse();
    expect(response.status).toBe(200);
    expect(seen).toEqual([expect.objectContaining({ method: 'GET', url: '/v1/secret/?list=true', body: '' })]);
    expect(seen[0].remoteAddress).toBe('127.0.0.1');
  });

  test('LIST merges list=true into an existing query string', async () => {
    const { port, seen } = await recordingServer();
    const client = await RawClient.connect(port);
    await client.write(`LIST /v1/secret/metadata/?foo=bar HTTP/1.1\r\n${host}\r\n`);
    await client.readResponse();
    expect(seen.map((s) => s.url)).toEqual(['/v1/secret/metadata/?foo=bar&list=true']);
  });

  test('a Content-Length body holding a LIST request line is left alone; the pipelined LIST after it is rewritten', async () => {
    const { port, seen } = await recordingServer();
    const client = await RawClient.connect(port);
    const body = 'LIST /x HTTP/1.1\r\n';
    await client.write(
      `POST /v1/kv/data HTTP/1.1\r\n${host}Content-Length: ${body.length}\r\n\r\n${body}` +
        `LIST /y HTTP/1.1\r\n${host}\r\n`,
    );
    const responses = [await client.readResponse(), await client.readResponse()];
    expect(responses.map((r) => r.status)).toEqual([200, 200]);
    expect(seen.map(({ method, url, body }) => ({ method, url, body }))).toEqual([
      { method: 'POST', url: '/v1/kv/data', body },
      { method: 'GET', url: '/y?list=true', body: '' },
    ]);
  });

  test('a chunked body split byte by byte, then a LIST on the same keep-alive connection', async () => {
    const { port, seen } = await recordingServer();
    const client = await RawClient.connect(port);
    const chunked = '5;ext=1\r\nLIST \r\n0d\r\n/z HTTP/1.1\r\n\r\n0\r\nX-Trailer: yes\r\n\r\n';
    await client.write(`POST /v1/chunked HTTP/1.1\r\n${host}Transfer-Encoding: chunked\r\n\r\n`, ...chunked.split(''));
    expect((await client.readResponse()).status).toBe(200);
    await client.write(`LIST /v1/after HTTP/1.1\r\n${host}\r\n`);
    expect((await client.readResponse()).status).toBe(200);
    expect(seen.map(({ method, url, body }) => ({ method, url, body }))).toEqual([
      { method: 'POST', url: '/v1/chunked', body: 'LIST /z HTTP/1.1\r\n' },
      { method: 'GET', url: '/v1/after?list=true', body: '' },
    ]);
  });

  test('a request line split across writes', async () => {
    const { port, seen } = await recordingServer();
    const client = await RawClient.connect(port);
    await client.write('LI', 'ST /a HTTP/1.1\r\n', host, '\r\n');
    await client.readResponse();
    await client.write('L', 'IST /b?', 'c=d', ' HTTP/1.1\r\n', `${host}\r\n`);
    await client.readResponse();
    expect(seen.map((s) => `${s.method} ${s.url}`)).toEqual(['GET /a?list=true', 'GET /b?c=d&list=true']);
  });

  test('GET, PUT and DELETE pass through untouched', async () => {
    const { port, seen } = await recordingServer();
    await request(port, 'GET', '/v1/secret/data/a?version=2');
    await request(port, 'PUT', '/v1/secret/data/a', { body: '{"data":{"LIST /x HTTP/1.1":1}}' });
    await request(port, 'DELETE', '/v1/secret/data/a');
    // A method that shares a prefix with LIST.
    await request(port, 'LINK', '/v1/linked');
    expect(seen.map(({ method, url, body }) => ({ method, url, body }))).toEqual([
      { method: 'GET', url: '/v1/secret/data/a?version=2', body: '' },
      { method: 'PUT', url: '/v1/secret/data/a', body: '{"data":{"LIST /x HTTP/1.1":1}}' },
      { method: 'DELETE', url: '/v1/secret/data/a', body: '' },
      { method: 'LINK', url: '/v1/linked', body: '' },
    ]);
  });

  test('Node\'s own HTTP client can send LIST', async () => {
    const { port, seen } = await recordingServer();
    const response = await request(port, 'LIST', '/v1/secret/metadata/');
    expect(response.status).toBe(200);
    expect(seen.map((s) => `${s.method} ${s.url}`)).toEqual(['GET /v1/secret/metadata/?list=true']);
  });

  test('curl -X LIST works', async () => {
    const { port, seen } = await recordingServer();
    const { stdout } = await run('curl', ['-sS', '--fail', '-X', 'LIST', `http://127.0.0.1:${port}/v1/x`]);
    expect(JSON.parse(stdout)).toMatchObject({ method: 'GET', url: '/v1/x?list=true', encrypted: false });
    expect(seen).toHaveLength(1);
  });

  test('Expect: 100-continue still works, and the request after it is rewritten', async () => {
    const { port, seen } = await recordingServer();
    const client = await RawClient.connect(port);
    await client.write(`PUT /v1/p HTTP/1.1\r\n${host}Content-Length: 5\r\nExpect: 100-continue\r\n\r\n`);
    expect((await client.readResponse()).status).toBe(100);
    await client.write(`hello`, `LIST /q HTTP/1.1\r\n${host}\r\n`);
    expect((await client.readResponse()).status).toBe(200);
    expect((await client.readResponse()).status).toBe(200);
    expect(seen.map(({ method, url, body }) => ({ method, url, body }))).toEqual([
      { method: 'PUT', url: '/v1/p', body: 'hello' },
      { method: 'GET', url: '/q?list=true', body: '' },
    ]);
  });

  test('after an accepted Upgrade the connection is passed through untouched', async () => {
    const { listener, port } = await recordingServer();
    listener.httpServer.on('upgrade', (_req: http.IncomingMessage, socket: net.Socket, head: Buffer) => {
      socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n');
      if (head.length > 0) socket.write(head);
      socket.on('data', (chunk: Buffer) => socket.write(chunk));
      socket.on('end', () => socket.end()); // upgraded sockets are half-open; close() waits for them
    });
    const client = await RawClient.connect(port);
    await client.write(`GET /ws HTTP/1.1\r\n${host}Connection: Upgrade\r\nUpgrade: echo\r\n\r\n`);
    expect((await client.readResponse()).status).toBe(101);
    const tunnelled = `LIST /not-http HTTP/1.1\r\n\r\n`;
    await client.write(tunnelled);
    expect(await client.readBytes(tunnelled.length)).toBe(tunnelled);
  });

  test('an Upgrade nobody accepts is an ordinary request, and LIST still works after it', async () => {
    const { port, seen } = await recordingServer();
    const client = await RawClient.connect(port);
    // (Node drops whatever follows such a head in the same TCP segment, so send the LIST separately.)
    await client.write(
      `GET /h HTTP/1.1\r\n${host}Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n`,
    );
    expect((await client.readResponse()).status).toBe(200);
    await client.write(`LIST /after HTTP/1.1\r\n${host}\r\n`);
    expect((await client.readResponse()).status).toBe(200);
    expect(seen.map((s) => `${s.method} ${s.url}`)).toEqual(['GET /h', 'GET /after?list=true']);
  });

  test('malformed requests still get Node\'s 400', async () => {
    const { port, seen } = await recordingServer();
    const client = await RawClient.connect(port);
    await client.write(`FROB / HTTP/1.1\r\n${host}\r\n`);
    const response = await client.readResponse();
    expect(response.status).toBe(400);
    expect(seen).toEqual([]);
  });
});

describe('listen(): timeouts', () => {
  test('keepAliveTimeoutMs closes an idle keep-alive connection', async () => {
    const { port } = await recordingServer({ keepAliveTimeoutMs: 100 });
    const client = await RawClient.connect(port);
    await client.write(`LIST /v1/a HTTP/1.1\r\n${host}\r\n`);
    expect((await client.readResponse()).status).toBe(200);
    const started = Date.now();
    await new Promise((resolve) => client.socket.once('close', resolve));
    expect(Date.now() - started).toBeLessThan(3_000);
  });
});

describe('listen(): TLS', () => {
  let tlsDir: string;
  let tlsFiles: { cert: Buffer; key: Buffer };

  beforeAll(async () => {
    tlsDir = fs.mkdtempSync(path.join(os.tmpdir(), 'coffer-list-tls-'));
    const keyFile = path.join(tlsDir, 'key.pem');
    const certFile = path.join(tlsDir, 'cert.pem');
    await run('openssl', [
      'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', keyFile, '-out', certFile, '-days', '1', '-subj', '/CN=127.0.0.1',
    ]);
    tlsFiles = { cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) };
  });

  afterAll(() => fs.rmSync(tlsDir, { recursive: true, force: true }));

  test('curl -k -X LIST over HTTPS', async () => {
    const { port, seen } = await recordingServer({ tls: tlsFiles });
    const { stdout } = await run('curl', ['-sS', '--fail', '-k', '-X', 'LIST', `https://127.0.0.1:${port}/v1/secret/?a=1`]);
    expect(JSON.parse(stdout)).toMatchObject({ method: 'GET', url: '/v1/secret/?a=1&list=true', encrypted: true });
    expect(seen).toHaveLength(1);
  });
});

describe('listen(): close()', () => {
  test('resolves promptly with an idle keep-alive connection open', async () => {
    const { listener, port } = await recordingServer({ keepAliveTimeoutMs: 60_000 });
    const agent = new http.Agent({ keepAlive: true });
    try {
      await request(port, 'LIST', '/v1/a', { agent });
      expect(Object.values(agent.freeSockets).flat()).toHaveLength(1);
      const started = Date.now();
      await listener.close();
      // A bound (the connection would otherwise stay for its 60 s keep-alive), not a speed check.
      expect(Date.now() - started).toBeLessThan(10_000);
    } finally {
      agent.destroy();
    }
  });

  test('resolves promptly with a connection open that has not sent anything', async () => {
    const { listener, port } = await recordingServer();
    const client = await RawClient.connect(port);
    await sleep(20);
    const started = Date.now();
    await listener.close();
    // A bound, not a speed check: without the drain's 1 s grace for a silent connection,
    // close() would wait for as long as the client keeps it open (forever here). 2 s was
    // exceeded once (2,207 ms) on a loaded CI machine.
    expect(Date.now() - started).toBeLessThan(10_000);
    await expect(client.readResponse()).rejects.toThrow(/connection closed/);
  });

  test('waits for an in-flight request, which gets Connection: close', async () => {
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const listener = await listen(
      (_req, res) => {
        void released.then(() => res.end('done'));
      },
      { host: '127.0.0.1', port: 0, keepAliveTimeoutMs: 60_000 },
    );
    listeners.push(listener);
    const agent = new http.Agent({ keepAlive: true });
    try {
      const response = request(listener.address.port, 'GET', '/slow', { agent });
      await sleep(50);
      let closed = false;
      const closing = listener.close().then(() => (closed = true));
      await sleep(100);
      expect(closed).toBe(false);
      release();
      const { status, headers, body } = await response;
      expect({ status, connection: headers.connection, body }).toEqual({ status: 200, connection: 'close', body: 'done' });
      await closing;
      await expect(request(listener.address.port, 'GET', '/')).rejects.toThrow(/ECONNREFUSED/);
    } finally {
      agent.destroy();
    }
  });
});

// ---------------------------------------------------------------------------------------
// The rewriter on its own: every split point
// ---------------------------------------------------------------------------------------

function rewriteAll(pieces: Buffer[]): string {
  const rewriter = new ListRequestRewriter();
  const out = pieces.map((piece) => rewriter.transform(piece));
  out.push(rewriter.flush());
  return Buffer.concat(out).toString('latin1');
}

describe('ListRequestRewriter', () => {
  const input =
    '\r\nLIST /v1/a HTTP/1.1\r\nHost: h\r\n\r\n' +
    'POST /v1/b HTTP/1.1\r\nContent-Length: 20\r\n\r\nLIST /x HTTP/1.1\r\n\r\n' +
    'LIST /v1/c?x=1 HTTP/1.1\r\nHost: h\r\n\r\n' +
    'PUT /v1/d HTTP/1.1\r\ntransfer-encoding: gzip,\r\n chunked\r\n\r\n' +
    '1b;name="v"\r\nLIST /in-chunk HTTP/1.1\r\n\r\n\r\n0\r\nTrailer: LIST /t HTTP/1.1\r\n\r\n' +
    'LINK /v1/e HTTP/1.1\r\n\r\n' +
    'LIST * HTTP/1.0\r\n\r\n' +
    'LIS';
  const expected =
    '\r\nGET /v1/a?list=true HTTP/1.1\r\nHost: h\r\n\r\n' +
    'POST /v1/b HTTP/1.1\r\nContent-Length: 20\r\n\r\nLIST /x HTTP/1.1\r\n\r\n' +
    'GET /v1/c?x=1&list=true HTTP/1.1\r\nHost: h\r\n\r\n' +
    'PUT /v1/d HTTP/1.1\r\ntransfer-encoding: gzip,\r\n chunked\r\n\r\n' +
    '1b;name="v"\r\nLIST /in-chunk HTTP/1.1\r\n\r\n\r\n0\r\nTrailer: LIST /t HTTP/1.1\r\n\r\n' +
    'LINK /v1/e HTTP/1.1\r\n\r\n' +
    'GET *?list=true HTTP/1.0\r\n\r\n' +
    'LIS';
  const bytes = Buffer.from(input, 'latin1');

  test('rewrites only request lines, in one piece', () => {
    expect(rewriteAll([bytes])).toBe(expected);
  });

  test('gives the same output wherever the stream is split', () => {
    for (let at = 0; at <= bytes.length; at++) {
      expect(rewriteAll([bytes.subarray(0, at), bytes.subarray(at)])).toBe(expected);
    }
    expect(rewriteAll([...bytes].map((byte) => Buffer.from([byte])))).toBe(expected);
  });

  test('passes an unchanged chunk through as the same buffer', () => {
    const chunk = Buffer.from('GET / HTTP/1.1\r\n\r\n');
    expect(new ListRequestRewriter().transform(chunk)).toBe(chunk);
  });

  test('stops tracking after a head larger than the cap', () => {
    const huge = `GET / HTTP/1.1\r\nX-Big: ${'a'.repeat(70 * 1024)}\r\n\r\nLIST /x HTTP/1.1\r\n\r\n`;
    expect(rewriteAll([Buffer.from(huge)])).toBe(huge);
  });

  test('passes through after CONNECT, and after an accepted Upgrade', () => {
    const connect = 'CONNECT h:443 HTTP/1.1\r\n\r\nLIST /x HTTP/1.1\r\n\r\n';
    expect(rewriteAll([Buffer.from(connect)])).toBe(connect);
    const upgrade = 'GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nLIST /x HTTP/1.1\r\n\r\n';
    const accepting = new ListRequestRewriter(() => true);
    expect(accepting.transform(Buffer.from(upgrade)).toString()).toBe(upgrade);
  });

  test('stops tracking when the framing is something llhttp rejects', () => {
    for (const framing of ['Content-Length: 1\r\nContent-Length: 1', 'Content-Length: 1\r\nTransfer-Encoding: chunked', 'Transfer-Encoding: gzip', 'Content-Length: x']) {
      const stream = `POST / HTTP/1.1\r\n${framing}\r\n\r\nLIST /x HTTP/1.1\r\n\r\n`;
      expect(rewriteAll([Buffer.from(stream)])).toBe(stream);
    }
  });
});

// ---------------------------------------------------------------------------------------
// The rewriter's in-place line handling: framing headers in any case, look-alike names,
// bare LF line ends, and generated streams cut anywhere
// ---------------------------------------------------------------------------------------

describe('ListRequestRewriter: framing headers as llhttp reads them', () => {
  test('framing header names match in any case', () => {
    const stream =
      'POST /a HTTP/1.1\r\nCONTENT-LENGTH: 18\r\n\r\nLIST /x HTTP/1.1\r\n' +
      'PUT /b HTTP/1.1\r\ncontent-length: 18\r\n\r\nLIST /y HTTP/1.1\r\n' +
      'PATCH /c HTTP/1.1\r\nTransfer-ENCODING: Chunked\r\n\r\n16\r\n\r\n\r\nLIST /z HTTP/1.1\r\n\r\n0\r\n\r\n' +
      'LIST /after HTTP/1.1\r\n\r\n';
    expect(rewriteAll([Buffer.from(stream)])).toBe(stream.replace('LIST /after', 'GET /after?list=true'));
  });

  test('headers that only look like framing headers change nothing', () => {
    // Were "Content-Lengthy" taken for Content-Length, the LIST after this head would be read as a body.
    const stream =
      'GET /a HTTP/1.1\r\nContent-Lengthy: 5\r\nX-Content-Length: 5\r\nTransfer-Encodings: chunked\r\nConnections: upgrade\r\n\r\n' +
      'LIST /b HTTP/1.1\r\n\r\n';
    expect(rewriteAll([Buffer.from(stream)])).toBe(stream.replace('LIST /b', 'GET /b?list=true'));
    const accepting = new ListRequestRewriter(() => true);
    const upgradeLike = 'GET / HTTP/1.1\r\nConnection: keep-alive\r\nUpgraded: x\r\n\r\nLIST /c HTTP/1.1\r\n\r\n';
    expect(accepting.transform(Buffer.from(upgradeLike)).toString('latin1')).toBe(upgradeLike.replace('LIST /c', 'GET /c?list=true'));
  });

  test('a folded header after a framing header is not part of it once another header came between', () => {
    const stream = 'POST /a HTTP/1.1\r\nContent-Length: 3\r\nX-Other: 1\r\n 9\r\n\r\nabcLIST /b HTTP/1.1\r\n\r\n';
    expect(rewriteAll([Buffer.from(stream)])).toBe(stream.replace('LIST /b', 'GET /b?list=true'));
  });

  test('bare LF line ends', () => {
    const stream = 'POST /a HTTP/1.1\nContent-Length: 2\n\nhiLIST /b HTTP/1.1\nHost: h\n\n';
    expect(rewriteAll([Buffer.from(stream)])).toBe(stream.replace('LIST /b', 'GET /b?list=true'));
  });
});

describe('ListRequestRewriter: generated streams', () => {
  const { next, int } = seededRng('list-rewriter property');
  const pick = <T>(xs: readonly T[]): T => xs[int(0, xs.length - 1)];
  const casing = (name: string) => [...name].map((c) => (next() < 0.5 ? c.toUpperCase() : c.toLowerCase())).join('');
  const noise = () => pick(['LIST /in-body HTTP/1.1\r\n', 'GET / HTTP/1.1\r\n\r\n', 'x', '\r\n\r\n', 'LIS', '']);

  /** One request: its bytes in, and what the rewriter must make of them. */
  function request(): { input: string; output: string } {
    const method = pick(['LIST', 'GET', 'POST', 'PUT', 'DELETE', 'LINK', 'LOCK']);
    const target = pick(['/v1/a', '/v1/a/', '/v1/b?x=1', '*', '/v1/c?']);
    const eol = next() < 0.9 ? '\r\n' : '\n';
    const lead = next() < 0.2 ? '\r\n' : '';
    const headers = [`${casing('host')}: h`, `${casing('x-vault-token')}: hvs.t`];
    let body = '';
    let framing = '';
    const kind = method === 'LIST' || method === 'GET' ? pick(['none', 'none', 'length']) : pick(['none', 'length', 'chunked']);
    if (kind === 'length') {
      body = noise() + noise();
      framing = `${casing('content-length')}: ${body.length}`;
    } else if (kind === 'chunked') {
      const chunks = [noise() + noise() + 'a', noise() + noise() + 'bc'];
      body = chunks.map((c) => `${c.length.toString(16)}${next() < 0.3 ? ';ext=1' : ''}\r\n${c}\r\n`).join('') + `0\r\n${next() < 0.3 ? 'Trailer: LIST /t HTTP/1.1\r\n' : ''}\r\n`;
      framing = `${casing('transfer-encoding')}: chunked`;
    }
    if (framing) headers.splice(int(0, headers.length), 0, framing);
    if (next() < 0.3) headers.push(`${casing('connection')}: keep-alive`);
    const head = (m: string, t: string) => `${lead}${m} ${t} HTTP/1.1${eol}${headers.map((h) => h + eol).join('')}${eol}`;
    const rewritten = method === 'LIST' ? head('GET', target + (target.includes('?') ? '&list=true' : '?list=true')) : head(method, target);
    return { input: head(method, target) + body, output: rewritten + body };
  }

  test('any sequence of requests, cut into any pieces, comes out with exactly the LIST request lines rewritten', () => {
    for (let round = 0; round < 300; round++) {
      const requests = Array.from({ length: int(1, 6) }, request);
      const input = Buffer.from(requests.map((r) => r.input).join(''), 'latin1');
      const expected = requests.map((r) => r.output).join('');
      const cuts = [...new Set(Array.from({ length: int(0, 8) }, () => int(0, input.length)))].sort((x, y) => x - y);
      const pieces = [0, ...cuts].map((at, i, all) => input.subarray(at, all[i + 1] ?? input.length));
      expect(rewriteAll(pieces)).toBe(expected);
    }
  });
});

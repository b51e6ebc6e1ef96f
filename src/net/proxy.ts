/**
 * The allowlist proxy of `--allow-host`: an HTTP proxy (plain requests and CONNECT tunnels) on a
 * unix socket in the VM's directory, which the VMM hands the restricted guest's connections to. It
 * is the guest's only way out, and it runs on the host, where guest root cannot reach: a request
 * for a name or port not on the list gets a 403 that says why.
 *
 * We wrote this rather than run Debian's tinyproxy or squid: both install as system services
 * (a proxy left listening on the host), tinyproxy cannot be given its own name mapping
 * (MVM_NET_HOSTS), and a proxy inside mvmctl lives and dies with the run, with no process of its
 * own to leak. Node's HTTP parser does the parsing; everything here is policy and bounds.
 */
import { lookup } from 'node:dns/promises';
import { createServer, request as httpRequest, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect, isIP, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { hostAllowed, type AllowedHost } from './spec.js';

/** Guest connections open at once; more wait in the kernel's backlog. */
const MAX_CONNECTIONS = 64;
/** A connection (tunnel or request) that moves no byte this long is closed. */
const IDLE_TIMEOUT_MS = 300_000;
/** Name lookup and TCP connect to an allowed host. */
const UPSTREAM_CONNECT_TIMEOUT_MS = 15_000;
/** Refusals logged per run; the rest are counted. */
const MAX_REFUSAL_LINES = 20;

/** Headers that describe one hop, not the message: never forwarded (RFC 9110, 7.6.1). */
const HOP_HEADERS = new Set(['connection', 'keep-alive', 'proxy-connection', 'proxy-authorization', 'proxy-authenticate', 'te', 'trailer', 'transfer-encoding', 'upgrade']);

export interface AllowlistProxyOptions {
  socketPath: string;
  allowHosts: readonly AllowedHost[];
  /** Names resolved here before DNS (lower case → IPv4 address). */
  hosts: ReadonlyMap<string, string>;
  /** One line per refused request (the caller shows them with -v). */
  onRefused: (line: string) => void;
}

export class AllowlistProxy {
  private refusals = 0;
  private readonly sockets = new Set<Duplex>();

  private constructor(
    private readonly server: Server,
    private readonly options: AllowlistProxyOptions,
  ) {}

  static async start(options: AllowlistProxyOptions): Promise<AllowlistProxy> {
    const server = createServer({ requestTimeout: IDLE_TIMEOUT_MS, headersTimeout: 30_000 });
    const proxy = new AllowlistProxy(server, options);
    server.maxConnections = MAX_CONNECTIONS;
    server.on('connection', (socket: Socket) => proxy.track(socket));
    server.on('request', (req: IncomingMessage, res: ServerResponse) => void proxy.forward(req, res));
    server.on('connect', (req: IncomingMessage, socket: Socket, head: Buffer) => void proxy.tunnel(req, socket, head));
    server.on('clientError', (_error, socket: Duplex) => socket.destroy());
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(options.socketPath, () => {
        server.off('error', reject);
        resolve();
      });
    });
    return proxy;
  }

  /** Stops listening and cuts every connection. */
  async close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    const hidden = this.refusals - MAX_REFUSAL_LINES;
    if (hidden > 0) this.options.onRefused(`[net] ${hidden} more refused requests not shown`);
  }

  private track(socket: Duplex): void {
    this.sockets.add(socket);
    socket.once('close', () => this.sockets.delete(socket));
  }

  /** A plain HTTP request with an absolute URL (`GET http://host/path`). */
  private async forward(req: IncomingMessage, res: ServerResponse): Promise<void> {
    let url: URL;
    try {
      url = new URL(req.url ?? '');
    } catch {
      return plainAnswer(res, 400, 'mvmctl: this is an HTTP proxy: send absolute URLs (http://host/path), or CONNECT host:port for HTTPS');
    }
    if (url.protocol !== 'http:') return plainAnswer(res, 400, `mvmctl: the proxy forwards http:// URLs; use CONNECT for ${url.protocol}`);
    const name = url.hostname.replace(/^\[|\]$/g, '');
    const port = url.port ? Number(url.port) : 80;
    const refusal = this.refusal(req.method ?? 'GET', name, port);
    if (refusal) return plainAnswer(res, 403, refusal);
    let address: string;
    try {
      address = await this.resolve(name);
    } catch (error) {
      return plainAnswer(res, 502, `mvmctl: cannot resolve ${name}: ${(error as Error).message}`);
    }
    const upstream = httpRequest({
      host: address,
      port,
      method: req.method,
      path: `${url.pathname}${url.search}`,
      headers: { ...endToEndHeaders(req.headers), host: url.host },
      setHost: false,
      timeout: UPSTREAM_CONNECT_TIMEOUT_MS,
    });
    upstream.on('response', (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.statusMessage, endToEndHeaders(answer.headers));
      answer.pipe(res);
    });
    upstream.on('timeout', () => upstream.destroy(new Error('no answer in time')));
    upstream.on('error', (error) => {
      if (res.headersSent) res.destroy();
      else plainAnswer(res, 502, `mvmctl: ${name}:${port}: ${error.message}`);
    });
    res.on('close', () => upstream.destroy());
    req.pipe(upstream);
  }

  /** `CONNECT host:port`: a byte tunnel, for HTTPS. */
  private async tunnel(req: IncomingMessage, socket: Socket, head: Buffer): Promise<void> {
    this.track(socket);
    socket.on('error', () => socket.destroy());
    socket.setTimeout(IDLE_TIMEOUT_MS, () => socket.destroy());
    // A name or an IPv4 address, and a port: nothing else (no userinfo, no path) may ride along.
    const target = /^([A-Za-z0-9.-]+):(\d{1,5})$/.exec(req.url ?? '');
    if (!target) return rawAnswer(socket, 400, 'mvmctl: CONNECT wants host:port');
    const name = target[1]!;
    const port = Number(target[2]);
    const refusal = this.refusal('CONNECT', name, port);
    if (refusal) return rawAnswer(socket, 403, refusal);
    let address: string;
    try {
      address = await this.resolve(name);
    } catch (error) {
      return rawAnswer(socket, 502, `mvmctl: cannot resolve ${name}: ${(error as Error).message}`);
    }
    const upstream = connect({ host: address, port, timeout: UPSTREAM_CONNECT_TIMEOUT_MS });
    this.track(upstream);
    upstream.once('timeout', () => upstream.destroy(new Error('no answer in time')));
    upstream.once('connect', () => {
      upstream.setTimeout(IDLE_TIMEOUT_MS);
      socket.write('HTTP/1.1 200 Connection Established\r\n\r\n');
      if (head.length > 0) upstream.write(head);
      upstream.pipe(socket);
      socket.pipe(upstream);
    });
    upstream.on('error', (error) => {
      if (upstream.connecting || upstream.bytesRead + upstream.bytesWritten === 0) rawAnswer(socket, 502, `mvmctl: ${name}:${port}: ${error.message}`);
      else socket.destroy();
    });
    socket.once('close', () => upstream.destroy());
    upstream.once('close', () => socket.destroy());
  }

  /** Why `name:port` is refused, or undefined when it is allowed; logs the refusal. */
  private refusal(method: string, name: string, port: number): string | undefined {
    if (hostAllowed(this.options.allowHosts, name, port)) return undefined;
    this.refusals += 1;
    if (this.refusals <= MAX_REFUSAL_LINES) this.options.onRefused(`[net] refused ${method} ${name}:${port}: not allowed by --allow-host`);
    return `mvmctl: ${name}:${port} is not allowed: this VM may reach only ${this.options.allowHosts.map(describeAllowed).join(', ')} (--allow-host)`;
  }

  private async resolve(name: string): Promise<string> {
    if (isIP(name)) return name;
    const mapped = this.options.hosts.get(name.toLowerCase());
    if (mapped) return mapped;
    const deadline = new Promise<never>((_, reject) => setTimeout(() => reject(new Error('the lookup timed out')), UPSTREAM_CONNECT_TIMEOUT_MS).unref());
    return (await Promise.race([lookup(name, { family: 4 }), deadline])).address;
  }
}

function describeAllowed(entry: AllowedHost): string {
  return entry.port === undefined ? `${entry.name} (ports 80, 443)` : `${entry.name}:${entry.port}`;
}

function endToEndHeaders(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const named = new Set((String(headers.connection ?? '')).toLowerCase().split(',').map((h) => h.trim()));
  return Object.fromEntries(Object.entries(headers).filter(([key]) => !HOP_HEADERS.has(key) && !named.has(key)));
}

function plainAnswer(res: ServerResponse, status: number, message: string): void {
  // A client (or its user) can tell the allowlist's refusal from the upstream server's own 403.
  res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', connection: 'close', ...(status === 403 ? { 'x-mvm-refused': 'allow-host' } : {}) });
  res.end(`${message}\n`);
}

function rawAnswer(socket: Duplex, status: number, message: string): void {
  const reason = status === 403 ? 'Forbidden' : status === 400 ? 'Bad Request' : 'Bad Gateway';
  const body = `${message}\n`;
  socket.end(`HTTP/1.1 ${status} ${reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`);
}

/** `MVM_NET_HOSTS`: a hosts file (`ADDRESS NAME…` lines, `#` comments) the proxy resolves names with first. */
export function parseHostsFile(text: string): Map<string, string> {
  const hosts = new Map<string, string>();
  for (const raw of text.split('\n')) {
    const [address, ...names] = raw.replace(/#.*/, '').trim().split(/\s+/);
    if (!address || isIP(address) !== 4) continue;
    for (const name of names) if (!hosts.has(name.toLowerCase())) hosts.set(name.toLowerCase(), address);
  }
  return hosts;
}

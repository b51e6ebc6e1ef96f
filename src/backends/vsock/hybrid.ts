/**
 * Firecracker's hybrid vsock, host side: the VMM (Firecracker, or vhost-device-vsock for QEMU)
 * serves the guest's vsock on a unix socket; a host client writes `CONNECT <port>\n` and, once the
 * guest accepted, reads `OK <host port>\n`, after which the socket carries the guest stream.
 */
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

/** `OK ` and a 32-bit port number: anything longer was not written by a VMM. */
const MAX_ACK_BYTES = 32;
/** How long the VMM may take to answer CONNECT once it accepted the unix connection. */
const ACK_TIMEOUT_MS = 2_000;
/**
 * Retries back off up to this. vhost-device-vsock 0.3 stops accepting for good when CONNECTs to a
 * port nobody listens on yet arrive every 10 ms (measured: every later one is closed too, even
 * once the agent listens); 20 ms and slower recover as soon as the agent listens.
 */
const MAX_RETRY_MS = 100;

/** The agent's console line once it can be reached (guest/listen.c), on vsock or, behind the test double's bridge, a port. */
export const AGENT_LISTENING_LINE = /mvm-agent: listening on /;
/** How long the first CONNECT to a booting guest waits for that line. */
const AGENT_LISTENING_WAIT_MS = 5_000;
/** Retries to a booting guest: well clear of the pace that wedges vhost-device-vsock. */
const BOOTING_RETRY_MS = 50;

export interface HybridConnectOptions {
  signal: AbortSignal;
  /** The VMM has exited: stop retrying and throw `goneError()`. */
  gone: () => boolean;
  goneError: () => Error;
  /** The first retry's delay; later ones back off to MAX_RETRY_MS. */
  retryMs: number;
}

class NotListening extends Error {}

/**
 * Connects to guest port `port` through the hybrid vsock socket at `path`. The socket appears while
 * the VMM starts, and until the guest's agent listens the VMM drops each CONNECT (Firecracker
 * closes the connection, firecracker#1253): those are retried until `gone()` or `signal` says stop.
 */
export async function connectHybridVsock(path: string, port: number, options: HybridConnectOptions): Promise<Socket> {
  let delay = options.retryMs;
  for (;;) {
    options.signal.throwIfAborted();
    if (options.gone()) throw options.goneError();
    try {
      return await attempt(path, port, options.signal);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (!(error instanceof NotListening) && code !== 'ENOENT' && code !== 'ECONNREFUSED' && code !== 'ECONNRESET' && code !== 'EPIPE') throw error;
      // An abort during the wait rejects with the signal's own reason, as one during an attempt does.
      await sleep(delay, undefined, { signal: options.signal }).catch(() => Promise.reject(options.signal.reason));
      delay = Math.min(MAX_RETRY_MS, delay * 1.5);
    }
  }
}

/**
 * Connects to the agent of a guest that is booting. Each CONNECT before the agent listens is refused
 * by the guest, and vhost-device-vsock 0.3 can wedge for good on a run of those (seen under load),
 * so the first one waits for `listening`: the agent's own console line (AGENT_LISTENING_LINE), which
 * the caller watches for. The guest prints it, so it is only a hint: a guest that never does is
 * still tried after AGENT_LISTENING_WAIT_MS.
 */
export async function connectBootingAgent(path: string, port: number, listening: Promise<void>, options: Omit<HybridConnectOptions, 'retryMs'>): Promise<Socket> {
  await Promise.race([listening, sleep(AGENT_LISTENING_WAIT_MS, undefined, { signal: options.signal, ref: false }).catch(() => {})]);
  return connectHybridVsock(path, port, { ...options, retryMs: BOOTING_RETRY_MS });
}

function attempt(path: string, port: number, signal: AbortSignal): Promise<Socket> {
  return new Promise<Socket>((resolve, reject) => {
    const socket = connect(path);
    let received = Buffer.alloc(0);
    const fail = (error: Error) => {
      cleanup();
      socket.destroy();
      reject(error);
    };
    const onAbort = () => fail(signal.reason instanceof Error ? signal.reason : new Error('aborted'));
    const timer = setTimeout(() => fail(new NotListening('no answer to CONNECT')), ACK_TIMEOUT_MS);
    const onData = (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      const newline = received.indexOf(0x0a);
      if (newline < 0) {
        if (received.length > MAX_ACK_BYTES) fail(new Error(`the vsock socket ${path} answered CONNECT with something other than OK`));
        return;
      }
      const line = received.subarray(0, newline).toString('latin1');
      if (!/^OK \d{1,10}$/.test(line)) return fail(new Error(`the vsock socket ${path} answered CONNECT ${port} with '${line.slice(0, MAX_ACK_BYTES)}'`));
      cleanup();
      // Paused until the session reads, so nothing that follows is lost in between.
      socket.pause();
      // Bytes after the OK line are the guest's: hand them on with the socket.
      const rest = received.subarray(newline + 1);
      if (rest.length > 0) socket.unshift(rest);
      resolve(socket);
    };
    const onClose = () => fail(new NotListening('closed before OK'));
    const cleanup = () => {
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      socket.off('data', onData);
      socket.off('error', fail);
      socket.off('close', onClose);
    };
    signal.addEventListener('abort', onAbort, { once: true });
    socket.on('error', fail);
    socket.on('close', onClose);
    socket.once('connect', () => {
      socket.on('data', onData);
      socket.write(`CONNECT ${port}\n`);
    });
  });
}

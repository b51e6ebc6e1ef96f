import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Connects to a unix socket a VMM serves (QEMU's agent port and monitor, Firecracker's API). The
 * VMM creates it while it starts up, before the guest runs, so a missing or not yet listening
 * socket is retried until `gone()` says the VMM has exited (then `goneError` is thrown) or `signal`
 * aborts.
 */
export async function connectWhenListening(
  path: string,
  options: { signal: AbortSignal; gone: () => boolean; goneError: () => Error; retryMs: number },
): Promise<Socket> {
  for (;;) {
    options.signal.throwIfAborted();
    if (options.gone()) throw options.goneError();
    try {
      return await new Promise<Socket>((resolve, reject) => {
        const socket = connect(path);
        socket.once('connect', () => {
          socket.removeListener('error', reject);
          resolve(socket);
        });
        socket.once('error', reject);
      });
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT' && code !== 'ECONNREFUSED') throw error;
      // An abort during the wait rejects with the signal's own reason.
      await sleep(options.retryMs, undefined, { signal: options.signal }).catch(() => Promise.reject(options.signal.reason));
    }
  }
}

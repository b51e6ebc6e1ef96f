/**
 * A tiny cross-process lock: a file created with O_EXCL holding the owner's pid. A lock whose owner
 * is gone (crashed, killed) is taken over. Used so that two mvmctl processes that both find the image
 * missing build it once, not twice (the kernel build alone takes minutes).
 */
import { open, readFile, stat, unlink } from 'node:fs/promises';

import type { Progress } from '../progress.js';

export function pidAlive(pid: number): boolean {
  if (!Number.isInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function lockOwner(path: string): Promise<number | undefined> {
  try {
    const text = await readFile(path, 'utf8');
    const pid = Number.parseInt(text.trim(), 10);
    return Number.isInteger(pid) ? pid : undefined;
  } catch {
    return undefined;
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** Holds `path` as a lock while `fn` runs; waits (polling) while another live process holds it. */
export async function withLock<T>(
  path: string,
  fn: () => Promise<T>,
  options: { signal?: AbortSignal; progress?: Progress; what?: string; pollMs?: number } = {},
): Promise<T> {
  let announced = false;
  for (;;) {
    options.signal?.throwIfAborted();
    try {
      const handle = await open(path, 'wx');
      try {
        await handle.writeFile(`${process.pid}\n`);
      } finally {
        await handle.close();
      }
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const owner = await lockOwner(path);
    let stale = owner !== undefined && !pidAlive(owner);
    if (owner === undefined) {
      // Being written right now, or garbage: give a writer a moment before calling it stale.
      const info = await stat(path).catch(() => undefined);
      stale = info !== undefined && Date.now() - info.mtimeMs > 5000;
    }
    if (stale) {
      await unlink(path).catch(() => {});
      continue;
    }
    if (!announced && owner !== undefined) {
      options.progress?.(`waiting for another mvmctl (pid ${owner}) ${options.what ?? 'holding ' + path}`);
      announced = true;
    }
    await sleep(options.pollMs ?? 500, options.signal);
  }
  try {
    return await fn();
  } finally {
    if ((await lockOwner(path)) === process.pid) await unlink(path).catch(() => {});
  }
}

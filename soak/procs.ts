// What the soak watches from outside mvmctl: processes by their command line, memory by /proc.
import { readdirSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

export interface ProcessInfo {
  pid: number;
  command: string;
}

/** Processes (not this one) whose command line mentions any of `markers`: a VM's state dir, a HOST path. */
export function processesMentioning(markers: readonly string[]): ProcessInfo[] {
  const found: ProcessInfo[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    try {
      const command = readFileSync(`/proc/${entry}/cmdline`, 'utf8').replaceAll('\0', ' ').trim();
      if (markers.some((m) => command.includes(m))) found.push({ pid: Number(entry), command });
    } catch {
      // exited while we looked
    }
  }
  return found;
}

export const isVmm = (p: ProcessInfo): boolean => p.command.includes('qemu-system');

/** Gone, or a zombie its parent has not reaped yet: either way it runs no more. */
export function hasExited(pid: number): boolean {
  try {
    return / Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\)/s, ' '));
  } catch {
    return true;
  }
}

/** VmRSS of `pid` in bytes, or undefined once it has exited. */
export function rssBytes(pid: number): number | undefined {
  try {
    const kib = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
    return kib === undefined ? undefined : Number(kib) * 1024;
  } catch {
    return undefined;
  }
}

/** Polls `condition` every `intervalMs` until it holds (true) or `timeoutMs` has passed (false). */
export async function waitUntil(condition: () => boolean, timeoutMs: number, intervalMs = 5): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (condition()) return true;
    if (performance.now() >= deadline) return false;
    await sleep(intervalMs);
  }
}

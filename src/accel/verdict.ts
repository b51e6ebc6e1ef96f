/**
 * What a real boot found out about KVM on this host, remembered so that only the first run pays for
 * the probe. A verdict belongs to one host boot, one VMM build and one guest kernel: a reboot (new
 * modules, new /dev/kvm), another QEMU or another kernel is checked again.
 */
import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { writeFileAtomic } from '../fs-atomic.js';
import { cacheDir } from '../paths.js';

export interface VerdictKey {
  bootId: string;
  /** Identifies the VMM build: its path, size and mtime. */
  vmm: string;
  kernelSha256: string;
}

export interface KvmVerdict {
  key: VerdictKey;
  usable: boolean;
  /** Why KVM could not run the guest (the VMM's own words), when it could not. */
  reason?: string;
  decidedAt: string;
}

export function verdictDir(root = cacheDir()): string {
  return join(root, 'accel');
}

function fileFor(key: VerdictKey): string {
  const digest = createHash('sha256').update(JSON.stringify([key.bootId, key.vmm, key.kernelSha256])).digest('hex');
  return `kvm-${digest.slice(0, 24)}.json`;
}

function sameKey(a: VerdictKey, b: VerdictKey): boolean {
  return a.bootId === b.bootId && a.vmm === b.vmm && a.kernelSha256 === b.kernelSha256;
}

export async function readVerdict(key: VerdictKey, dir = verdictDir()): Promise<KvmVerdict | undefined> {
  try {
    const verdict = JSON.parse(await readFile(join(dir, fileFor(key)), 'utf8')) as KvmVerdict;
    return verdict && typeof verdict.usable === 'boolean' && verdict.key && sameKey(verdict.key, key) ? verdict : undefined;
  } catch {
    return undefined;
  }
}

/** Records a verdict; verdicts of earlier host boots are removed on the way (they can never match again). */
export async function recordVerdict(key: VerdictKey, usable: boolean, reason?: string, dir = verdictDir()): Promise<KvmVerdict> {
  const verdict: KvmVerdict = { key, usable, ...(reason ? { reason } : {}), decidedAt: new Date().toISOString() };
  await mkdir(dir, { recursive: true });
  await writeFileAtomic(join(dir, fileFor(key)), JSON.stringify(verdict, null, 2) + '\n');
  for (const file of await readdir(dir).catch(() => [] as string[])) {
    if (!/^kvm-[0-9a-f]+\.json$/.test(file)) continue;
    const other = await readFile(join(dir, file), 'utf8').then((text) => JSON.parse(text) as KvmVerdict).catch(() => undefined);
    if (!other?.key || other.key.bootId !== key.bootId) await rm(join(dir, file), { force: true });
  }
  return verdict;
}

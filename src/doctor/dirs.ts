import { constants } from 'node:fs';
import { access, stat, statfs } from 'node:fs/promises';
import { dirname } from 'node:path';
import type { Check } from './checks.js';

export interface DirectoryCheckOptions {
  /** The variable that moves this directory, for the fix line. */
  envVar: string;
  /** Whether exec itself writes here (state, cache) or only some commands do (templates): decides fail or warn. */
  neededByExec: boolean;
  /** Default: the current user. */
  uid?: number;
  /** Default 1 GiB: a staging image or a kernel build needs room. */
  minFreeBytes?: number;
}

const GIB = 1024 ** 3;

function size(bytes: number): string {
  return bytes >= GIB ? `${(bytes / GIB).toFixed(1)} GiB` : `${Math.floor(bytes / 1048576)} MiB`;
}

async function canWrite(path: string): Promise<boolean> {
  return access(path, constants.W_OK | constants.X_OK).then(
    () => true,
    () => false,
  );
}

async function freeBytes(path: string): Promise<number> {
  const fs = await statfs(path);
  return fs.bavail * fs.bsize;
}

async function nearestExisting(path: string): Promise<string> {
  let current = path;
  while (!(await stat(current).catch(() => undefined))) {
    const parent = dirname(current);
    if (parent === current) break;
    current = parent;
  }
  return current;
}

/** Owner, mode and free space of one of mvmctl's directories; a missing one is fine where it can be made. */
export async function checkDirectory(name: string, path: string, options: DirectoryCheckOptions): Promise<Check> {
  const uid = options.uid ?? process.getuid?.();
  const minFree = options.minFreeBytes ?? GIB;
  const unusable = options.neededByExec ? 'fail' : 'warn';
  const elsewhere = `set ${options.envVar} to a directory of your own`;
  const info = await stat(path).catch(() => undefined);

  if (!info) {
    const parent = await nearestExisting(dirname(path));
    if (!(await canWrite(parent))) return { name, status: unusable, summary: `${path} does not exist and ${parent} is not writable`, fix: elsewhere };
    const free = await freeBytes(parent);
    if (free < minFree) return { name, status: 'warn', summary: `${path}: will be created, but only ${size(free)} free`, fix: `free space on ${parent}, or ${elsewhere}` };
    return { name, status: 'ok', summary: `${path}: will be created (${size(free)} free)` };
  }
  if (!info.isDirectory()) return { name, status: unusable, summary: `${path} is not a directory`, fix: `remove it, or ${elsewhere}` };
  if (!(await canWrite(path))) return { name, status: unusable, summary: `${path} is not writable by you`, fix: `chown $USER ${path}, or ${elsewhere}` };

  const mode = (info.mode & 0o7777).toString(8).padStart(4, '0');
  const free = await freeBytes(path);
  const issues: string[] = [];
  const fixes: string[] = [];
  // Whoever else can write here can swap the VM's sockets, images or kernels under it.
  if (uid !== undefined && info.uid !== uid) {
    issues.push(`owned by uid ${info.uid}, not you (uid ${uid})`);
    fixes.push(`chown $USER ${path}`);
  }
  if (info.mode & 0o022) {
    issues.push(`group/other writable (mode ${mode})`);
    fixes.push(`chmod go-w ${path}`);
  }
  if (free < minFree) {
    issues.push(`only ${size(free)} free`);
    fixes.push(`free space there, or ${elsewhere}`);
  }
  if (issues.length > 0) return { name, status: 'warn', summary: `${path}: ${issues.join('; ')}`, fix: fixes.join('; ') };
  return { name, status: 'ok', summary: `${path} (mode ${mode}, ${size(free)} free)` };
}

import { randomBytes } from 'node:crypto';
import { open, readlink, rename, rm, symlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';

/**
 * Writes a file so that readers see the old content or the new one, never a part: the data goes to
 * a new hidden file beside it (created exclusively), then rename(2) puts it in place. With
 * `durable`, the data is fsynced before the rename and the directory after it, so the new content
 * is on disk when the promise resolves: for records that later steps rely on surviving a crash.
 */
export async function writeFileAtomic(path: string, data: string | Buffer, mode = 0o644, options: { durable?: boolean } = {}): Promise<void> {
  const tmp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  try {
    const file = await open(tmp, 'wx', mode);
    try {
      await file.writeFile(data);
      if (options.durable) await file.sync();
    } finally {
      await file.close();
    }
    await rename(tmp, path);
  } catch (error) {
    await rm(tmp, { force: true });
    throw error;
  }
  if (options.durable) {
    const dir = await open(dirname(path), 'r');
    try {
      await dir.sync();
    } finally {
      await dir.close();
    }
  }
}

/** A private name for new work by this process: `<prefix><pid>-<random>`. */
export function workName(prefix: string): string {
  return `${prefix}${process.pid}-${randomBytes(4).toString('hex')}`;
}

/** Points `link` at `target` (relative) atomically, replacing what it pointed to. */
export async function swapSymlink(link: string, target: string): Promise<string | undefined> {
  const previous = await readlink(link).catch(() => undefined);
  const tmp = `${link}.${workName('new-')}`;
  await symlink(target, tmp);
  try {
    await rename(tmp, link);
  } catch (error) {
    await rm(tmp, { force: true });
    throw error;
  }
  return previous;
}

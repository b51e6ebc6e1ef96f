/** What a file the image is made from was when it was read: its stat, and its hash (reused while the stat holds). */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';

export interface FileFingerprint {
  path: string;
  size: number;
  mtimeMs: number;
  ino: number;
  sha256: string;
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/**
 * The file's fingerprint. When `previous` describes the same path, size, mtime and inode its hash is
 * reused instead of reading the file again (unless `alwaysHash`).
 */
export async function fingerprint(path: string, previous?: FileFingerprint, alwaysHash = false): Promise<FileFingerprint> {
  const info = await stat(path);
  if (!info.isFile()) throw new Error(`${path} is not a regular file`);
  const base = { path, size: info.size, mtimeMs: info.mtimeMs, ino: info.ino };
  if (
    !alwaysHash &&
    previous &&
    previous.path === base.path &&
    previous.size === base.size &&
    previous.mtimeMs === base.mtimeMs &&
    previous.ino === base.ino
  ) {
    return { ...base, sha256: previous.sha256 };
  }
  return { ...base, sha256: await sha256File(path) };
}

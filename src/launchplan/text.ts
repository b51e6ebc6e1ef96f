/** Reading a small text file (a launch plan, an env file) with every failure as one line prefixed by `label`. */
import { readFile } from 'node:fs/promises';
import { MvmError } from '../errors.js';

export async function readText(path: string, label: string): Promise<string> {
  try {
    return await readFile(path, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') throw new MvmError(`${label}: no such file`);
    if (code === 'EISDIR') throw new MvmError(`${label}: is a directory, not a file`);
    if (code === 'EACCES' || code === 'EPERM') throw new MvmError(`${label}: permission denied`);
    throw new MvmError(`${label}: cannot read: ${(err as Error).message}`);
  }
}

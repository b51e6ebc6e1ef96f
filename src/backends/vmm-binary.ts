/** What a snapshot and a KVM verdict are tied to: the VMM build, by its `--version` line and its file. */
import { stat } from 'node:fs/promises';
import { MvmError } from '../errors.js';
import { lastLine, runTool } from '../run-tool.js';

export interface VmmIdentity {
  binary: string;
  size: number;
  mtimeMs: number;
}

/** The first line of `BINARY --version`, e.g. `QEMU emulator version 7.2.22 …` or `Firecracker v1.16.1`. */
export async function vmmVersionOf(binary: string): Promise<string> {
  const result = await runTool(binary, ['--version'], { timeoutMs: 10_000 });
  if (result.code !== 0) throw new MvmError(`${binary} --version failed: ${lastLine(result.stderr)}`);
  return result.stdout.split('\n')[0]!.trim();
}

/** Path, size and mtime: a cheap check that the binary is still the build `vmmVersionOf` read. */
export async function vmmIdentityOf(binary: string): Promise<VmmIdentity> {
  const info = await stat(binary);
  return { binary, size: info.size, mtimeMs: info.mtimeMs };
}

/**
 * debugfs exits 0 even when a command fails, so failures are read from stderr: everything except
 * its version banner is an error.
 */
export function debugfsErrors(stderr: string): string[] {
  return stderr
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !/^debugfs \d+\.\d+/.test(l));
}

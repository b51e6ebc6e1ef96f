import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after } from 'node:test';

/**
 * A private temporary tree for one test file, removed when the file's tests end, with
 * MVM_STATE_DIR inside it. `fresh(name)` makes a new directory in it. Real path: the code under
 * test resolves symlinks (macOS-style /tmp links would otherwise make paths differ).
 */
export function scratchTree(prefix: string): { base: string; stateDir: string; fresh: (name: string) => string } {
  const base = realpathSync(mkdtempSync(join(tmpdir(), prefix)));
  const stateDir = join(base, 'state', 'mvm');
  mkdirSync(join(base, 'state'));
  process.env.MVM_STATE_DIR = stateDir;
  // Trees may hold read-only directories, which a non-root user cannot empty without write permission.
  after(() => {
    execFileSync('chmod', ['-R', 'u+w', base]);
    rmSync(base, { recursive: true, force: true });
  });
  let counter = 0;
  const fresh = (name: string): string => {
    const dir = join(base, `${name}${counter++}`);
    mkdirSync(dir, { recursive: true });
    return dir;
  };
  return { base, stateDir, fresh };
}

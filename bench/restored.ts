// The restored fast paths of the default image against their yardsticks: gVisor's `runsc do` (what
// a user would reach for instead), QEMU's own restore of the same snapshot (the floor), the same exec
// without an --add-dir, and one exec at a time.
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { findExecutable } from '../src/which.js';
import { bareRestoreRunningTrue } from './floor.js';
import { agentReadySeconds, median, mvmctl, report, run, RUNS, timed } from './measure.js';

const CONCURRENT = 8;

export async function restoredFastPaths(work: string): Promise<void> {
  const env = { ...process.env, MVM_STATE_DIR: join(work, 'state'), MVM_NO_TCG_WARNING: '1' };
  const tree = join(work, 'ro-tree');
  await mkdir(tree, { recursive: true });
  for (let file = 0; file < 10; file++) await writeFile(join(tree, `f${file}`), `file ${file}\n`);
  // The first exec takes the snapshot when there is none yet; it is not measured.
  await run(mvmctl, ['exec', '--', 'true'], env);

  const runsc = findExecutable('runsc');
  const restored: number[] = [];
  const withDir: number[] = [];
  const gvisor: number[] = [];
  const floor: number[] = [];
  const vmShare: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    restored.push(await timed(() => run(mvmctl, ['exec', '--', 'true'], env)));
    vmShare.push(await agentReadySeconds(['exec', '--', 'true'], env));
    withDir.push(await timed(() => run(mvmctl, ['exec', '--add-dir', `${tree}:/data:ro`, '--', 'true'], env)));
    floor.push(await bareRestoreRunningTrue(work));
    if (runsc) gvisor.push(await timed(() => run(runsc, ['--network=none', 'do', '/bin/true'])));
  }
  if (runsc) report('mvmctl exec -- true, restored (wall s)', median(restored), '`runsc --network=none do /bin/true`', median(gvisor), 2.5);
  else console.log('mvmctl exec -- true vs runsc do: skipped (runsc not installed; Debian bookworm-backports has it)');
  report('mvmctl exec -- true, restored (wall s)', median(restored), 'bare QEMU restore of the same snapshot running true', median(floor), 1.5);
  // What mvmctl adds around the VM's own start: node, the CLI, host preparation, the command, the stop.
  const outside = median(restored) - median(vmShare);
  report('  restored exec wall minus VMM start -> agent ready (s)', outside, 'the target', 0.12, 1);
  report('exec --add-dir (ro, 10 files) -- true, restored (wall s)', median(withDir), 'the same without --add-dir', median(restored), 1.3);

  const single = median(restored);
  const together = await timed(() => Promise.all(Array.from({ length: CONCURRENT }, () => run(mvmctl, ['exec', '--', 'true'], env))));
  report(`${CONCURRENT} concurrent restored execs, all succeeded (wall s)`, together, `${CONCURRENT} × single / 2 cores`, (CONCURRENT * single) / 2, 1.3);
}

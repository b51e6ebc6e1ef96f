// The floor under a restored exec: QEMU itself restoring the default image's snapshot, then the
// agent's HELLO and one EXEC of `true`, driven in-process with none of mvmctl's own steps (no CLI,
// no image or snapshot checks, no state record, no parent-death wrapper).
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { agentSocketPath, hostTscKhz, qemuArgs, qmpSocketPath, waitForMigration } from '../src/backends/qemu/index.js';
import { Qmp } from '../src/backends/qemu/qmp.js';
import { connectWhenListening } from '../src/backends/unix-socket.js';
import { ensureDefaultImage } from '../src/image/index.js';
import { AgentSession } from '../src/protocol/index.js';
import { readSnapshotMeta } from '../src/snapshots/subject.js';

const DEADLINE_MS = 60_000;

/**
 * Seconds from spawning QEMU to its exit after the restored guest ran `true`. Needs the default
 * image's snapshot. A failure leaves its directory under `work`, which the bench removes.
 */
export async function bareRestoreRunningTrue(work: string): Promise<number> {
  const image = await ensureDefaultImage({});
  const found = await readSnapshotMeta(image.dir);
  if (!found) throw new Error('the default image has no snapshot yet: run `mvmctl exec -- true` first');
  const { dir, meta } = found;
  const runDir = await mkdtemp(join(work, 'floor-'));
  const signal = AbortSignal.timeout(DEADLINE_MS);
  const args = qemuArgs(
    {
      name: 'floor',
      runDir,
      kernel: image.kernel,
      initrd: image.initrd,
      kernelArgs: image.kernelArgs,
      accel: meta.accel,
      cpus: meta.cpus,
      memoryMiB: meta.memoryMiB,
      // The snapshot's own empty slots, read-only: nothing is written to them.
      drives: meta.driveSlots.files.map((slot) => ({ path: join(dir, slot), readOnly: true })),
      snapshot: { mode: 'restore', dir },
    },
    { tscKhz: hostTscKhz() },
  );
  const start = performance.now();
  const qemu = spawn('qemu-system-x86_64', args, { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => qemu.once('close', () => resolve()));
  let gone = false;
  void exited.then(() => (gone = true));
  const goneError = () => new Error('QEMU exited during the bare restore');
  try {
    const qmp = await Qmp.connect(qmpSocketPath(runDir), () => gone, signal, () => {});
    await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    await qmp.execute('migrate-incoming', { uri: `exec:cat ${join(dir, meta.files.state.file)}` });
    await waitForMigration(qmp, signal);
    await qmp.execute('cont');
    const socket = await connectWhenListening(agentSocketPath(runDir), { signal, gone: () => gone, goneError, retryMs: 10 });
    const session = await AgentSession.connect(socket, { signal });
    const handle = await session.exec({ argv: ['true'] });
    handle.stdout.resume();
    handle.stderr.resume();
    const status = await handle.exit;
    if (status.code !== 0) throw new Error(`bare restore: true exited ${JSON.stringify(status)}`);
    session.close();
    qmp.close();
  } finally {
    qemu.kill('SIGKILL');
    await exited;
  }
  const seconds = (performance.now() - start) / 1000;
  await rm(runDir, { recursive: true, force: true });
  return seconds;
}

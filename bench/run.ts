// `npm run bench`: mvmctl against baselines measured side by side in the same run (runs interleaved,
// medians), because these machines are shared and TCG speed drifts ±30 % from run to run.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { QemuBackend, agentSocketPath, findVhostDeviceVsock, hostTscKhz, qemuArgs } from '../src/backends/qemu/index.js';
import { accelChoice, type Accel } from '../src/accel/index.js';
import { planBootAccel } from '../src/vm/index.js';
import { benchRoundTrip } from '../src/dirsync/index.js';
import { writeCpio } from '../src/image/cpio.js';
import { ensureDefaultImage, type GuestImage } from '../src/image/index.js';
import { AgentSession } from '../src/protocol/index.js';
import { agentReadySeconds, median, mvmctl, peakRssMb, report, run, RUNS, timed } from './measure.js';
import { restoredFastPaths } from './restored.js';

const MEMORY_MIB = 512;
const CPUS = 2;
const THROUGHPUT_BYTES = 100_000_000;




/** A bare initramfs: busybox and an init that runs `script`, then reboots (ends QEMU under -no-reboot). */
function bareInitramfs(script: string): Buffer {
  const busybox = readFileSync('/bin/busybox');
  return writeCpio([
    { type: 'dir', path: 'dev' },
    { type: 'char', path: 'dev/console', major: 5, minor: 1, mode: 0o600 },
    { type: 'dir', path: 'bin' },
    { type: 'dir', path: 'proc' },
    { type: 'dir', path: 'sys' },
    { type: 'dir', path: 'tmp' },
    { type: 'file', path: 'bin/busybox', data: busybox, mode: 0o755 },
    { type: 'symlink', path: 'bin/sh', target: 'busybox' },
    { type: 'file', path: 'init', data: Buffer.from(`#!/bin/busybox sh\n/bin/busybox --install -s /bin\n${script}\nreboot -f\n`), mode: 0o755 },
  ]);
}

function bareQemu(image: GuestImage, initrd: string, runDir: string): string[] {
  const args = qemuArgs(
    { name: 'bench', runDir, kernel: image.kernel, initrd, kernelArgs: ['quiet', 'rdinit=/init'], accel, cpus: CPUS, memoryMiB: MEMORY_MIB, drives: [] },
    { tscKhz: hostTscKhz() },
  );
  return args;
}

async function coldExec(image: GuestImage, work: string): Promise<void> {
  const initrd = join(work, 'true.cpio');
  await writeFile(initrd, bareInitramfs('/bin/true'));
  const env = { ...process.env, MVM_STATE_DIR: join(work, 'state'), MVM_NO_TCG_WARNING: '1' };
  const exec: number[] = [];
  const restored: number[] = [];
  const bare: number[] = [];
  const node: number[] = [];
  const version: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    exec.push(await timed(() => run(mvmctl, ['exec', '--no-snapshot', '--cpus', String(CPUS), '--memory', `${MEMORY_MIB}M`, '--', 'true'], env)));
    restored.push(await timed(() => run(mvmctl, ['exec', '--', 'true'], env)));
    bare.push(await timed(() => run('qemu-system-x86_64', bareQemu(image, initrd, work))));
    node.push(await timed(() => run(process.execPath, ['-e', '0'])));
    version.push(await timed(() => run(mvmctl, ['--version'])));
  }
  report('mvmctl exec --no-snapshot -- true (wall s)', median(exec), 'bare QEMU boot running true', median(bare), 1.1);
  report('mvmctl exec -- true, default image restored (wall s)', median(restored), 'the same booted cold', median(exec), undefined);
  report('mvmctl exec -- true, default image restored (wall s)', median(restored), '`node -e 0`', median(node), undefined);
  report('mvmctl --version (wall s)', median(version), '`node -e 0`', median(node), 1.3);
}

/** VMM start to the agent's HELLO answer, through the product's own backend and session. */
async function timeToHello(image: GuestImage, work: string): Promise<void> {
  const samples: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    const runDir = await mkdtemp(join(work, 'vm-'));
    const abort = new AbortController();
    const vm = await new QemuBackend().start(
      { name: `bench-${i}`, runDir, kernel: image.kernel, initrd: image.initrd, kernelArgs: image.kernelArgs, accel, cpus: CPUS, memoryMiB: MEMORY_MIB, drives: [] },
      abort.signal,
    );
    const start = performance.now();
    const session = await AgentSession.connect(await vm.connectAgent(abort.signal), { signal: abort.signal });
    samples.push((performance.now() - start) / 1000);
    session.close();
    await vm.kill();
  }
  console.log(`VMM start -> agent hello: median ${median(samples).toFixed(3)} s over ${RUNS} runs`);
}

async function throughput(image: GuestImage, work: string): Promise<void> {
  const env = { ...process.env, MVM_STATE_DIR: join(work, 'state'), MVM_NO_TCG_WARNING: '1' };
  const initrd = join(work, 'raw.cpio');
  // The raw channel: the guest's init writes the same bytes straight into the virtio-serial port.
  await writeFile(
    initrd,
    bareInitramfs(
      [
        'mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev',
        `head -c ${THROUGHPUT_BYTES} /dev/zero > /tmp/big`,
        'for p in /sys/class/virtio-ports/*; do [ "$(cat $p/name)" = org.mvm.agent ] && port=/dev/${p##*/}; done',
        'cat /tmp/big > $port; sleep 2',
      ].join('\n'),
    ),
  );
  const catBig = ['sh', '-c', `head -c ${THROUGHPUT_BYTES} /dev/zero > /tmp/big && cat /tmp/big`];
  const viaExec: number[] = [];
  const raw: number[] = [];
  // Both agent channels, on cold boots (restored VMs always use the port): vsock through
  // vhost-device-vsock where it is installed, and the virtio-serial port.
  const viaVsock: number[] = [];
  const viaPort: number[] = [];
  const vsock = findVhostDeviceVsock() !== undefined;
  for (let i = 0; i < Math.min(RUNS, 5); i++) {
    viaExec.push(await streamRate((onData) => run(mvmctl, ['exec', '--', ...catBig], env, onData)));
    raw.push(await rawChannelRate(image, initrd, work));
    if (!vsock) continue;
    viaVsock.push(await streamRate((onData) => run(mvmctl, ['exec', '--no-snapshot', '--', ...catBig], env, onData)));
    viaPort.push(await streamRate((onData) => run(mvmctl, ['exec', '--no-snapshot', '--', ...catBig], { ...env, MVM_QEMU_VSOCK: '0' }, onData)));
  }
  report('stdout of cat via mvmctl exec (MB/s)', median(viaExec), 'raw virtio-serial channel', median(raw), 0.8, true);
  const rss = await peakRssMb(mvmctl, ['exec', '--timeout', '600', '--', 'head', '-c', String(2 ** 30), '/dev/zero'], env);
  report('mvmctl peak RSS while 1 GiB streams (MB)', rss, 'the target', 100, 1);
  if (vsock) report('the same, cold, agent on vsock (MB/s)', median(viaVsock), 'cold, agent on the virtio-serial port', median(viaPort), undefined);
  else console.log('agent on vsock vs the virtio-serial port: skipped, vhost-device-vsock is not installed');
}

/** MB/s from the first byte to the last, so boot time does not count. */
async function streamRate(start: (onData: (chunk: Buffer) => void) => Promise<unknown>): Promise<number> {
  let first = 0;
  let last = 0;
  let bytes = 0;
  await start((chunk) => {
    if (!first) first = performance.now();
    last = performance.now();
    bytes += chunk.length;
  });
  return bytes / 1e6 / ((last - first) / 1000);
}

async function rawChannelRate(image: GuestImage, initrd: string, work: string): Promise<number> {
  const runDir = await mkdtemp(join(work, 'raw-'));
  const qemu = spawn('qemu-system-x86_64', bareQemu(image, initrd, runDir), { stdio: 'ignore' });
  try {
    return await streamRate(async (onData) => {
      for (;;) {
        try {
          await new Promise<void>((resolve, reject) => {
            const socket = connect(agentSocketPath(runDir));
            socket.once('error', reject);
            let received = 0;
            socket.on('data', (chunk: Buffer) => {
              onData(chunk);
              received += chunk.length;
              if (received >= THROUGHPUT_BYTES) {
                socket.destroy();
                resolve();
              }
            });
            socket.on('close', () => resolve());
          });
          return;
        } catch {
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
      }
    });
  } finally {
    qemu.kill('SIGKILL');
  }
}

/**
 * `exec --manifest` of one template (the default image, snapshot taken at the bench's size) restored
 * from its snapshot vs booted cold with --no-snapshot, interleaved. Target: ratio <= 0.25.
 */
async function snapshotExec(work: string): Promise<void> {
  const env = { ...process.env, MVM_STATE_DIR: join(work, 'state'), MVM_DATA_DIR: join(work, 'data'), MVM_NO_TCG_WARNING: '1' };
  await run(mvmctl, ['template', 'build', 'bench', '--cpus', String(CPUS), '--memory', `${MEMORY_MIB}M`, '--snapshot'], env);
  const restored: number[] = [];
  const cold: number[] = [];
  const restoredHello: number[] = [];
  const coldHello: number[] = [];
  for (let i = 0; i < Math.max(RUNS, 5); i++) {
    restored.push(await timed(() => run(mvmctl, ['exec', '--manifest', 'bench', '--', 'true'], env)));
    cold.push(await timed(() => run(mvmctl, ['exec', '--no-snapshot', '--manifest', 'bench', '--', 'true'], env)));
    // The VM's share of it: from starting the VMM to the agent's answer, as mvmctl -v reports it.
    restoredHello.push(await agentReadySeconds(['exec', '--manifest', 'bench', '--', 'true'], env));
    coldHello.push(await agentReadySeconds(['exec', '--no-snapshot', '--manifest', 'bench', '--', 'true'], env));
  }
  report('exec --manifest -- true, restored from snapshot (wall s)', median(restored), 'cold boot of the same template', median(cold), 0.25);
  report('  VMM start -> agent ready, restored (s)', median(restoredHello), 'cold', median(coldHello), 0.25);
}

/**
 * --add-dir rw round trip of 100 MB / 1000 files with no guest changes: the host-side steps against
 * the same steps by hand (mke2fs -d, debugfs rdump, rsync -aH --delete), and the whole exec against a
 * plain exec, whose difference is what --add-dir adds on top of the boot.
 */
async function addDirRoundTrip(work: string): Promise<void> {
  const steps = await benchRoundTrip(join(work, 'roundtrip'), Math.min(RUNS, 5));
  report('--add-dir rw round trip, host steps (s)', steps.oursMs / 1000, 'same steps by hand', steps.byHandMs / 1000, 1.3);
  const tree = join(work, 'tree');
  for (let dir = 0; dir < 10; dir++) {
    await mkdir(join(tree, `d${dir}`), { recursive: true });
    for (let file = 0; file < 100; file++) await writeFile(join(tree, `d${dir}`, `f${file}`), randomBytes(100_000));
  }
  const env = { ...process.env, MVM_STATE_DIR: join(work, 'state'), MVM_NO_TCG_WARNING: '1' };
  const withDir: number[] = [];
  const plain: number[] = [];
  for (let i = 0; i < Math.min(RUNS, 5); i++) {
    withDir.push(await timed(() => run(mvmctl, ['exec', '--add-dir', `${tree}:/work:rw`, '--', 'true'], env)));
    plain.push(await timed(() => run(mvmctl, ['exec', '--', 'true'], env)));
  }
  const added = median(withDir) - median(plain);
  report('--add-dir rw 100 MB/1000 files, added to exec wall (s)', added, 'same steps by hand', steps.byHandMs / 1000, 1.3);
}


let accel: Accel = 'tcg';
const work = await mkdtemp(join(tmpdir(), 'mvm-bench-'));
try {
  const image = await ensureDefaultImage({});
  const plan = await planBootAccel(new QemuBackend(), accelChoice(undefined), image.kernelSha256, (line) => console.log(line));
  // Bare QEMU has no fallback: until a boot has proven KVM on this host, the yardsticks run under TCG.
  accel = plan.probe ? 'tcg' : plan.accel;
  console.log(`mvmctl bench: ${RUNS} interleaved runs each, ${CPUS} vCPUs, ${MEMORY_MIB} MiB, accelerator: ${accel}`);
  await coldExec(image, work);
  await timeToHello(image, work);
  await throughput(image, work);
  await snapshotExec(work);
  await addDirRoundTrip(work);
  await restoredFastPaths(work);
} finally {
  await rm(work, { recursive: true, force: true });
}

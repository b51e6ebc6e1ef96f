// End to end: more README promises that no other e2e file pins down (template snapshot commands,
// MVM_BOOT_TIMEOUT, rw directories discarded on SIGHUP and on a crash, output backpressure, the
// backends). Each test fails when its promise breaks.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { accessSync, closeSync, constants, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync, symlinkSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { inspectKvmHost } from '../../src/accel/index.js';
import { treeDigest } from '../../src/dirsync/index.js';
import { assertNoVmLeft, collect, dirMaker, isolatedEnv, mvmctl, startMvmctl, vmmPidsMentioning, waitForOutput } from './helpers.js';

const isolated = isolatedEnv();
const { stateDir } = isolated;
const dataDir = mkdtempSync(join(tmpdir(), 'mvm-e2e-more-data-'));
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-more-'));
const templatesDir = join(dataDir, 'templates');
// The QEMU backend under whatever accelerator auto picks; no Firecracker (double) from the caller's environment.
const env: NodeJS.ProcessEnv = { ...isolated.env, MVM_DATA_DIR: dataDir };
for (const name of ['MVM_BACKEND', 'MVM_ACCEL', 'MVM_KVM_PRECHECK', 'MVM_FIRECRACKER', 'MVM_QEMU', 'MVM_BOOT_TIMEOUT', 'MVM_QEMU_VSOCK']) delete env[name];

after(() => {
  isolated.cleanup();
  rmSync(dataDir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

before(async () => {
  const built = await mvmctl(['image', 'build'], env);
  assert.equal(built.code, 0, built.stderr);
});

const lines = (text: string | Buffer) => text.toString().split('\n').filter((line) => line !== '');
const restored = (stderr: string) => /\[timing\] restored from snapshot/.test(stderr);
const freshDir = dirMaker(work);

/** A root file system with nothing but a static busybox and a file of ours. */
function tinyRootfs(dir: string): void {
  mkdirSync(join(dir, 'bin'), { recursive: true });
  mkdirSync(join(dir, 'etc'));
  copyFileSync('/bin/busybox', join(dir, 'bin', 'busybox'));
  for (const applet of ['sh', 'cat', 'ls', 'echo', 'head', 'sleep']) symlinkSync('busybox', join(dir, 'bin', applet));
  writeFileSync(join(dir, 'etc', 'motd'), 'hello from the tiny rootfs\n');
}

describe('template snapshot commands (tiny busybox template)', { skip: existsSync('/bin/busybox') ? false : 'no /bin/busybox on this host to build the tiny root file system from' }, () => {
  const snapshotDir = () => join(templatesDir, 'tiny', 'snapshot');
  before(async () => {
    const rootfs = join(work, 'tiny-root');
    tinyRootfs(rootfs);
    // 128 MiB: --verify reads the whole RAM file.
    const built = await mvmctl(['template', 'build', 'tiny', '--rootfs-dir', rootfs, '--disk-free', '64M', '--memory', '128M', '--snapshot'], env);
    assert.equal(built.code, 0, built.stderr);
  });

  test('info --verify: all checksums match when intact; a changed byte is found although inode, size and mtime are as recorded', async () => {
    const intact = await mvmctl(['template', 'info', 'tiny', '--verify'], env);
    assert.equal(intact.code, 0, intact.stdout.toString() + intact.stderr);
    assert.match(intact.stdout.toString(), /^verify: +all checksums match$/m);
    const intactJson = await mvmctl(['template', 'info', 'tiny', '--json', '--verify'], env);
    assert.equal(intactJson.code, 0, intactJson.stderr);
    assert.deepEqual((JSON.parse(intactJson.stdout.toString()) as { verifyProblems: string[] }).verifyProblems, []);

    const meta = JSON.parse(readFileSync(join(snapshotDir(), 'snapshot.json'), 'utf8')) as { files: Record<string, { file: string; size: number; mtimeMs: number; ino: number }> };
    // The state file's case is in template.test.ts; here the RAM file and the root disk overlay.
    const targets = [meta.files.ram!, meta.files.disk!];
    assert.ok(targets.every(Boolean), 'the snapshot of a root file system template has a ram and a disk file');
    for (const record of targets) {
      const path = join(snapshotDir(), record.file);
      const times = join(work, `${record.file}.times`);
      writeFileSync(times, '');
      assert.equal(spawnSync('touch', ['-r', path, times]).status, 0);
      const offset = Math.min(4096, record.size - 1);
      const fd = openSync(path, 'r+');
      const original = Buffer.alloc(1);
      readSync(fd, original, 0, 1, offset);
      try {
        writeSync(fd, Buffer.from([original[0]! ^ 0xff]), 0, 1, offset);
        assert.equal(spawnSync('touch', ['-r', times, path]).status, 0);
        const info = statSync(path);
        assert.deepEqual([info.ino, info.size, info.mtimeMs], [record.ino, record.size, record.mtimeMs], 'only the contents changed: the per-run checks cannot tell');
        const damaged = await mvmctl(['template', 'info', 'tiny', '--verify'], env);
        assert.equal(damaged.code, 1, damaged.stdout.toString() + damaged.stderr);
        assert.match(damaged.stdout.toString(), new RegExp(`^verify: +${record.file.replace('.', '\\.')}: checksum mismatch$`, 'm'));
        const json = await mvmctl(['template', 'info', 'tiny', '--json', '--verify'], env);
        assert.equal(json.code, 1);
        assert.deepEqual((JSON.parse(json.stdout.toString()) as { verifyProblems: string[] }).verifyProblems, [`${record.file}: checksum mismatch`]);
      } finally {
        writeSync(fd, original, 0, 1, offset);
        closeSync(fd);
        spawnSync('touch', ['-r', times, path]);
      }
    }
    const again = await mvmctl(['template', 'info', 'tiny', '--verify'], env);
    assert.equal(again.code, 0, again.stdout.toString());
  });

  test('snapshot --rm removes the snapshot: info says none, its files are gone, exec boots cold (noted with -v); a second --rm exits 1', async () => {
    const removed = await mvmctl(['template', 'snapshot', 'tiny', '--rm'], env);
    assert.equal(removed.code, 0, removed.stderr);
    assert.equal(removed.stderr, '');
    assert.deepEqual(readdirSync(join(templatesDir, 'tiny')).filter((entry) => entry === 'snapshot' || entry.startsWith('snap-')), [], 'neither the link nor a snap-* directory is left');
    const info = await mvmctl(['template', 'info', 'tiny'], env);
    assert.match(info.stdout.toString(), /^snapshot: +none /m);
    const ls = JSON.parse((await mvmctl(['template', 'ls', '--json'], env)).stdout.toString()) as Array<{ name: string; snapshot: unknown }>;
    assert.deepEqual(ls.map((t) => [t.name, t.snapshot]), [['tiny', null]]);

    const run = await mvmctl(['exec', '-v', '--manifest', 'tiny', '--', 'cat', '/etc/motd'], env);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.toString(), 'hello from the tiny rootfs\n');
    assert.ok(!restored(run.stderr), run.stderr);
    assert.ok(lines(run.stderr).includes('mvmctl: template tiny has no snapshot: booting cold'), run.stderr);
    const quiet = await mvmctl(['exec', '--manifest', 'tiny', '--', 'cat', '/etc/motd'], env);
    assert.equal(quiet.code, 0, quiet.stderr);
    assert.equal(quiet.stderr, '', 'without -v a template without a snapshot boots cold silently');

    const again = await mvmctl(['template', 'snapshot', 'tiny', '--rm'], env);
    assert.equal(again.code, 1);
    assert.equal(again.stderr, "mvmctl: template 'tiny' has no snapshot\n");
    await assertNoVmLeft(stateDir);
  });

  test('rm --force while a VM of the template runs: the template is gone at once, the VM finishes its command with the template’s files', async () => {
    const snap = await mvmctl(['template', 'snapshot', 'tiny'], env);
    assert.equal(snap.code, 0, snap.stderr);
    // The command waits for a line on stdin, then reads a file from the root drive it had not read yet.
    const child = startMvmctl(['exec', '-v', '-i', '--manifest', 'tiny', '--', 'sh', '-c', 'echo started; read line; echo "got $line"; cat /etc/motd'], env, 'pipe');
    const done = collect(child);
    await waitForOutput(child, 'started\n');
    const inUse = JSON.parse((await mvmctl(['template', 'info', 'tiny', '--json'], env)).stdout.toString()) as { inUseBy: string[] };
    assert.equal(inUse.inUseBy.length, 1, 'the running VM counts as a user of the template');
    const removed = await mvmctl(['template', 'rm', 'tiny', '--force'], env);
    assert.equal(removed.code, 0, removed.stderr);
    assert.deepEqual(readdirSync(templatesDir), [], 'the link and its version directory are gone');
    assert.equal(vmmPidsMentioning(stateDir).length, 1, 'the VM still runs');
    child.stdin!.end('go\n');
    const result = await done;
    assert.equal(result.code, 0, result.stderr);
    assert.ok(restored(result.stderr), 'the VM was restored from the snapshot that was removed under it');
    assert.equal(result.stdout.toString(), 'started\ngot go\nhello from the tiny rootfs\n');
    const gone = await mvmctl(['exec', '--manifest', 'tiny', '--', 'cat', '/etc/motd'], env);
    assert.equal(gone.code, 125);
    assert.match(gone.stderr, /^mvmctl: no template named 'tiny' \(there are none yet: [^\n]+\)\n$/);
    await assertNoVmLeft(stateDir);
  });
});

// A template without a snapshot: exec boots it cold and never takes a snapshot first (the default
// image's exec would, when that snapshot is missing or stale in the shared cache).
test('MVM_BOOT_TIMEOUT the guest cannot meet: exit 125, one line naming MVM_BOOT_TIMEOUT, nothing left running', async () => {
  const built = await mvmctl(['template', 'build', 'plain'], env);
  assert.equal(built.code, 0, built.stderr);
  try {
    const result = await mvmctl(['exec', '--manifest', 'plain', '--', 'echo', 'never'], { ...env, MVM_BOOT_TIMEOUT: '0.001' });
    assert.equal(result.code, 125, result.stderr);
    assert.equal(result.stdout.toString(), '');
    assert.match(result.stderr, /^mvmctl: the guest's agent did not answer within [\d.]+ s \(raise MVM_BOOT_TIMEOUT if the host is very slow\)\n(  \| .*\n)*$/, 'one line, then at most the console tail');
    await assertNoVmLeft(stateDir);
    const ok = await mvmctl(['exec', '--manifest', 'plain', '--', 'echo', 'boots'], { ...env, MVM_BOOT_TIMEOUT: '600' });
    assert.equal(ok.stdout.toString(), 'boots\n', 'the same boot with time to answer works');
  } finally {
    await mvmctl(['template', 'rm', 'plain'], env);
  }
});

describe('a rw --add-dir is not synced back when the run ends early', () => {
  const discarded = (dir: string) => `mvmctl: --add-dir ${dir}:/work:rw: guest changes discarded, ${dir} left as it was`;
  // The changes are on the guest's disk (sync) before the run is cut short: a sync-back would bring them.
  const change = 'rm /work/a.txt; echo x > /work/new; echo changed >> /work/sub/b.txt; sync';

  test('SIGHUP to mvmctl: exit 129, HOST untouched, one line says the changes were discarded', async () => {
    const dir = freshDir({ 'a.txt': 'a\n', 'sub/b.txt': 'b\n' });
    const before = treeDigest(dir);
    const child = startMvmctl(['exec', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', `${change}; echo ready; sleep 100`], env);
    const done = collect(child);
    await waitForOutput(child, 'ready\n');
    child.kill('SIGHUP');
    const result = await done;
    assert.equal(result.code, 129, result.stderr);
    assert.deepEqual(lines(result.stderr), [discarded(dir)]);
    assert.equal(treeDigest(dir), before);
    assert.deepEqual(readdirSync(dir).sort(), ['a.txt', 'sub'], 'no .mvm-sync-* staging left in HOST');
    await assertNoVmLeft(stateDir);
  });

  test('a guest crash mid-command (kernel panic): exit 125, HOST untouched, one line says the changes were discarded', async () => {
    const dir = freshDir({ 'a.txt': 'a\n', 'sub/b.txt': 'b\n' });
    const before = treeDigest(dir);
    // The kernel has no sysrq; panic_on_oom with an overcommitted 1 GiB buffer panics it.
    const crash = `${change}; echo before; echo 1 > /proc/sys/vm/overcommit_memory; echo 1 > /proc/sys/vm/panic_on_oom; dd if=/dev/zero of=/dev/null bs=1G count=1; echo after`;
    const result = await mvmctl(['exec', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', crash], env);
    assert.equal(result.code, 125, result.stderr);
    assert.equal(result.stdout.toString(), 'before\n');
    const errorLines = lines(result.stderr).filter((line) => !line.startsWith('  | '));
    assert.deepEqual(errorLines.filter((line) => line.includes('discarded')), [discarded(dir)], result.stderr);
    assert.equal(errorLines.filter((line) => /^mvmctl: the VM stopped before the command finished /.test(line)).length, 1, result.stderr);
    assert.equal(errorLines.length, 2, result.stderr);
    assert.equal(treeDigest(dir), before);
    await assertNoVmLeft(stateDir);
  });
});

test('a slow stdout reader holds the guest back; once it reads, all 128 MiB arrive intact', async (t) => {
  const BLOCK = 65_536;
  const BLOCKS = 2000;
  // Generous for the pipes, sockets and bounded buffers between the command and this test (6-10 MiB
  // measured here, restored guest on the virtio-serial port); a quarter of the 128 MiB.
  const BOUND = 32 * 1024 * 1024;
  // The command's stdout is what is throttled, and stderr shares the agent's connection, so the
  // guest reports on its console instead (read by mvmctl on its own channel, shown with -v): a
  // line per block written, and a tick from another process to show the guest keeps running.
  const script = [
    '(while :; do echo mvm-tick > /dev/console; sleep 0.1; done) </dev/null >/dev/null 2>&1 & t=$!',
    `i=0; while [ $i -lt ${BLOCKS} ]; do head -c ${BLOCK} /dev/zero; i=$((i+1)); echo "mvm-progress $i" > /dev/console; done`,
    'kill $t; echo done >&2',
  ].join('\n');
  const child = startMvmctl(['exec', '-v', '--timeout', '600', '--', 'sh', '-c', script], env);
  let paused = true;
  let progress = 0;
  let maxWhilePaused = 0;
  let lastTickProgress = -1;
  let stillTicks = 0;
  let received = 0;
  let nonZero = false;
  let stderr = '';
  const commandStderr: string[] = [];
  const resume = () => {
    if (!paused) return;
    paused = false;
    child.stdout!.on('data', (chunk: Buffer) => {
      received += chunk.length;
      if (!nonZero && chunk.some((byte) => byte !== 0)) nonZero = true;
    });
  };
  child.stderr!.on('data', (chunk: Buffer) => {
    stderr += chunk.toString('utf8');
    let newline;
    while ((newline = stderr.indexOf('\n')) >= 0) {
      const line = stderr.slice(0, newline);
      stderr = stderr.slice(newline + 1);
      const step = /^mvmctl: \[console\] mvm-progress (\d+)$/.exec(line);
      if (step) {
        progress = Number(step[1]);
        if (paused) maxWhilePaused = progress;
        // Past the bound while nothing is read: the guest is not held back (stop waiting, fail below).
        if (paused && progress * BLOCK > BOUND) resume();
      } else if (line === 'mvmctl: [console] mvm-tick') {
        if (!paused || progress === 0) continue;
        stillTicks = progress === lastTickProgress ? stillTicks + 1 : 0;
        lastTickProgress = progress;
        // The guest ran on for 20 ticks and wrote no further block: it is blocked on its stdout.
        if (stillTicks >= 20) resume();
      } else if (!line.startsWith('mvmctl: ')) commandStderr.push(line);
    }
  });
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  t.diagnostic(`held back after ${maxWhilePaused} blocks (${((maxWhilePaused * BLOCK) / 1048576).toFixed(1)} MiB) while nothing read stdout`);
  assert.ok(maxWhilePaused * BLOCK <= BOUND, `the guest wrote ${maxWhilePaused} blocks (${maxWhilePaused * BLOCK} bytes) while nothing read its output`);
  assert.ok(maxWhilePaused > 0, 'the guest wrote something before it was held back');
  assert.ok(stillTicks >= 20, 'the guest kept running while its writer was held back');
  assert.equal(code, 0);
  assert.equal(progress, BLOCKS);
  assert.equal(received, BLOCKS * BLOCK, 'every byte arrives once the reader reads');
  assert.ok(!nonZero, 'and intact (all zeros)');
  assert.deepEqual(commandStderr, ['done']);
  await assertNoVmLeft(stateDir);
});

function onPath(binary: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    try {
      accessSync(join(dir, binary), constants.X_OK);
      return join(dir, binary);
    } catch {
      // not here
    }
  }
  return undefined;
}

describe('--backend', () => {
  const QEMU_CHANNEL = /^mvmctl: \[timing\] VMM started \(agent over (virtio-serial port|vsock \(vhost-device-vsock\))\): /m;

  /** Runs a command that waits for stdin under `flags`; while it runs, the VMM's command line. */
  async function runAndInspect(flags: string[], runEnv: NodeJS.ProcessEnv): Promise<{ vmm: string; result: Awaited<ReturnType<typeof collect>> }> {
    const child = startMvmctl(['exec', '-v', '-i', ...flags, '--', 'sh', '-c', 'echo ready; read line; echo "got $line"'], runEnv, 'pipe');
    const done = collect(child);
    await waitForOutput(child, 'ready\n');
    const pids = vmmPidsMentioning(stateDir);
    assert.equal(pids.length, 1);
    const vmm = readFileSync(`/proc/${pids[0]}/cmdline`, 'utf8').split('\0')[0]!;
    child.stdin!.end('go\n');
    return { vmm, result: await done };
  }

  test('--backend qemu runs the command on QEMU (-v names a QEMU channel), over MVM_BACKEND=firecracker', async () => {
    const { vmm, result } = await runAndInspect(['--backend', 'qemu'], { ...env, MVM_BACKEND: 'firecracker', MVM_FIRECRACKER: '/nonexistent/firecracker' });
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'ready\ngot go\n');
    assert.match(vmm, /qemu-system-x86_64$/);
    assert.match(result.stderr, QEMU_CHANNEL);
    await assertNoVmLeft(stateDir);
  });

  const host = inspectKvmHost();
  const kvmRuledOut = host.device !== 'present' || Boolean(host.ruledOut);
  test('--backend auto picks QEMU here, as doctor says', {
    skip: onPath('firecracker') && !kvmRuledOut ? 'a Firecracker binary is on PATH and the host checks do not rule KVM out: auto may pick Firecracker here' : false,
  }, async () => {
    const doctor = await mvmctl(['doctor', '--json'], env);
    const row = (JSON.parse(doctor.stdout.toString()) as { checks: { name: string; status: string; summary: string }[] }).checks.find((check) => check.name === 'backend');
    assert.equal(row?.status, 'ok', doctor.stdout.toString());
    assert.match(row!.summary, /^qemu: auto: QEMU, because /);
    const { vmm, result } = await runAndInspect(['--backend', 'auto'], { ...env, MVM_BACKEND: 'firecracker' });
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'ready\ngot go\n');
    assert.match(vmm, /qemu-system-x86_64$/);
    assert.match(result.stderr, QEMU_CHANNEL);
    await assertNoVmLeft(stateDir);
  });

  test('auto takes QEMU where the host checks rule KVM out, even with a Firecracker binary found', {
    skip: kvmRuledOut ? false : 'the host checks do not rule KVM out here, so auto would pick a Firecracker binary it finds',
  }, async () => {
    // /bin/true as Firecracker: a run that picked it would fail.
    const fcEnv = { ...env, MVM_FIRECRACKER: '/bin/true' };
    const doctor = await mvmctl(['doctor', '--json'], fcEnv);
    const row = (JSON.parse(doctor.stdout.toString()) as { checks: { name: string; summary: string }[] }).checks.find((check) => check.name === 'backend');
    assert.match(row!.summary, /^qemu: auto: QEMU, because Firecracker needs KVM and /);
    const result = await mvmctl(['exec', '-v', '--', 'echo', 'ok'], fcEnv);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'ok\n');
    assert.match(result.stderr, QEMU_CHANNEL);
    await assertNoVmLeft(stateDir);
  });
});

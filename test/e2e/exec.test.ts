// End to end: real mvmctl, real QEMU (TCG on machines without KVM), real kernel, real guest agent.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { collect, isolatedEnv, mvmctl, startMvmctl, vmmPidsMentioning, vmProcessesMentioning, waitForOutput } from './helpers.js';

const { env, stateDir, cleanup } = isolatedEnv();
const vmsDir = join(stateDir, 'vms');
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-exec-'));

function runningVmDirs(): string[] {
  return existsSync(vmsDir) ? readdirSync(vmsDir) : [];
}

async function assertNothingLeft(): Promise<void> {
  // The VMM is killed before mvmctl exits; give the kernel a moment to reap it.
  for (let i = 0; i < 50 && vmProcessesMentioning(stateDir).length > 0; i++) await sleep(100);
  assert.deepEqual(vmProcessesMentioning(stateDir), [], 'no VMM or vsock device process may outlive its run');
  assert.deepEqual(runningVmDirs(), [], 'no state dir may outlive its run');
}

after(() => {
  cleanup();
  rmSync(work, { recursive: true, force: true });
});

describe('mvmctl exec', () => {
  before(async () => {
    // Builds the default image if a previous step has not (scripts/setup does, before the tests).
    const result = await mvmctl(['image', 'build'], env);
    assert.equal(result.code, 0, result.stderr);
  });

  test('uname -a prints the guest kernel, exit 0 (spec example)', async () => {
    const result = await mvmctl(['exec', '--', 'uname', '-a'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout.toString(), /^Linux .*-micro/);
    await assertNothingLeft();
  });

  test('/bin/true exits 0 with no output (spec example)', async () => {
    const result = await mvmctl(['exec', '--', '/bin/true'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.length, 0);
    assert.equal(result.stderr, '');
  });

  test('stdout and stderr stay apart', async () => {
    const result = await mvmctl(['exec', '--', 'sh', '-c', 'echo to-out; echo to-err >&2; echo more-out'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'to-out\nmore-out\n');
    assert.equal(result.stderr, 'to-err\n');
  });

  test("a hostile guest's console and agent texts reach mvmctl's own lines as escapes, never as terminal control; the command's output stays its bytes", async () => {
    const script = 'printf "A\\033]0;owned\\007B\\033[2JC\\n" > /dev/console; printf "out\\033[31m\\n"';
    const shown = await mvmctl(['exec', '-v', '--', 'sh', '-c', script], { ...env, MVM_NO_TCG_WARNING: '1' });
    assert.equal(shown.code, 0, shown.stderr);
    assert.equal(shown.stdout.toString(), 'out\x1b[31m\n', 'as with docker run, the command writes to the terminal what it likes');
    assert.ok(shown.stderr.includes('A\\x1b]0;owned\\x07B\\x1b[2JC'), shown.stderr);
    const missing = await mvmctl(['exec', '--', 'no\x1b[31mpe'], env);
    assert.equal(missing.code, 127, missing.stderr);
    assert.ok(missing.stderr.includes('no\\x1b[31mpe'), missing.stderr);
    for (const stderr of [shown.stderr, missing.stderr]) assert.doesNotMatch(stderr, /[\x00-\x08\x0b-\x1f\x7f]/, 'no control character on stderr');
  });

  test('exit codes: the command’s own, 128+N on a signal, 126, 127', async () => {
    const cases: [string[], number][] = [
      [['sh', '-c', 'exit 1'], 1],
      [['sh', '-c', 'exit 7'], 7],
      [['sh', '-c', 'kill -9 $$'], 137],
      [['/etc/passwd'], 126],
      [['no-such-command-here'], 127],
    ];
    const results = await Promise.all(cases.map(([argv]) => mvmctl(['exec', '--', ...argv], env)));
    results.forEach((result, index) => assert.equal(result.code, cases[index][1], `${cases[index][0].join(' ')}: ${result.stderr}`));
    assert.match(results[4].stderr, /no-such-command-here/);
    await assertNothingLeft();
  });

  test('environment and exact argv (spaces, quotes, $, unicode, empty strings)', async () => {
    const args = ['a b', '"quoted"', "it's", '$HOME', 'ünïcødé ✓', '', '*'];
    const result = await mvmctl(['exec', '-e', 'FOO=bar', '--env', 'BAZ=qux=1', '--', 'sh', '-c', 'echo "$FOO|$BAZ"; printf "[%s]\\n" "$@"', 'sh', ...args], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), `bar|qux=1\n${args.map((arg) => `[${arg}]\n`).join('')}`);
  });

  test('docker run habits: -w DIR (created), -e KEY from mvmctl\'s environment, --env-file; -e wins over the file', async () => {
    const envFile = join(work, 'vars.env');
    writeFileSync(envFile, '# from the file\nFROM_FILE=file value\nBOTH=file\nNOT_SET_HERE\n');
    const result = await mvmctl(
      ['exec', '-w', '/new/dir', '-e', 'FROM_ENV', '-e', 'UNSET_HERE', '--env-file', envFile, '-e', 'BOTH=flag', '--', 'sh', '-c', 'pwd; echo $FROM_ENV $FROM_FILE $BOTH; env | grep -c _HERE || true'],
      { ...env, FROM_ENV: 'env value' },
    );
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), '/new/dir\nenv value file value flag\n0\n');
  });

  test('stdin is forwarded with -i (EOF included) and never read without it', async () => {
    const withI = await mvmctl(['exec', '-i', '--', 'sh', '-c', 'cat; echo done'], env, 'line one\nline two\n');
    assert.equal(withI.code, 0, withI.stderr);
    assert.equal(withI.stdout.toString(), 'line one\nline two\ndone\n');
    const withoutI = await mvmctl(['exec', '--', 'sh', '-c', 'cat; echo done'], env, 'must not arrive\n');
    assert.equal(withoutI.code, 0, withoutI.stderr);
    assert.equal(withoutI.stdout.toString(), 'done\n');
  });

  test('output streams live: the first line arrives while the command still runs', async () => {
    const child = startMvmctl(['exec', '--', 'sh', '-c', 'echo first; sleep 4; echo second'], env);
    const done = collect(child);
    await waitForOutput(child, 'first\n');
    const firstAt = performance.now();
    const result = await done;
    assert.equal(result.code, 0, result.stderr);
    assert.ok(performance.now() - firstAt >= 3500, 'the first line must arrive before the sleep ends');
    assert.equal(result.stdout.toString(), 'first\nsecond\n');
  });

  test('100 MB of binary stdout arrives byte-exact', async () => {
    const result = await mvmctl(
      ['exec', '--', 'sh', '-c', 'head -c 100000000 /dev/urandom > /tmp/out && sha256sum /tmp/out >&2 && cat /tmp/out'],
      env,
    );
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.length, 100_000_000);
    const guestSum = result.stderr.split(/\s+/)[0];
    assert.equal(createHash('sha256').update(result.stdout).digest('hex'), guestSum);
  });

  // The bound is the test's own timeout: without the kill, `sleep 1000` outlives it by far.
  test('--timeout expiry exits 124 after the deadline and tears down', { timeout: 120_000 }, async () => {
    const result = await mvmctl(['exec', '--timeout', '3', '--', 'sh', '-c', 'echo before the deadline; sleep 1000; echo after'], env);
    assert.equal(result.code, 124, result.stderr);
    assert.equal(result.stdout.toString(), 'before the deadline\n', 'output from before the deadline is kept, none after');
    assert.match(result.stderr, /timed out after 3 s/);
    await assertNothingLeft();
  });

  for (const [signal, code] of [['SIGINT', 130], ['SIGTERM', 143], ['SIGHUP', 129]] as const) {
    test(`${signal} to mvmctl tears the VM down and exits ${code}`, async () => {
      const child = startMvmctl(['exec', '--', 'sh', '-c', 'echo ready; sleep 100'], env);
      const done = collect(child);
      await waitForOutput(child, 'ready');
      assert.equal(vmmPidsMentioning(stateDir).length, 1);
      child.kill(signal);
      const result = await done;
      assert.equal(result.code, code, result.stderr);
      await assertNothingLeft();
    });
  }

  test('a reader that goes away (| head) ends the run with 141 and tears down', async () => {
    const child = startMvmctl(['exec', '--', 'yes'], env);
    const done = collect(child);
    await waitForOutput(child, 'y\ny\n');
    child.stdout!.destroy();
    const result = await done;
    assert.equal(result.code, 141, result.stderr);
    await assertNothingLeft();
  });

  test(
    'the agent channel: vsock for a cold boot where vhost-device-vsock is installed, the virtio-serial port for a restore and with MVM_QEMU_VSOCK=0',
    { skip: process.env.MVM_BACKEND === 'firecracker' ? 'QEMU channels; Firecracker always uses its vsock' : false },
    async () => {
      const installed = spawnSync('sh', ['-c', 'command -v vhost-device-vsock']).status === 0;
      const channel = (stderr: string) => /\[timing\] VMM started \(agent over ([^)]+\)?)\)/.exec(stderr)?.[1];
      const cold = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'echo', 'cold'], env);
      assert.equal(cold.stdout.toString(), 'cold\n', cold.stderr);
      assert.equal(channel(cold.stderr), installed ? 'vsock (vhost-device-vsock)' : 'virtio-serial port', cold.stderr);
      const serial = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'echo', 'serial'], { ...env, MVM_QEMU_VSOCK: '0' });
      assert.equal(serial.stdout.toString(), 'serial\n', serial.stderr);
      assert.equal(channel(serial.stderr), 'virtio-serial port');
      const restored = await mvmctl(['exec', '-v', '--', 'echo', 'restored'], env);
      assert.equal(restored.stdout.toString(), 'restored\n', restored.stderr);
      assert.equal(channel(restored.stderr), 'virtio-serial port');
      await assertNothingLeft();
    },
  );

  // Restored runs use the virtio-serial port; cold ones vsock where vhost-device-vsock is installed.
  for (const flags of [[], ['--no-snapshot']]) {
    test(`SIGKILL of mvmctl${flags.length ? ' (cold boot)' : ''}: the VMM and its devices die with it and the next ls reaps its state`, async () => {
      const child = startMvmctl(['exec', ...flags, '--', 'sh', '-c', 'echo ready; sleep 100'], env);
      const done = collect(child);
      await waitForOutput(child, 'ready');
      child.kill('SIGKILL');
      await done;
      for (let i = 0; i < 50 && vmProcessesMentioning(stateDir).length > 0; i++) await sleep(100);
      assert.deepEqual(vmProcessesMentioning(stateDir), []);
      assert.equal(runningVmDirs().length, 1, 'the killed run left its state dir');
      const ls = await mvmctl(['ls', '--json'], env);
      assert.equal(ls.code, 0, ls.stderr);
      assert.deepEqual(JSON.parse(ls.stdout.toString()), []);
      await assertNothingLeft();
    });
  }

  test('SIGKILL of mvmctl: the next exec reaps the state the killed run left', async () => {
    const child = startMvmctl(['exec', '--', 'sh', '-c', 'echo ready; sleep 100'], env);
    const done = collect(child);
    await waitForOutput(child, 'ready');
    const [leftBehind] = runningVmDirs();
    child.kill('SIGKILL');
    await done;
    const next = await mvmctl(['exec', '--', 'true'], env);
    assert.equal(next.code, 0, next.stderr);
    assert.ok(!runningVmDirs().includes(leftBehind));
    await assertNothingLeft();
  });

  test('4 concurrent execs all succeed', async () => {
    const results = await Promise.all([1, 2, 3, 4].map((n) => mvmctl(['exec', '--cpus', '1', '--', 'sh', '-c', `echo vm ${n}`], env)));
    results.forEach((result, index) => {
      assert.equal(result.code, 0, result.stderr);
      assert.equal(result.stdout.toString(), `vm ${index + 1}\n`);
    });
    await assertNothingLeft();
  });

  test('ls shows a running exec and down stops it', async () => {
    const child = startMvmctl(['exec', '--', 'sh', '-c', 'echo ready; sleep 100'], env);
    const done = collect(child);
    await waitForOutput(child, 'ready');
    const ls = await mvmctl(['ls', '--json'], env);
    const vms = JSON.parse(ls.stdout.toString()) as { name: string; command: string[]; vmmRunning: boolean }[];
    assert.equal(vms.length, 1);
    assert.match(vms[0].name, /^exec-[0-9a-f]+-[0-9a-f]+$/);
    assert.deepEqual(vms[0].command, ['sh', '-c', 'echo ready; sleep 100']);
    assert.equal(vms[0].vmmRunning, true);
    const table = await mvmctl(['ls'], env);
    assert.match(table.stdout.toString(), new RegExp(`^NAME .*\\n${vms[0].name} `));
    const down = await mvmctl(['down', vms[0].name], env);
    assert.equal(down.code, 0, down.stderr);
    assert.equal((await done).code, 143);
    await assertNothingLeft();
  });

  test('mvmctl failures name the cause: missing QEMU or Firecracker, unbootable kernel (with the console tail)', async () => {
    const noQemu = await mvmctl(['exec', '--backend', 'qemu', '--', 'true'], { ...env, MVM_QEMU: '/nonexistent/qemu-system-x86_64' });
    assert.equal(noQemu.code, 125, noQemu.stderr);
    assert.match(noQemu.stderr, /^mvmctl: QEMU not found .*apt-get install qemu-system-x86/);
    const noFirecracker = await mvmctl(['exec', '--backend', 'firecracker', '--', 'true'], { ...env, MVM_FIRECRACKER: '/nonexistent/firecracker' });
    assert.equal(noFirecracker.code, 125, noFirecracker.stderr);
    assert.match(noFirecracker.stderr, /^mvmctl: Firecracker not found \(\/nonexistent\/firecracker\): .*or use --backend qemu\n$/);
    const badKernel = await mvmctl(['exec', '--', 'true'], { ...env, MVM_KERNEL: '/etc/hostname' });
    assert.equal(badKernel.code, 125, badKernel.stderr);
    assert.match(badKernel.stderr, /^mvmctl: [^\n]+\n(  \| .*\n)+$/, 'one line, then the console/VMM tail');
    await assertNothingLeft();
  });

  test('bad input: one line, exit 125, no VM started', async () => {
    const badEnvFile = join(work, 'bad.env');
    writeFileSync(badEnvFile, 'OK=1\nNOT OK=2\n');
    const cases = [
      ['exec', '--memory', 'lots', '--', 'true'],
      ['exec', '--cpus', '0', '--', 'true'],
      ['exec', '-e', '1BAD=x', '--', 'true'],
      ['exec', '--backend', 'nope', '--', 'true'],
      ['exec', '--accel', 'fast', '--', 'true'],
      ['exec'],
      ['exec', '--no-such-flag', '--', 'true'],
      ['exec', '-w', 'relative', '--', 'true'],
      ['exec', '--env-file', join(work, 'missing.env'), '--', 'true'],
      ['exec', '--env-file', badEnvFile, '--', 'true'],
      ['exec', '-m', './not-a-template', '--', 'true'],
      ['exec', '--template', 'a', '-m', 'b', '--', 'true'],
    ];
    for (const args of cases) {
      const result = await mvmctl(args, env);
      assert.equal(result.code, 125, `${args.join(' ')}: ${result.stderr}`);
      assert.match(result.stderr, /^mvmctl: [^\n]+\n$/, `${args.join(' ')}: ${result.stderr}`);
      assert.deepEqual(runningVmDirs(), []);
    }
  });
});

// End to end: how exec chooses its accelerator, with real QEMU on this host's own /dev/kvm. On a
// host whose KVM cannot run the guest (kvm_pvm, no vmx/svm) it checks the fallback to TCG; on a
// host where KVM works it checks that auto uses it; without /dev/kvm it says why it skips.
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { inspectKvmHost } from '../../src/accel/index.js';
import { ensureDefaultImage } from '../../src/image/index.js';
import { assertNoVmLeft, isolatedEnv, mvmctl } from './helpers.js';

const host = inspectKvmHost();
const isolated = isolatedEnv();
// Verdicts live in the cache directory: a private one starts with nothing known. The kernel is the
// default image's (MVM_KERNEL), so only the small initramfs is built there.
const cacheDir = mkdtempSync(join(tmpdir(), 'mvm-e2e-accel-cache-'));
const dataDir = mkdtempSync(join(tmpdir(), 'mvm-e2e-accel-data-'));
let env: NodeJS.ProcessEnv = {};

after(() => {
  isolated.cleanup();
  rmSync(cacheDir, { recursive: true, force: true });
  rmSync(dataDir, { recursive: true, force: true });
});

before(async () => {
  const image = await ensureDefaultImage({});
  env = { ...isolated.env, MVM_CACHE_DIR: cacheDir, MVM_DATA_DIR: dataDir, MVM_KERNEL: image.kernel };
  delete env.MVM_NO_TCG_WARNING;
  delete env.MVM_ACCEL;
  delete env.MVM_KVM_PRECHECK;
  const built = await mvmctl(['image', 'build'], env);
  assert.equal(built.code, 0, built.stderr);
});

function verdicts(): Array<{ usable: boolean; reason?: string }> {
  const dir = join(cacheDir, 'accel');
  let files: string[] = [];
  try {
    files = readdirSync(dir);
  } catch {
    return [];
  }
  return files.map((file) => JSON.parse(readFileSync(join(dir, file), 'utf8')) as { usable: boolean; reason?: string });
}

const count = (text: string, pattern: RegExp) => text.split('\n').filter((line) => pattern.test(line)).length;
const vmmStarts = (stderr: string) => count(stderr, /\[timing\] VMM started/);
/**
 * How this host's KVM fails our guest, as QEMU reports it: an internal error (emulation failure)
 * that pauses the VM, or a vCPU register it refuses, after which QEMU aborts. Both were seen on
 * kvm_pvm hosts here.
 */
const KVM_FAILURE = /KVM internal error|KVM refused the vCPU state/;

/** Warning lines: not the -v timings, console lines and notes. */
const warnings = (stderr: string) =>
  stderr.split('\n').filter((line) => line.startsWith('mvmctl: ') && !line.startsWith('mvmctl: [') && !line.startsWith('mvmctl: snapshot not used'));

const brokenKvmSkip =
  host.device === 'absent'
    ? 'no /dev/kvm on this host: the fallback needs a host whose /dev/kvm cannot run the guest'
    : host.device === 'no-access'
      ? 'no permission on /dev/kvm here'
      : !host.ruledOut
        ? 'KVM looks usable on this host (hardware virtualisation, no kvm_pvm): see the test for working KVM'
        : false;

describe('accelerator: a /dev/kvm that cannot run the guest', { skip: brokenKvmSkip }, () => {
  test('auto: the host checks pick TCG without booting KVM, with one line that names why', async () => {
    const result = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'echo', 'ok'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'ok\n');
    assert.deepEqual(warnings(result.stderr), [`mvmctl: ${host.ruledOut}: emulating the CPU with TCG, which is much slower than KVM (--accel tcg or MVM_ACCEL=tcg skips this check; MVM_NO_TCG_WARNING=1 hides this line)`]);
    assert.equal(vmmStarts(result.stderr), 1);
    assert.match(result.stderr, /agent ready \(mvm-agent [^,]+, TCG\)/);
    assert.doesNotMatch(result.stderr, KVM_FAILURE);
    assert.deepEqual(verdicts(), [], 'a pre-check decides, it is no verdict');
    await assertNoVmLeft(isolated.stateDir);
  });

  test('auto, checks off: the KVM boot fails fast, the same run goes on under TCG, the verdict is remembered', async () => {
    const probeEnv = { ...env, MVM_KVM_PRECHECK: '0', MVM_BOOT_TIMEOUT: '600' };
    const first = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'sh', '-c', 'echo ok; exit 3'], probeEnv);
    assert.equal(first.code, 3, first.stderr);
    assert.equal(first.stdout.toString(), 'ok\n');
    const fallback = warnings(first.stderr);
    assert.equal(fallback.length, 1, first.stderr);
    assert.match(fallback[0]!, /^mvmctl: KVM cannot run the guest on this host \((?:KVM internal error|KVM refused the vCPU state).*; remembered until the host reboots or QEMU or the guest kernel changes\): emulating the CPU with TCG/);
    assert.equal(vmmStarts(first.stderr), 2, 'one KVM boot, then one TCG boot');
    assert.match(first.stderr, /agent ready \(mvm-agent [^,]+, TCG\)/);
    const [verdict, ...others] = verdicts();
    assert.equal(others.length, 0);
    assert.equal(verdict?.usable, false);
    assert.match(verdict?.reason ?? '', KVM_FAILURE);
    await assertNoVmLeft(isolated.stateDir);

    const second = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'true'], probeEnv);
    assert.equal(second.code, 0, second.stderr);
    assert.equal(vmmStarts(second.stderr), 1, 'the remembered verdict saves the KVM boot');
    assert.match(warnings(second.stderr).join('\n'), /KVM cannot run the guest here: (?:KVM internal error|KVM refused the vCPU state).*\(found by a boot on /);
    await assertNoVmLeft(isolated.stateDir);
  });

  test('--accel kvm: exit 125 with one line as soon as QEMU reports the failure, not after the boot timeout', async () => {
    const result = await mvmctl(['exec', '--accel', 'kvm', '--no-snapshot', '--', 'true'], { ...env, MVM_BOOT_TIMEOUT: '600' });
    assert.equal(result.code, 125, result.stderr);
    const [first] = result.stderr.split('\n');
    assert.match(first!, /^mvmctl: --accel kvm: KVM cannot run the guest on this host: (?:KVM internal error|KVM refused the vCPU state).* \(use --accel auto or tcg\)$/);
    assert.doesNotMatch(result.stderr, /did not answer/);
    await assertNoVmLeft(isolated.stateDir);
  });

  test('a snapshot taken under TCG is not restored under KVM: one warning, then the cold boot', async () => {
    const built = await mvmctl(['template', 'build', 'acc', '--snapshot', '--accel', 'tcg'], env);
    assert.equal(built.code, 0, built.stderr);
    const info = JSON.parse((await mvmctl(['template', 'info', 'acc', '--json'], env)).stdout.toString()) as { snapshot: { accel: string } };
    assert.equal(info.snapshot.accel, 'tcg');
    const underKvm = await mvmctl(['exec', '--manifest', 'acc', '--accel', 'kvm', '--', 'true'], env);
    assert.match(underKvm.stderr, /^mvmctl: template acc: not using its snapshot \(taken under TCG, this run uses KVM\); booting cold\. Retake it with 'mvmctl template snapshot acc'$/m);
    assert.equal(underKvm.code, 125, 'and this KVM cannot boot it cold either');
    const underTcg = await mvmctl(['exec', '-v', '--manifest', 'acc', '--accel', 'tcg', '--', 'true'], env);
    assert.equal(underTcg.code, 0, underTcg.stderr);
    assert.match(underTcg.stderr, /\[timing\] restored from snapshot/);
    await assertNoVmLeft(isolated.stateDir);
  });
});

const workingKvmSkip = host.device === 'present' && !host.ruledOut ? false : 'KVM cannot run the guest on this host (or there is none)';

describe('accelerator: a /dev/kvm that runs the guest', { skip: workingKvmSkip }, () => {
  test('auto boots under KVM, records that it works, and the next run trusts it', async () => {
    const first = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'true'], env);
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stderr, /agent ready \(mvm-agent [^,]+, KVM\)/);
    assert.deepEqual(verdicts().map((v) => v.usable), [true]);
    assert.deepEqual(warnings(first.stderr), []);
    await assertNoVmLeft(isolated.stateDir);
  });
});

describe('accelerator: on any host', () => {
  test('--accel tcg and MVM_ACCEL=tcg run without a check and without a warning', async () => {
    for (const [args, extra] of [[['--accel', 'tcg'], {}], [[], { MVM_ACCEL: 'tcg' }]] as const) {
      const result = await mvmctl(['exec', ...args, '--', 'echo', 'ok'], { ...env, ...extra });
      assert.equal(result.code, 0, result.stderr);
      assert.equal(result.stdout.toString(), 'ok\n');
      assert.equal(result.stderr, '');
    }
    await assertNoVmLeft(isolated.stateDir);
  });

  test('a bad --accel or MVM_ACCEL: one line, exit 125, no VM', async () => {
    const flag = await mvmctl(['exec', '--accel', 'hvf', '--', 'true'], env);
    assert.equal(flag.code, 125);
    assert.equal(flag.stderr, "mvmctl: option '--accel <mode>' argument 'hvf' is invalid. Allowed choices are auto, kvm, tcg.\n");
    const variable = await mvmctl(['exec', '--', 'true'], { ...env, MVM_ACCEL: 'hvf' });
    assert.equal(variable.code, 125);
    assert.equal(variable.stderr, 'mvmctl: MVM_ACCEL=hvf is not an accelerator: use auto, kvm or tcg\n');
    await assertNoVmLeft(isolated.stateDir);
  });

  test('doctor names the accelerator it will use and exits 0 on a host that can run exec', async () => {
    const result = await mvmctl(['doctor', '--json'], env);
    assert.equal(result.code, 0, result.stderr);
    const report = JSON.parse(result.stdout.toString()) as { ok: boolean; checks: Array<{ name: string; status: string; summary: string }> };
    assert.equal(report.ok, true);
    const accel = report.checks.find((check) => check.name === 'accelerator');
    assert.ok(accel, 'an accelerator row');
    if (host.ruledOut || host.device !== 'present') assert.match(accel.summary, /TCG/);
  });
});

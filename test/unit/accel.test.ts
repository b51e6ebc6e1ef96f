import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { accelChoice, inspectKvmHost, planAccel, readVerdict, recordVerdict, type KvmHost, type VerdictKey } from '../../src/accel/index.js';
import { MvmError } from '../../src/errors.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-accel-'));
after(() => rmSync(scratch, { recursive: true, force: true }));
let counter = 0;
const freshDir = () => {
  const dir = join(scratch, `d${counter++}`);
  mkdirSync(dir);
  return dir;
};

/** A fake host tree: /dev/kvm (a plain file stands in for the device), /sys/module/*, /proc/cpuinfo. */
function fakeHost(options: { kvm: boolean; modules: string[]; flags: string }): string {
  const root = freshDir();
  mkdirSync(join(root, 'dev'));
  mkdirSync(join(root, 'proc'));
  if (options.kvm) writeFileSync(join(root, 'dev/kvm'), '');
  for (const module of options.modules) mkdirSync(join(root, 'sys/module', module), { recursive: true });
  writeFileSync(join(root, 'proc/cpuinfo'), `processor\t: 0\nflags\t\t: fpu ${options.flags} sse2\n`);
  return root;
}

const key: VerdictKey = { bootId: 'boot-1', vmm: 'qemu /usr/bin/qemu 100 1', kernelSha256: 'aa' };
const kvmHost: KvmHost = { device: 'present', modules: ['kvm_intel'], cpuVirtualization: true };

describe('the host checks', () => {
  test('kvm_pvm rules KVM out, and so does a CPU without vmx/svm', () => {
    const pvm = inspectKvmHost(fakeHost({ kvm: true, modules: ['kvm', 'kvm_pvm'], flags: 'vme' }));
    assert.equal(pvm.device, 'present');
    assert.match(pvm.ruledOut ?? '', /kvm_pvm/);
    const noVmx = inspectKvmHost(fakeHost({ kvm: true, modules: ['kvm_intel'], flags: 'vme' }));
    assert.match(noVmx.ruledOut ?? '', /no vmx or svm/);
  });

  test('hardware virtualisation with kvm_intel rules nothing out; a missing /dev/kvm is absent', () => {
    const intel = inspectKvmHost(fakeHost({ kvm: true, modules: ['kvm_intel'], flags: 'vmx ept' }));
    assert.deepEqual(intel, { device: 'present', modules: ['kvm_intel'], cpuVirtualization: true });
    assert.equal(inspectKvmHost(fakeHost({ kvm: false, modules: [], flags: 'svm' })).device, 'absent');
  });
});

describe('the accelerator choice', () => {
  test('--accel wins over MVM_ACCEL, which wins over auto; a bad MVM_ACCEL is one clear error', () => {
    assert.equal(accelChoice('tcg', { MVM_ACCEL: 'kvm' }), 'tcg');
    assert.equal(accelChoice(undefined, { MVM_ACCEL: 'kvm' }), 'kvm');
    assert.equal(accelChoice(undefined, {}), 'auto');
    assert.equal(accelChoice(undefined, { MVM_ACCEL: '' }), 'auto');
    assert.throws(() => accelChoice(undefined, { MVM_ACCEL: 'hvf' }), (error: unknown) => error instanceof MvmError && error.exitCode === 125 && /MVM_ACCEL=hvf/.test(error.message));
  });

  const plan = (choice: 'auto' | 'kvm' | 'tcg', host: KvmHost, dir: string, env: NodeJS.ProcessEnv = {}) =>
    planAccel(choice, { host, env, verdictDir: dir, verdictKey: async () => key });

  test('auto: no /dev/kvm, or no permission on it, is TCG with the reason', async () => {
    const absent = await plan('auto', { device: 'absent', modules: [], cpuVirtualization: true }, freshDir());
    assert.equal(absent.accel, 'tcg');
    assert.match(absent.tcgReason!, /does not exist/);
    const denied = await plan('auto', { device: 'no-access', modules: ['kvm_intel'], cpuVirtualization: true }, freshDir());
    assert.match(denied.tcgReason!, /usermod -aG kvm/);
  });

  test('--accel kvm without a usable device fails before any boot', async () => {
    await assert.rejects(plan('kvm', { device: 'absent', modules: [], cpuVirtualization: true }, freshDir()), /--accel kvm: \/dev\/kvm does not exist/);
  });

  test('auto with nothing known boots KVM as the probe; the pre-check decides sooner unless MVM_KVM_PRECHECK=0', async () => {
    assert.deepEqual(await plan('auto', kvmHost, freshDir()), { choice: 'auto', accel: 'kvm', probe: key });
    const pvm: KvmHost = { ...kvmHost, ruledOut: 'served by kvm_pvm' };
    const ruledOut = await plan('auto', pvm, freshDir());
    assert.equal(ruledOut.accel, 'tcg');
    assert.equal(ruledOut.probe, undefined);
    assert.equal(ruledOut.tcgReason, 'served by kvm_pvm');
    assert.deepEqual(await plan('auto', pvm, freshDir(), { MVM_KVM_PRECHECK: '0' }), { choice: 'auto', accel: 'kvm', probe: key });
  });

  test('a remembered verdict decides auto without a probe, and beats the pre-check', async () => {
    const dir = freshDir();
    await recordVerdict(key, false, 'KVM internal error. Suberror: 1', dir);
    const failed = await plan('auto', kvmHost, dir);
    assert.equal(failed.accel, 'tcg');
    assert.equal(failed.probe, undefined);
    assert.match(failed.tcgReason!, /KVM internal error/);
    await recordVerdict(key, true, undefined, dir);
    assert.deepEqual(await plan('auto', { ...kvmHost, ruledOut: 'served by kvm_pvm' }, dir), { choice: 'auto', accel: 'kvm' });
    // An explicit --accel kvm always boots KVM and records what it finds.
    assert.deepEqual(await plan('kvm', kvmHost, dir), { choice: 'kvm', accel: 'kvm', probe: key });
    assert.deepEqual(await plan('tcg', kvmHost, dir), { choice: 'tcg', accel: 'tcg' });
  });
});

describe('the verdict cache', () => {
  test('a verdict holds for its host boot, VMM build and guest kernel only', async () => {
    const dir = freshDir();
    await recordVerdict(key, false, 'emulation failure', dir);
    assert.equal((await readVerdict(key, dir))?.usable, false);
    assert.equal(await readVerdict({ ...key, bootId: 'boot-2' }, dir), undefined);
    assert.equal(await readVerdict({ ...key, vmm: 'qemu /usr/bin/qemu 100 2' }, dir), undefined);
    assert.equal(await readVerdict({ ...key, kernelSha256: 'bb' }, dir), undefined);
  });

  test('recording a verdict drops those of earlier host boots and keeps other kernels of this one', async () => {
    const dir = freshDir();
    await recordVerdict({ ...key, bootId: 'boot-0' }, true, undefined, dir);
    await recordVerdict({ ...key, kernelSha256: 'cc' }, true, undefined, dir);
    await recordVerdict(key, false, 'emulation failure', dir);
    assert.equal(readdirSync(dir).length, 2);
    assert.equal(await readVerdict({ ...key, bootId: 'boot-0' }, dir), undefined);
    assert.equal((await readVerdict({ ...key, kernelSha256: 'cc' }, dir))?.usable, true);
  });

  test('a damaged or foreign verdict file is no verdict', async () => {
    const dir = freshDir();
    const verdict = await recordVerdict(key, true, undefined, dir);
    const [file] = readdirSync(dir);
    writeFileSync(join(dir, file!), '{not json');
    assert.equal(await readVerdict(key, dir), undefined);
    writeFileSync(join(dir, file!), JSON.stringify({ ...verdict, key: { ...key, kernelSha256: 'zz' } }));
    assert.equal(await readVerdict(key, dir), undefined);
  });
});

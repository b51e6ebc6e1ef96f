import assert from 'node:assert/strict';
import { chmod, mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { recordVerdict, type VerdictKey } from '../../src/accel/index.js';
import { formatReport } from '../../src/cli/doctor.js';
import { type Check, checkQemu, doctorReport } from '../../src/doctor/checks.js';
import { checkDirectory } from '../../src/doctor/dirs.js';
import { checkAccelerator, checkVhostDeviceVsock } from '../../src/doctor/host.js';

let scratch: string;

before(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'mvm-doctor-'));
});

after(async () => {
  await rm(scratch, { recursive: true, force: true });
});

async function fakeQemu(name: string, machines: string[]): Promise<string> {
  const path = join(scratch, name);
  const list = ['Supported machines are:', ...machines].join('\\n');
  await writeFile(
    path,
    `#!/bin/sh
case "$1" in
  --version) echo 'QEMU emulator version 8.2.99 (fake)'; echo 'Copyright (c) 2003-2024';;
  -M) printf '${list}\\n';;
  *) exit 1;;
esac
`,
  );
  await chmod(path, 0o755);
  return path;
}

/** A fake host tree for inspectKvmHost: /dev/kvm, the loaded modules and the CPU flags. */
async function fakeHost(name: string, setup: { kvm: boolean; modules: string[]; flags: string }): Promise<string> {
  const root = join(scratch, name);
  await mkdir(join(root, 'dev'), { recursive: true });
  await mkdir(join(root, 'proc'), { recursive: true });
  if (setup.kvm) await writeFile(join(root, 'dev/kvm'), '');
  for (const module of setup.modules) await mkdir(join(root, 'sys/module', module), { recursive: true });
  await writeFile(join(root, 'proc/cpuinfo'), `processor\t: 0\nflags\t\t: ${setup.flags}\n`);
  return root;
}

describe('doctor: qemu', () => {
  it('fails with the install hint when the QEMU binary is missing, and the report is not ok', async () => {
    const qemu = await checkQemu({ MVM_QEMU: join(scratch, 'no-such-qemu') });
    assert.equal(qemu.status, 'fail');
    assert.match(qemu.summary, /no-such-qemu not found \(from MVM_QEMU\)/);
    assert.equal(qemu.fix, 'apt-get install qemu-system-x86, or set MVM_QEMU');
    assert.equal(doctorReport([qemu]).ok, false);
  });

  it('reports path and version of a QEMU with the microvm machine', async () => {
    const path = await fakeQemu('qemu-good', ['microvm              microvm (i386)', 'pc                   Standard PC']);
    const qemu = await checkQemu({ MVM_QEMU: path });
    assert.equal(qemu.status, 'ok');
    assert.equal(qemu.summary, `${path} (QEMU emulator version 8.2.99 (fake)), microvm machine available`);
  });

  it('fails on a QEMU without the microvm machine', async () => {
    const path = await fakeQemu('qemu-old', ['pc                   Standard PC', 'q35                  Standard PC (Q35)']);
    const qemu = await checkQemu({ MVM_QEMU: path });
    assert.equal(qemu.status, 'fail');
    assert.match(qemu.summary, /has no microvm machine type/);
  });
});

describe('doctor: accelerator', () => {
  const key: VerdictKey = { bootId: '5b0e7c1e-0000-4000-8000-000000000001', vmm: 'qemu /usr/bin/qemu 1 2', kernelSha256: 'abc' };
  const verdictKey = async () => key;
  const noVerdicts = () => join(scratch, 'no-verdicts');

  it('warns, naming kvm_pvm, when a paravirtual KVM serves /dev/kvm', async () => {
    const hostRoot = await fakeHost('pvm', { kvm: true, modules: ['kvm_pvm'], flags: 'fpu sse2' });
    const accel = await checkAccelerator({ hostRoot, verdictKey, verdictDir: noVerdicts(), env: {} });
    assert.equal(accel.status, 'warn');
    assert.match(accel.summary, /^\/dev\/kvm present but KVM cannot run the guest: .*kvm_pvm.*; using TCG$/);
  });

  it('warns with the module hint when /dev/kvm is absent', async () => {
    const hostRoot = await fakeHost('nokvm', { kvm: false, modules: [], flags: 'fpu vmx' });
    const accel = await checkAccelerator({ hostRoot, verdictKey, verdictDir: noVerdicts(), env: {} });
    assert.equal(accel.status, 'warn');
    assert.match(accel.summary, /^\/dev\/kvm absent; using TCG/);
    assert.equal(accel.fix, 'load kvm_intel/kvm_amd, or pass /dev/kvm into the container');
  });

  it('fails on an absent /dev/kvm when MVM_ACCEL=kvm forbids falling back', async () => {
    const hostRoot = await fakeHost('nokvm-forced', { kvm: false, modules: [], flags: 'fpu vmx' });
    const accel = await checkAccelerator({ hostRoot, verdictKey, verdictDir: noVerdicts(), env: { MVM_ACCEL: 'kvm' } });
    assert.equal(accel.status, 'fail');
  });

  it("is ok when a boot found KVM usable for exec's next key, and ignores verdicts of other keys", async () => {
    const hostRoot = await fakeHost('kvm', { kvm: true, modules: ['kvm_intel'], flags: 'fpu vmx' });
    const verdictDir = join(scratch, 'verdicts-usable');
    await recordVerdict(key, true, undefined, verdictDir);
    await recordVerdict({ ...key, kernelSha256: 'other' }, false, 'KVM internal error', verdictDir);
    const accel = await checkAccelerator({ hostRoot, verdictKey, verdictDir, env: {} });
    assert.equal(accel.status, 'ok');
    assert.match(accel.summary, /^KVM usable \(a boot under KVM worked on \d{4}-\d\d-\d\d \d\d:\d\d UTC\)$/);
  });

  it('warns with the reason a failed boot recorded', async () => {
    const hostRoot = await fakeHost('kvm-broken', { kvm: true, modules: ['kvm_intel'], flags: 'fpu vmx' });
    const verdictDir = join(scratch, 'verdicts-failed');
    await recordVerdict(key, false, 'KVM internal error. Suberror: 1', verdictDir);
    const accel = await checkAccelerator({ hostRoot, verdictKey, verdictDir, env: {} });
    assert.equal(accel.status, 'warn');
    assert.match(accel.summary, /KVM cannot run the guest: KVM internal error\. Suberror: 1 \(found by a boot on .* UTC\); using TCG$/);
  });

  it('is ok, pending the first boot, where nothing rules KVM out and no verdict exists yet', async () => {
    const hostRoot = await fakeHost('kvm-new', { kvm: true, modules: ['kvm_amd'], flags: 'fpu svm' });
    const accel = await checkAccelerator({ hostRoot, verdictKey: async () => undefined, env: {} });
    assert.equal(accel.status, 'ok');
    assert.match(accel.summary, /\(kvm_amd\), not yet proven by a boot/);
  });

  it('fails on a bad MVM_ACCEL, which stops every exec', async () => {
    const accel = await checkAccelerator({ hostRoot: scratch, verdictKey, env: { MVM_ACCEL: 'fast' } });
    assert.equal(accel.status, 'fail');
    assert.match(accel.summary, /MVM_ACCEL=fast is not an accelerator/);
  });
});

describe('doctor: host devices and directories', () => {
  it('reports an absent vhost-device-vsock as a warning only, naming the fallback and the fix', () => {
    const vsock = checkVhostDeviceVsock({ MVM_VHOST_DEVICE_VSOCK: join(scratch, 'no-such-vhost-device-vsock') });
    assert.equal(vsock.status, 'warn');
    assert.match(vsock.summary, /virtio-serial port/);
    assert.match(vsock.fix ?? '', /vhost-device-vsock/);
    const off = checkVhostDeviceVsock({ MVM_QEMU_VSOCK: '0' });
    assert.equal(off.status, 'ok');
  });

  it('warns about a group-writable state dir and says how to fix it', async () => {
    const dir = join(scratch, 'state-shared');
    await mkdir(dir);
    await chmod(dir, 0o775);
    const check = await checkDirectory('state dir', dir, { envVar: 'MVM_STATE_DIR', neededByExec: true, minFreeBytes: 0 });
    assert.equal(check.status, 'warn');
    assert.match(check.summary, /group\/other writable \(mode 0775\)/);
    assert.equal(check.fix, `chmod go-w ${dir}`);
  });

  it('is ok with a private dir, and with one that can still be created', async () => {
    const dir = join(scratch, 'state-private');
    await mkdir(dir);
    await chmod(dir, 0o700);
    const existing = await checkDirectory('state dir', dir, { envVar: 'MVM_STATE_DIR', neededByExec: true, minFreeBytes: 0 });
    assert.equal(existing.status, 'ok');
    assert.match(existing.summary, /\(mode 0700, .* free\)$/);
    const future = await checkDirectory('cache dir', join(dir, 'not', 'yet'), { envVar: 'MVM_CACHE_DIR', neededByExec: true, minFreeBytes: 0 });
    assert.equal(future.status, 'ok');
    assert.match(future.summary, /will be created/);
  });

  it('warns when the file system has less free space than asked', async () => {
    const check = await checkDirectory('data dir', scratch, { envVar: 'MVM_DATA_DIR', neededByExec: false, minFreeBytes: Number.MAX_SAFE_INTEGER });
    assert.equal(check.status, 'warn');
    assert.match(check.summary, /only .* free/);
  });
});

describe('doctor: report', () => {
  const row = (name: string, status: Check['status'], fix?: string): Check => ({ name, status, summary: `${name} summary`, ...(fix ? { fix } : {}) });

  it('is ok with warnings and not ok as soon as one check fails', () => {
    assert.equal(doctorReport([row('a', 'ok'), row('b', 'warn', 'do b')]).ok, true);
    assert.equal(doctorReport([row('a', 'ok'), row('b', 'warn'), row('c', 'fail', 'do c')]).ok, false);
    assert.equal(doctorReport([]).ok, true);
  });

  it('prints an aligned table with the fix under each warn/fail row', () => {
    const text = formatReport(doctorReport([row('qemu', 'ok'), row('accelerator', 'warn', 'load kvm'), row('setpriv', 'fail', 'install it')]));
    assert.equal(
      text,
      [
        'STATUS  NAME         SUMMARY',
        'ok      qemu         qemu summary',
        'warn    accelerator  accelerator summary',
        '        fix: load kvm',
        'fail    setpriv      setpriv summary',
        '        fix: install it',
        '',
        'mvmctl exec cannot run here: 1 check failed',
        '',
      ].join('\n'),
    );
  });
});

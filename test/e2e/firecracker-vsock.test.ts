// End to end: the Firecracker backend over real vsock. The test double runs its guest with
// vhost-device-vsock serving the `uds_path` the backend configured (MVM_FC_DOUBLE_VSOCK=vhost-user),
// so the backend's hybrid vsock client talks to a real vsock device. Such a VM cannot be
// snapshotted (QEMU 7.2 cannot migrate it): the double refuses the snapshot calls as Firecracker
// refuses a call, and exec falls back to a cold boot with one warning.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { assertNoVmLeft, isolatedEnv, mvmctl, repoRoot } from './helpers.js';

const isolated = isolatedEnv();
const env: NodeJS.ProcessEnv = {
  ...isolated.env,
  MVM_BACKEND: 'firecracker',
  MVM_FIRECRACKER: join(repoRoot, 'test', 'firecracker-double', 'firecracker'),
  MVM_FC_DOUBLE_VSOCK: 'vhost-user',
  // The double stands for a host where KVM works: the product's KVM checks would rule this one out.
  MVM_KVM_PRECHECK: '0',
};
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-fc-vsock-'));
after(() => {
  isolated.cleanup();
  rmSync(work, { recursive: true, force: true });
});

const noDevice = spawnSync('sh', ['-c', 'command -v vhost-device-vsock']).status !== 0 ? 'vhost-device-vsock is not installed (scripts/setup installs it)' : false;

describe('the Firecracker backend over real vsock (test double with vhost-device-vsock)', { skip: noDevice }, () => {
  test('exec: separate streams, the exit code, and the vsock channel named with -v', async () => {
    const result = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'sh', '-c', 'echo out; echo err >&2; exit 7'], env);
    assert.equal(result.code, 7, result.stderr);
    assert.equal(result.stdout.toString(), 'out\n');
    assert.match(result.stderr, /\[timing\] VMM started \(agent over vsock \(Firecracker\)\)/);
    assert.match(result.stderr, /^err$/m);
    await assertNoVmLeft(isolated.stateDir);
  });

  test('--add-dir rw: the guest writes, the host gets it back', async () => {
    const host = join(work, 'share');
    spawnSync('mkdir', ['-p', host]);
    writeFileSync(join(host, 'in.txt'), 'from the host\n');
    const result = await mvmctl(['exec', '--no-snapshot', '--add-dir', `${host}:/w:rw`, '--', 'sh', '-c', 'cat /w/in.txt; echo from the guest > /w/out.txt'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'from the host\n');
    assert.equal(readFileSync(join(host, 'out.txt'), 'utf8'), 'from the guest\n');
    await assertNoVmLeft(isolated.stateDir);
  });

  test('a snapshot call the VMM refuses: one warning naming the call and its fault_message, then a cold boot', async () => {
    const result = await mvmctl(['exec', '--', 'echo', 'ok'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'ok\n');
    const warnings = result.stderr.split('\n').filter(Boolean);
    assert.equal(warnings.length, 1, result.stderr);
    assert.match(warnings[0]!, /^mvmctl: the default image: .*Firecracker refused (PUT \/snapshot\/create|PUT \/snapshot\/load): .*vhost-user vsock.*booting cold/);
    await assertNoVmLeft(isolated.stateDir);
  });
});

/**
 * The QEMU backend's watch for a guest that cannot go on, against a stand-in VMM: a shell script in
 * MVM_QEMU's place that prints what QEMU prints and then stays up, as QEMU does with a paused VM.
 */
import assert from 'node:assert/strict';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Accel } from '../../src/accel/index.js';
import { QemuBackend } from '../../src/backends/qemu/index.js';
import type { GuestFailure } from '../../src/backends/types.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-qemu-failure-'));
after(() => rmSync(scratch, { recursive: true, force: true }));

function fakeQemu(name: string, script: string): string {
  const path = join(scratch, name);
  writeFileSync(path, `#!/bin/sh\n${script}\n`);
  chmodSync(path, 0o755);
  return path;
}

const KVM_INTERNAL_ERROR = `printf 'KVM internal error. Suberror: 1\\nextra data[0]: 0x01\\nemulation failure\\nRAX=00\\n' >&2; exec sleep 60`;

async function start(qemu: string, accel: Accel) {
  const runDir = mkdtempSync(join(scratch, 'vm-'));
  const spec = { name: 'vm', runDir, kernel: '/k', kernelArgs: [], accel, cpus: 1, memoryMiB: 128, drives: [] };
  return new QemuBackend(qemu).start(spec, new AbortController().signal);
}

describe('QEMU backend: a guest that cannot go on is reported at once', () => {
  test('a KVM internal error under KVM is an accelerator failure, named with its kind, while QEMU still runs', async () => {
    const vm = await start(fakeQemu('kvm-error', KVM_INTERNAL_ERROR), 'kvm');
    try {
      const failure = await Promise.race([vm.failed, sleep(10_000).then(() => 'none')]);
      assert.deepEqual(failure, { reason: 'KVM internal error. Suberror: 1 (emulation failure)', accelFailure: true });
      assert.equal(await Promise.race([vm.exited.then(() => 'exited'), sleep(50).then(() => 'running')]), 'running');
    } finally {
      await vm.kill();
    }
  });

  test('a vCPU register KVM refuses, after which QEMU aborts, is an accelerator failure, not a crash', async () => {
    const abort = `printf 'qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\\nqemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion failed.\\n' >&2; kill -ABRT $$`;
    const vm = await start(fakeQemu('kvm-msr', abort), 'kvm');
    try {
      const failure = await Promise.race([vm.failed, sleep(10_000).then(() => 'none')]);
      assert.deepEqual(failure, { reason: 'KVM refused the vCPU state: failed to set MSR 0x10a to 0x69', accelFailure: true });
    } finally {
      await vm.kill();
    }
  });

  test('the same words under TCG are only console output', async () => {
    const vm = await start(fakeQemu('tcg-words', KVM_INTERNAL_ERROR), 'tcg');
    try {
      assert.equal(await Promise.race([vm.failed.then(() => 'failed'), sleep(500).then(() => 'none')]), 'none');
    } finally {
      await vm.kill();
    }
  });

  test('a guest the VMM stopped in an error state (QMP STOP, then query-status) is reported', async () => {
    // A stand-in monitor: greets, answers every command, and after qmp_capabilities reports STOP
    // with the run state io-error (what QEMU does when a disk write fails on a full host).
    const monitor = join(scratch, 'monitor.cjs');
    writeFileSync(
      monitor,
      [
        "const net = require('node:net');",
        "const arg = process.argv[process.argv.indexOf('-qmp') + 1];",
        "net.createServer((socket) => {",
        "  socket.write(JSON.stringify({ QMP: { version: {}, capabilities: [] } }) + '\\n');",
        "  let buffer = '';",
        "  socket.on('data', (chunk) => {",
        "    buffer += chunk;",
        "    for (let i = buffer.indexOf('\\n'); i >= 0; i = buffer.indexOf('\\n')) {",
        "      const request = JSON.parse(buffer.slice(0, i));",
        "      buffer = buffer.slice(i + 1);",
        "      const answer = request.execute === 'query-status' ? { status: 'io-error', running: false } : {};",
        "      socket.write(JSON.stringify({ return: answer, id: request.id }) + '\\n');",
        "      if (request.execute === 'qmp_capabilities') socket.write(JSON.stringify({ event: 'STOP' }) + '\\n');",
        "    }",
        "  });",
        "}).listen(arg.slice('unix:'.length).split(',')[0]);",
      ].join('\n'),
    );
    const vm = await start(fakeQemu('io-error', `exec ${process.execPath} ${monitor} "$@"`), 'tcg');
    try {
      const failure = await Promise.race([vm.failed, sleep(10_000).then(() => 'none')]);
      assert.deepEqual(failure, { reason: 'a disk write failed on the host (is its file system full?) (run state io-error)', accelFailure: false });
    } finally {
      await vm.kill();
    }
  });

  test('a VMM that exits is a failure too, with its status', async () => {
    const vm = await start(fakeQemu('exits', `echo 'qemu-system-x86_64: -kernel /k: could not open' >&2; exit 1`), 'tcg');
    const failure: GuestFailure = await vm.failed;
    assert.deepEqual(failure, { reason: 'the VMM exited (status 1)', accelFailure: false });
    assert.ok(vm.consoleTail(5).some((line) => line.includes('could not open')));
  });
});

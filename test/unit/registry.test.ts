import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createVmDir, listVms, newVmName, processStartTicks, stopVm, writeVmRecord, type VmRecord } from '../../src/state/registry.js';

const stateRoot = mkdtempSync(join(tmpdir(), 'mvm-registry-'));
const previous = process.env.MVM_STATE_DIR;
before(() => {
  process.env.MVM_STATE_DIR = stateRoot;
});
after(() => {
  if (previous === undefined) delete process.env.MVM_STATE_DIR;
  else process.env.MVM_STATE_DIR = previous;
  rmSync(stateRoot, { recursive: true, force: true });
});

async function record(name: string, ownerPid: number, ownerStartTicks: number, vmmPid?: number): Promise<VmRecord> {
  const runDir = await createVmDir(name);
  const vm: VmRecord = {
    name, backend: 'qemu', command: ['true'], startedAt: new Date().toISOString(), ownerPid, ownerStartTicks, runDir,
    ...(vmmPid ? { vmmPid, vmmStartTicks: processStartTicks(vmmPid) } : {}),
  };
  await writeVmRecord(vm);
  return vm;
}

function exited(child: ReturnType<typeof spawn>): Promise<NodeJS.Signals | null> {
  return new Promise((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
}

describe('VM registry', () => {
  test('names are exec-<pid-hex>-<random> and unique', () => {
    assert.match(newVmName(0x1f2e), /^exec-1f2e-[0-9a-f]{6}$/);
    assert.notEqual(newVmName(), newVmName());
  });

  test('a live owner is listed; a dead owner is reaped with its stray VMM killed', async () => {
    const live = await record(newVmName(), process.pid, processStartTicks(process.pid)!);
    const strayVmm = spawn('sleep', ['60']);
    const strayGone = exited(strayVmm);
    // An owner pid whose start time does not match is a recycled pid: the owner is gone.
    const dead = await record(newVmName(), process.pid, 1, strayVmm.pid);
    const vms = await listVms();
    assert.deepEqual(vms.map((vm) => vm.name), [live.name]);
    assert.equal(await strayGone, 'SIGKILL');
    assert.ok(!existsSync(dead.runDir));
    assert.ok(existsSync(live.runDir));
    rmSync(live.runDir, { recursive: true });
  });

  test('down asks the owner to stop (SIGTERM) and removes what it leaves', async () => {
    const owner = spawn('sleep', ['60']);
    await new Promise((resolve) => owner.once('spawn', resolve));
    const gone = exited(owner);
    const vm = await record(newVmName(owner.pid), owner.pid!, processStartTicks(owner.pid!)!);
    await stopVm(vm.name, 5_000);
    assert.equal(await gone, 'SIGTERM');
    assert.ok(!existsSync(vm.runDir));
  });

  test('down of an unknown name says which VMs exist, exit 1', async () => {
    await assert.rejects(stopVm('exec-0-000000'), (error: Error & { exitCode?: number }) => {
      assert.match(error.message, /no VM named 'exec-0-000000'/);
      assert.equal(error.exitCode, 1);
      return true;
    });
  });
});

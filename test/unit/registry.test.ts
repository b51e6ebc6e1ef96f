import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { MvmError } from '../../src/errors.js';
import { createVmDir, listVms, newVmName, processStartTicks, stopVm, writeVmRecord, type VmRecord } from '../../src/state/registry.js';

const stateRoot = mkdtempSync(join(tmpdir(), 'mvm-registry-'));
const vmsRoot = join(stateRoot, 'vms');
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

function exited(child: ChildProcess): Promise<NodeJS.Signals | null> {
  return new Promise((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
}

async function started(child: ChildProcess): Promise<number> {
  await new Promise((resolve) => child.once('spawn', resolve));
  return child.pid!;
}

/** Whether `child` is still running a moment later: a signal sent to it would have ended it by then. */
async function stillRunning(child: ChildProcess): Promise<boolean> {
  await sleep(300);
  return child.exitCode === null && child.signalCode === null;
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = exited(child);
  child.kill('SIGKILL');
  await gone;
}

const KEEP_ALIVE = 'setInterval(() => {}, 1000)';

/** A process whose command line is what QEMU's is for VM `name`: `-name NAME` and sockets under vms/NAME/. */
function fakeVmm(name: string): ChildProcess {
  const agentSocket = join(vmsRoot, name, 'agent.sock');
  return spawn(process.execPath, ['-e', KEEP_ALIVE, '--', '-name', name, '-chardev', `socket,id=agent,path=${agentSocket},server=on,wait=off`]);
}

/** A process that looks like an mvmctl (node running a script named mvmctl) and dies of SIGTERM. */
function fakeOwner(): ChildProcess {
  const bin = join(stateRoot, 'bin');
  mkdirSync(bin, { recursive: true });
  writeFileSync(join(bin, 'mvmctl'), KEEP_ALIVE + '\n');
  return spawn(process.execPath, [join(bin, 'mvmctl')]);
}

/** What anything able to write vms/ could leave there; written directly, as an attacker would. */
function plantRecord(dir: string, fields: Partial<VmRecord>): void {
  const planted: VmRecord = { name: 'x', backend: 'qemu', command: ['true'], startedAt: new Date().toISOString(), ownerPid: process.pid, ownerStartTicks: 1, runDir: dir, ...fields };
  writeFileSync(join(dir, 'state.json'), JSON.stringify(planted));
}

/** A directory outside vms/ that a hostile record points the reaper at. */
function victim(): { dir: string; file: string } {
  const dir = mkdtempSync(join(stateRoot, 'victim-'));
  const file = join(dir, 'precious');
  writeFileSync(file, 'keep me\n');
  return { dir, file };
}

async function withStateDir(dir: string, body: () => Promise<void>): Promise<void> {
  process.env.MVM_STATE_DIR = dir;
  try {
    await body();
  } finally {
    process.env.MVM_STATE_DIR = stateRoot;
  }
}

function rejectsNaming(path: string): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof MvmError, `expected an MvmError, got ${String(error)}`);
    assert.ok(error.message.includes(path), error.message);
    assert.equal(error.exitCode, 125);
    return true;
  };
}

describe('VM registry', () => {
  test('names are exec-<pid-hex>-<random> and unique', () => {
    assert.match(newVmName(0x1f2e), /^exec-1f2e-[0-9a-f]{6}$/);
    assert.notEqual(newVmName(), newVmName());
  });

  test('a live owner is listed; a dead owner is reaped with its stray VMM killed', async () => {
    const live = await record(newVmName(), process.pid, processStartTicks(process.pid)!);
    const deadName = newVmName();
    const strayVmm = fakeVmm(deadName);
    const strayGone = exited(strayVmm);
    // An owner pid whose start time does not match is a recycled pid: the owner is gone.
    const dead = await record(deadName, process.pid, 1, await started(strayVmm));
    const vms = await listVms();
    assert.deepEqual(vms.map((vm) => vm.name), [live.name]);
    assert.equal(await strayGone, 'SIGKILL');
    assert.ok(!existsSync(dead.runDir));
    assert.ok(existsSync(live.runDir));
    rmSync(live.runDir, { recursive: true });
  });

  test('down asks the owner to stop (SIGTERM) and removes what it leaves', async () => {
    const owner = fakeOwner();
    const ownerPid = await started(owner);
    const gone = exited(owner);
    const vm = await record(newVmName(ownerPid), ownerPid, processStartTicks(ownerPid)!);
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

  describe('a hostile record does not steer the reaper', () => {
    test('a runDir outside vms/ is not removed; only vms/<name> is', async () => {
      const target = victim();
      const vm = await record(newVmName(), process.pid, 1);
      plantRecord(vm.runDir, { name: vm.name, runDir: target.dir });
      await listVms();
      assert.ok(existsSync(target.file));
      assert.ok(!existsSync(join(vmsRoot, vm.name)));
    });

    test('an unrelated process with the recorded pid and start time is not killed', async () => {
      const unrelated = spawn('sleep', ['30']);
      const vm = await record(newVmName(), process.pid, 1, await started(unrelated));
      await listVms();
      assert.ok(await stillRunning(unrelated));
      assert.ok(!existsSync(vm.runDir));
      await stop(unrelated);
    });

    test('vms/<name> that is a symlink: the link goes, its target stays', async () => {
      const target = victim();
      const name = newVmName(0x7ffffffe);
      // What the reaper would read through the link names the link's target as the VM directory.
      plantRecord(target.dir, { name });
      symlinkSync(target.dir, join(vmsRoot, name));
      await listVms();
      assert.ok(existsSync(target.file));
      assert.throws(() => lstatSync(join(vmsRoot, name)), { code: 'ENOENT' });
    });

    test('down of a name outside vms/ is refused', async () => {
      const target = victim();
      plantRecord(target.dir, {});
      await assert.rejects(stopVm(join('..', target.dir.slice(stateRoot.length + 1))), /no VM named/);
      assert.ok(existsSync(target.file));
    });

    test('down signals neither an owner that is not mvmctl nor a VMM that is not this VM\'s', async () => {
      const owner = spawn('sleep', ['30']);
      const ownerPid = await started(owner);
      const name = newVmName();
      // A QEMU, but of another VM: the name matches, the directory does not.
      const otherVmm = spawn(process.execPath, ['-e', KEEP_ALIVE, '--', '-name', name, `path=${join(stateRoot, 'elsewhere', name)}/agent.sock`]);
      const vm = await record(name, ownerPid, processStartTicks(ownerPid)!, await started(otherVmm));
      await stopVm(vm.name, 1_000);
      assert.ok(await stillRunning(owner));
      assert.ok(await stillRunning(otherVmm));
      assert.ok(!existsSync(vm.runDir));
      await Promise.all([stop(owner), stop(otherVmm)]);
    });
  });

  describe('a state directory others can write is refused', () => {
    test('group-writable state dir: ls and exec fail naming it', async () => {
      const dir = mkdtempSync(join(tmpdir(), 'mvm-registry-shared-'));
      chmodSync(dir, 0o775);
      try {
        await withStateDir(dir, async () => {
          await assert.rejects(listVms(), rejectsNaming(dir));
          await assert.rejects(createVmDir(newVmName()), rejectsNaming(dir));
        });
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('group-writable vms dir: refused too', async () => {
      const dir = mkdtempSync(join(tmpdir(), 'mvm-registry-shared-'));
      const vms = join(dir, 'vms');
      mkdirSync(vms, { mode: 0o777 });
      chmodSync(vms, 0o777);
      try {
        await withStateDir(dir, async () => {
          await assert.rejects(listVms(), rejectsNaming(vms));
          await assert.rejects(stopVm('exec-0-000000'), rejectsNaming(vms));
        });
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('a fresh state dir, parents included, is private to us', async () => {
      const root = mkdtempSync(join(tmpdir(), 'mvm-registry-fresh-'));
      const dir = join(root, 'a', 'b');
      try {
        await withStateDir(dir, async () => {
          const runDir = await createVmDir(newVmName());
          for (const path of [join(root, 'a'), dir, join(dir, 'vms'), runDir]) assert.equal(lstatSync(path).mode & 0o777, 0o700, path);
          assert.deepEqual(await listVms(), []);
        });
      } finally {
        rmSync(root, { recursive: true, force: true });
      }
    });
  });
});

/**
 * The exec workflow's lifecycle against a scripted guest (scripted-guest.ts), in milliseconds rather
 * than boots: what is synced back and what is discarded, restore fallback, and that every way a run
 * ends leaves no VMM behind. The same paths run on real VMs in test/e2e.
 */
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { after, describe, test } from 'node:test';
import { parseAddDirSpec } from '../../src/dirsync/index.js';
import { MvmError } from '../../src/errors.js';
import type { BootImage } from '../../src/vm/index.js';
import { execInMicroVm, type ExecDeps, type ExecIo, type ExecRequest } from '../../src/exec/run.js';
import { silentProgress } from '../../src/progress.js';
import { ExitKind } from '../../src/protocol/index.js';
import { politeAgent, ScriptedBackend, type GuestScript } from './scripted-guest.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-lifecycle-'));
process.env.MVM_STATE_DIR = join(scratch, 'state');
after(() => rmSync(scratch, { recursive: true, force: true }));
let counter = 0;

function io(): ExecIo & { lines: string[]; out: () => string } {
  const lines: string[] = [];
  const stdout = new PassThrough();
  const chunks: Buffer[] = [];
  stdout.on('data', (chunk: Buffer) => chunks.push(chunk));
  return {
    stdin: Readable.from([]),
    stdout,
    stderr: new PassThrough(),
    log: (line) => lines.push(line),
    verbose: false,
    progress: silentProgress,
    lines,
    out: () => Buffer.concat(chunks).toString('utf8'),
  };
}

function hostDir(): string {
  const dir = join(scratch, `host-${counter++}`);
  mkdirSync(dir);
  writeFileSync(join(dir, 'a.txt'), 'host\n');
  return dir;
}

const request = (addDirs: string[] = []): ExecRequest => ({
  argv: ['cmd'],
  env: {},
  cpus: 1,
  memoryMiB: 128,
  timeoutSeconds: 30,
  interactive: false,
  addDirs: addDirs.map((spec) => parseAddDirSpec(spec, scratch)),
});

const image: BootImage = { kernel: '/k', kernelSha256: 'k', kernelArgs: [] };
const deps = (backend: ScriptedBackend, bootImage: BootImage = image): ExecDeps => ({ backend, ensureImage: async () => bootImage, bootTimeoutMs: 10_000, accel: 'tcg' });

/** A guest whose command ends as `exit` says, after printing `hello`. */
const commandEnds =
  (exit: { kind: ExitKind; code: number; message?: string }): GuestScript =>
  (message, guest) => {
    if (message.type !== 'exec') return politeAgent(message, guest);
    guest.send({ type: 'started', pid: 2 }, { type: 'stdout', data: Buffer.from('hello\n') }, { type: 'exit', message: '', ...exit });
  };

describe('exec lifecycle (scripted guest)', () => {
  test('the exit code is the command’s, its output arrives, and the VMM is killed without a guest power-off', async () => {
    const backend = new ScriptedBackend(commandEnds({ kind: ExitKind.EXITED, code: 7 }));
    const out = io();
    const result = await execInMicroVm(request(), out, deps(backend), new AbortController().signal);
    assert.equal(result.exitCode, 7);
    assert.equal(out.out(), 'hello\n');
    assert.ok(!backend.guests[0]!.received.some((m) => m.type === 'poweroff'));
    assert.ok(await backend.allExited());
  });

  test('a command that timed out is not synced back: HOST stays, one line says the changes were discarded', async () => {
    const host = hostDir();
    const backend = new ScriptedBackend(commandEnds({ kind: ExitKind.TIMED_OUT, code: 9 }));
    const out = io();
    const result = await execInMicroVm(request([`${host}:/w:rw`]), out, deps(backend), new AbortController().signal);
    assert.equal(result.exitCode, 124);
    assert.ok(!backend.guests[0]!.received.some((m) => m.type === 'unmount'), 'not even unmounted for a sync');
    assert.deepEqual(out.lines, ['command timed out after 30 s', `--add-dir ${host}:/w:rw: guest changes discarded, ${host} left as it was`]);
    assert.equal(readFileSync(join(host, 'a.txt'), 'utf8'), 'host\n');
  });

  test('a directory the guest cannot unmount cleanly is not synced back, with both lines', async () => {
    const host = hostDir();
    const backend = new ScriptedBackend((message, guest) =>
      message.type === 'unmount' ? guest.send({ type: 'error', code: 4, fatal: false, message: 'device busy' }) : politeAgent(message, guest),
    );
    const out = io();
    const result = await execInMicroVm(request([`${host}:/w:rw`]), out, deps(backend), new AbortController().signal);
    assert.equal(result.exitCode, 0);
    assert.deepEqual(out.lines, [
      `--add-dir ${host}:/w:rw: the guest could not unmount it cleanly (device busy)`,
      `--add-dir ${host}:/w:rw: guest changes discarded, ${host} left as it was`,
    ]);
  });

  test('an abort (Ctrl-C) while the command runs kills the VM, discards rw changes and rejects with its reason', async () => {
    const host = hostDir();
    const controller = new AbortController();
    const backend = new ScriptedBackend((message, guest) => {
      if (message.type !== 'exec') return politeAgent(message, guest);
      guest.send({ type: 'started', pid: 2 });
      controller.abort(new Error('interrupted by SIGINT'));
    });
    const out = io();
    await assert.rejects(execInMicroVm(request([`${host}:/w:rw`]), out, deps(backend), controller.signal), /interrupted by SIGINT/);
    assert.ok(await backend.allExited());
    assert.deepEqual(out.lines, [`--add-dir ${host}:/w:rw: guest changes discarded, ${host} left as it was`]);
  });

  test('a VMM that dies mid-command is exit 125 with one line, and no sync', async () => {
    const host = hostDir();
    const backend = new ScriptedBackend((message, guest) => {
      if (message.type !== 'exec') return politeAgent(message, guest);
      guest.send({ type: 'started', pid: 2 });
      backend.vms[0]!.crash();
    });
    const out = io();
    await assert.rejects(
      execInMicroVm(request([`${host}:/w:rw`]), out, deps(backend), new AbortController().signal),
      (error: unknown) => error instanceof MvmError && error.exitCode === 125 && error.message === 'the VM stopped before the command finished (guest crash?)',
    );
    assert.equal(readFileSync(join(host, 'a.txt'), 'utf8'), 'host\n');
    assert.deepEqual(out.lines, [`--add-dir ${host}:/w:rw: guest changes discarded, ${host} left as it was`]);
  });

  test('a guest that ignores --timeout (no EXIT ever) is killed by the host at --timeout + grace: exit 124, no sync, changes discarded', async () => {
    const host = hostDir();
    const backend = new ScriptedBackend((message, guest) => {
      if (message.type !== 'exec') return politeAgent(message, guest);
      // The agent should report TIMED_OUT itself after 1 s; this one goes on as if there were no deadline.
      guest.send({ type: 'started', pid: 2 }, { type: 'stdout', data: Buffer.from('hello\n') });
    });
    const out = io();
    // The whole-run deadline (boot timeout + --timeout + margin: 41 s here) is far later; a run ended by
    // it rejects instead, with another message.
    const result = await execInMicroVm({ ...request([`${host}:/w:rw`]), timeoutSeconds: 1 }, out, { ...deps(backend), guestMarginMs: 30_000, hostDeadlineGraceMs: 200 }, new AbortController().signal);
    assert.equal(result.exitCode, 124);
    assert.equal(result.status.kind, 'timedOut');
    assert.equal(out.out(), 'hello\n', 'output from before the deadline is kept');
    assert.ok(!backend.guests[0]!.received.some((m) => m.type === 'unmount'), 'not unmounted for a sync');
    assert.deepEqual(out.lines, ['command timed out after 1 s', `--add-dir ${host}:/w:rw: guest changes discarded, ${host} left as it was`]);
    assert.equal(readFileSync(join(host, 'a.txt'), 'utf8'), 'host\n');
    assert.ok(await backend.allExited(), 'the VMM was killed');
  });

  test('a snapshot whose restore fails: one warning, then a cold boot runs the command', async () => {
    const backend = new ScriptedBackend(commandEnds({ kind: ExitKind.EXITED, code: 0 }));
    backend.restoreError = new MvmError('QEMU migrate-incoming: boom');
    const out = io();
    const withSnapshot: BootImage = {
      ...image,
      label: 'template tpl',
      chooseSnapshot: async () => ({ plan: { accel: 'tcg', dir: '/snap', driveSlots: { paths: ['/snap/slot0'], slotBytes: 1 << 30 } } }),
    };
    const result = await execInMicroVm(request(), out, deps(backend, withSnapshot), new AbortController().signal);
    assert.equal(result.exitCode, 0);
    assert.equal(out.out(), 'hello\n');
    assert.deepEqual(out.lines, ['template tpl: restoring the snapshot failed (QEMU migrate-incoming: boom); booting cold instead']);
    assert.deepEqual(
      backend.specs.map((spec) => spec.snapshot?.dir ?? 'cold'),
      ['/snap', 'cold'],
    );
    assert.ok(await backend.allExited());
  });

  // The test's own timeout is the bound: without the restore timeout the silent guest would be waited on for good.
  test('a restored guest whose agent stays silent past the restore timeout: one warning, then a cold boot runs the command', { timeout: 60_000 }, async () => {
    // The restored guest never answers HELLO; the cold-booted one is polite.
    const backend = new ScriptedBackend((message, guest) => {
      if (guest.spec.snapshot?.mode === 'restore') return;
      commandEnds({ kind: ExitKind.EXITED, code: 0 })(message, guest);
    });
    const out = io();
    const withSnapshot: BootImage = {
      ...image,
      label: 'template tpl',
      chooseSnapshot: async () => ({ plan: { accel: 'tcg', dir: '/snap', driveSlots: { paths: ['/snap/slot0'], slotBytes: 1 << 30 } } }),
    };
    const result = await execInMicroVm(request(), out, { ...deps(backend, withSnapshot), restoreTimeoutMs: 300 }, new AbortController().signal);
    assert.equal(result.exitCode, 0);
    assert.equal(out.out(), 'hello\n');
    assert.equal(out.lines.length, 1, out.lines.join('\n'));
    assert.match(out.lines[0]!, /^template tpl: restoring the snapshot failed \((the restore took longer than 0\.3 s|the restored guest's agent did not answer within 0\.3 s)\); booting cold instead$/);
    assert.ok(backend.guests[0]!.received.some((m) => m.type === 'hello'), 'the restored guest was asked');
    assert.deepEqual(backend.specs.map((spec) => spec.snapshot?.dir ?? 'cold'), ['/snap', 'cold']);
    assert.ok(await backend.allExited(), 'the silent restored VMM was killed too');
  });

  test('a restore with --add-dir: each image takes a drive slot at the slot size, the rest get empty read-only files of their own', async () => {
    const host = hostDir();
    let imageSize = 0;
    const backend = new ScriptedBackend((message, guest) => {
      if (message.type === 'mount') imageSize = statSync(guest.spec.drives[0]!.path).size;
      politeAgent(message, guest);
    });
    const slotBytes = 256 * 1024 ** 2;
    const withSlots: BootImage = {
      ...image,
      chooseSnapshot: async () => ({ plan: { accel: 'tcg', dir: '/snap', driveSlots: { paths: ['/snap/slot0', '/snap/slot1'], slotBytes } } }),
    };
    const result = await execInMicroVm(request([`${host}:/w:ro`]), io(), deps(backend, withSlots), new AbortController().signal);
    assert.equal(result.exitCode, 0);
    const [spec] = backend.specs;
    assert.deepEqual(spec!.snapshot, { mode: 'restore', dir: '/snap' });
    // The unused slot is an empty file of this VM's own, never the snapshot's shared one.
    assert.deepEqual(spec!.drives.map((drive) => [drive.path.endsWith('disk.ext4') ? 'staged' : drive.path.replace(/.*\//, ''), drive.readOnly]), [['staged', true], ['empty-slot1', true]]);
    assert.ok(spec!.drives[1]!.path.startsWith(spec!.runDir + '/'));
    assert.equal(imageSize, slotBytes);
  });

  test('a snapshot the image rules out for this run: its warning, then a cold boot; the accelerator is asked for', async () => {
    const backend = new ScriptedBackend(commandEnds({ kind: ExitKind.EXITED, code: 0 }));
    const out = io();
    const asked: string[] = [];
    const stale: BootImage = {
      ...image,
      chooseSnapshot: async (accel) => {
        asked.push(accel.accel);
        return { warning: 'template tpl: not using its snapshot (taken under KVM, this run uses TCG); booting cold' };
      },
    };
    const result = await execInMicroVm(request(), out, deps(backend, stale), new AbortController().signal);
    assert.equal(result.exitCode, 0);
    assert.deepEqual(asked, ['tcg']);
    assert.deepEqual(out.lines, ['template tpl: not using its snapshot (taken under KVM, this run uses TCG); booting cold']);
    assert.deepEqual(backend.specs.map((spec) => spec.snapshot?.dir ?? 'cold'), ['cold']);
  });
});

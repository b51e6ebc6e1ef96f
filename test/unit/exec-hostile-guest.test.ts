/**
 * The exec workflow against a scripted hostile guest (scripted-guest.ts): a guest that keeps running
 * after UNMOUNT, or never answers, cannot reach HOST through its disk or hang mvmctl.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync, writeSync, closeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { after, describe, test } from 'node:test';
import { parseAddDirSpec } from '../../src/dirsync/index.js';
import { MvmError } from '../../src/errors.js';
import { execInMicroVm, type ExecDeps, type ExecIo, type ExecRequest } from '../../src/exec/run.js';
import { silentProgress } from '../../src/progress.js';
import { politeAgent, ScriptedBackend, type GuestScript } from './scripted-guest.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-hostile-exec-'));
process.env.MVM_STATE_DIR = join(scratch, 'state');
after(() => rmSync(scratch, { recursive: true, force: true }));
let counter = 0;

function io(): ExecIo & { lines: string[] } {
  const lines: string[] = [];
  return { stdin: Readable.from([]), stdout: new PassThrough(), stderr: new PassThrough(), log: (line) => lines.push(line), verbose: false, progress: silentProgress, lines };
}

function hostDir(content: string): string {
  const dir = join(scratch, `host-${counter++}`);
  mkdirSync(dir);
  writeFileSync(join(dir, 'a.txt'), content);
  return dir;
}

function request(addDirs: string[], timeoutSeconds = 30): ExecRequest {
  return { argv: ['true'], env: {}, cpus: 1, memoryMiB: 128, timeoutSeconds, interactive: false, addDirs: addDirs.map((spec) => parseAddDirSpec(spec, scratch)) };
}

function deps(backend: ScriptedBackend, extra: Partial<ExecDeps> = {}): ExecDeps {
  return { backend, ensureImage: async () => ({ kernel: '/k', kernelSha256: 'k', kernelArgs: [] }), bootTimeoutMs: 10_000, accel: 'tcg', ...extra };
}

/** ext4's superblock state (offset 0x3A in the superblock at 1024): 0 is "mounted, not clean". */
function markUnclean(image: string): void {
  const fd = openSync(image, 'r+');
  writeSync(fd, Buffer.from([0, 0]), 0, 2, 1024 + 0x3a);
  closeSync(fd);
}

describe('exec against a hostile guest', () => {
  test('sync-back reads the image only after the VMM has exited: a guest still writing after UNMOUNT changes nothing', async () => {
    const host = hostDir('from host\n');
    const final = join(scratch, 'final.img');
    const replacement = join(scratch, 'replacement.txt');
    writeFileSync(replacement, 'from guest\n');
    // It answers UNMOUNT and keeps writing: until the VMM dies its disk is mid-write (not clean);
    // only then is it the finished image. A host that reads it before then sees the former.
    const script: GuestScript = (message, guest) => {
      if (message.type !== 'unmount') return politeAgent(message, guest);
      const image = guest.spec.drives[0]!.path;
      copyFileSync(image, final);
      execFileSync('debugfs', ['-w', '-R', `rm a.txt`, final], { stdio: 'ignore' });
      execFileSync('debugfs', ['-w', '-R', `write ${replacement} a.txt`, final], { stdio: 'ignore' });
      markUnclean(image);
      guest.send({ type: 'ok' });
    };
    const backend = new ScriptedBackend(script);
    backend.onKill = (spec) => copyFileSync(final, spec.drives[0]!.path);
    const out = io();
    const result = await execInMicroVm(request([`${host}:/w:rw`]), out, deps(backend), new AbortController().signal);
    assert.equal(result.exitCode, 0, out.lines.join('\n'));
    assert.equal(readFileSync(join(host, 'a.txt'), 'utf8'), 'from guest\n', out.lines.join('\n'));
    assert.ok(await backend.allExited());
  });

  for (const [what, silentOn] of [
    ['MOUNT', 'mount'],
    ['EXEC (no STARTED)', 'exec'],
    ['UNMOUNT', 'unmount'],
  ] as const) {
    test(`a guest that never answers ${what} is killed by the run's deadline: exit 124, one line`, async () => {
      const host = hostDir('kept\n');
      const backend = new ScriptedBackend((message, guest) => (message.type === silentOn ? undefined : politeAgent(message, guest)));
      const out = io();
      const run = execInMicroVm(request([`${host}:/w:${silentOn === 'unmount' ? 'rw' : 'ro'}`], 1), out, deps(backend, { bootTimeoutMs: 1000, guestMarginMs: 500 }), new AbortController().signal);
      await assert.rejects(run, (error: unknown) => error instanceof MvmError && error.exitCode === 124 && /^the guest did not finish within 2\.5 s/.test(error.message));
      assert.ok(await backend.allExited(), 'the VMM is gone');
      assert.equal(readFileSync(join(host, 'a.txt'), 'utf8'), 'kept\n');
    });
  }
});

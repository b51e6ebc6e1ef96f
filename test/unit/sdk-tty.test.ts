/**
 * exec()'s `tty` option against a scripted guest (scripted-guest.ts): what reaches the agent
 * (EXEC's TTY flag and size, TERM, RESIZE), and the refusals: an agent without the TTY capability,
 * a bad size.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { Capability, ExecFlag, ExitKind, TtyUnavailableError, type HostMessage } from '../../src/protocol/index.js';
import { InvalidOptionError } from '../../src/sdk/parse.js';
import type { BootImage } from '../../src/vm/index.js';
import { politeAgent, scriptedExec, type GuestScript } from './scripted-guest.js';

const scratch = mkdtempSync(join(tmpdir(), 'mvm-sdk-tty-'));
process.env.MVM_STATE_DIR = join(scratch, 'state');
process.env.MVM_DATA_DIR = join(scratch, 'data');
after(() => rmSync(scratch, { recursive: true, force: true }));

const image: BootImage = { kernel: '/k', kernelSha256: 'k', kernelArgs: [] };
const TTY_CAPS = Capability.EXEC | Capability.MOUNT | Capability.TTY;

const scripted = (script: GuestScript) => scriptedExec(script, image);

/** An agent with the TTY capability whose command ends with code 0 at its first RESIZE after `resizesBeforeExit`. */
function ttyAgent(resizesBeforeExit: number): GuestScript {
  let resizes = 0;
  return (message, guest) => {
    if (message.type === 'hello') return guest.send({ type: 'hello', version: 1, capabilities: TTY_CAPS, agentVersion: 'scripted tty' });
    if (message.type === 'exec') return guest.send({ type: 'started', pid: 2 }, { type: 'stdout', data: Buffer.from('$ ') });
    if (message.type === 'resize' && ++resizes === resizesBeforeExit) return guest.send({ type: 'exit', kind: ExitKind.EXITED, code: 0, message: '' });
    politeAgent(message, guest);
  };
}

describe('exec() with tty (scripted guest)', () => {
  test('tty: true asks for 24x80 with TERM set; a resize before the start waits for it, later ones go as RESIZE', async () => {
    const { exec, sent } = scripted(ttyAgent(2));
    const handle = exec(['sh'], { accel: 'tcg', tty: true, env: { A: '1' } });
    handle.resize(30, 100);
    handle.stderr.resume();
    for await (const chunk of handle.stdout) {
      assert.equal(String(chunk), '$ ');
      handle.resize(40, 120);
    }
    assert.deepEqual(await handle.exited, { exitCode: 0, timedOut: false });
    const execMsg = sent().find((m): m is Extract<HostMessage, { type: 'exec' }> => m.type === 'exec')!;
    assert.deepEqual(execMsg.tty, { rows: 24, cols: 80 });
    assert.equal(execMsg.flags & ExecFlag.TTY, ExecFlag.TTY);
    assert.deepEqual(
      execMsg.env.map((e) => Buffer.from(e).toString()),
      ['TERM=xterm', 'A=1'],
    );
    assert.deepEqual(sent().filter((m) => m.type === 'resize'), [
      { type: 'resize', rows: 30, cols: 100 },
      { type: 'resize', rows: 40, cols: 120 },
    ]);
  });

  test('an agent without the TTY capability: exited rejects with TtyUnavailableError (exit code 125), nothing is executed', async () => {
    const { exec, sent } = scripted(politeAgent);
    const handle = exec(['sh'], { accel: 'tcg', tty: { rows: 10, cols: 20 } });
    handle.stdout.resume();
    handle.stderr.resume();
    await assert.rejects(handle.exited, (error: unknown) => error instanceof TtyUnavailableError && error.exitCode === 125 && /without -t/.test(error.message));
    assert.equal(sent().filter((m) => m.type === 'exec').length, 0);
  });

  test('bad sizes are refused: the option before any VM starts, resize() at once', async () => {
    const { exec, backend } = scripted(politeAgent);
    for (const tty of [{ rows: 0, cols: 80 }, { rows: 24, cols: 65536 }, { rows: 2.5, cols: 80 }]) {
      const handle = exec(['sh'], { accel: 'tcg', tty });
      await assert.rejects(handle.exited, InvalidOptionError);
    }
    assert.equal(backend.vms.length, 0);
    const handle = exec(['sh'], { accel: 'tcg', tty: true });
    assert.throws(() => handle.resize(0, 1), InvalidOptionError);
    await assert.rejects(handle.exited);
  });
});

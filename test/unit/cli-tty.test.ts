/** `-t/--tty` on `exec` and `console`: how the flags parse, and what the host terminal helpers decide. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { Command } from 'commander';
import { execCommand } from '../../src/cli/exec.js';
import { hostTtySize, refuseJsonWithTty } from '../../src/cli/tty.js';
import { consoleCommand } from '../../src/cli/up.js';
import { MvmError } from '../../src/errors.js';

/** The arguments and flags `command` parses `args` into, with its action replaced by a recorder. */
async function parse(command: Command, args: string[]): Promise<{ argv: unknown[]; flags: Record<string, unknown> }> {
  let got: { argv: unknown[]; flags: Record<string, unknown> } | undefined;
  command.exitOverride().action((...params: unknown[]) => {
    const flags = params.at(-2) as Record<string, unknown>;
    got = { argv: params.slice(0, -2), flags };
  });
  await command.parseAsync(args, { from: 'user' });
  return got!;
}

describe('-t/--tty', () => {
  test('exec: -t, --tty and -ti combined; a -t after -- belongs to the command', async () => {
    assert.equal((await parse(execCommand(), ['-t', '--', 'sh'])).flags.tty, true);
    assert.equal((await parse(execCommand(), ['--tty', '--', 'sh'])).flags.tty, true);
    const combined = await parse(execCommand(), ['-ti', '--', 'sh']);
    assert.equal(combined.flags.tty, true);
    assert.equal(combined.flags.interactive, true);
    const after = await parse(execCommand(), ['--', 'ls', '-t']);
    assert.equal(after.flags.tty, undefined);
    assert.deepEqual(after.argv, [['ls', '-t']]);
  });

  test('console: -t with --command or an argv', async () => {
    const parsed = await parse(consoleCommand(), ['box', '-t', '-i', '--command', 'sh']);
    assert.deepEqual(parsed.argv, ['box', []]);
    assert.equal(parsed.flags.tty, true);
    assert.equal(parsed.flags.command, 'sh');
  });

  test('--json with -t is one clear MvmError (exit 125); either alone is fine', () => {
    assert.throws(
      () => refuseJsonWithTty({ json: true, tty: true }),
      (error: unknown) => error instanceof MvmError && error.exitCode === 125 && /^--json and -t\/--tty do not go together/.test(error.message),
    );
    refuseJsonWithTty({ json: true });
    refuseJsonWithTty({ tty: true });
  });

  test('without a terminal on stdout the guest gets 24x80', { skip: process.stdout.isTTY ? 'stdout is a terminal here' : false }, () => {
    assert.deepEqual(hostTtySize(), { rows: 24, cols: 80 });
  });
});

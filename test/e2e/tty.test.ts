// End to end: `mvmctl exec -t` and `console -t` in a real terminal. tmux is the terminal: the
// test types with send-keys and reads the screen with capture-pane, polling (TCG is slow).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { assertNoVmLeft, isolatedEnv, mvmctl, mvmctlBin } from './helpers.js';

const { env, stateDir, cleanup } = isolatedEnv();
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-tty-'));
const session = `mvm-e2e-tty-${process.pid}`;
const hasTmux = spawnSync('tmux', ['-V']).status === 0;

function tmux(...args: string[]): string {
  const result = spawnSync('tmux', ['-L', session, ...args], { encoding: 'utf8' });
  assert.equal(result.status, 0, `tmux ${args.join(' ')}: ${result.stderr}`);
  return result.stdout;
}

const screen = (): string => tmux('capture-pane', '-p', '-t', session);

/** Waits until the screen matches, and returns the match. */
async function waitForScreen(pattern: RegExp, timeoutMs = 120_000): Promise<RegExpMatchArray> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const match = screen().match(pattern);
    if (match) return match;
    if (Date.now() > deadline) assert.fail(`screen never matched ${pattern}:\n${screen()}`);
    await sleep(200);
  }
}

/** Types `line` and Enter in the pane. */
function type(line: string): void {
  tmux('send-keys', '-t', session, '-l', line);
  tmux('send-keys', '-t', session, 'Enter');
}

after(async () => {
  await mvmctl(['down', '--all'], env);
  if (hasTmux) spawnSync('tmux', ['-L', session, 'kill-server']);
  // The pane's mvmctl is gone with the server; its VM goes with it (parent-death signal).
  await assertNoVmLeft(stateDir).catch(() => {});
  cleanup();
  rmSync(work, { recursive: true, force: true });
});

describe('mvmctl exec -t', { skip: hasTmux ? false : 'tmux is not installed' }, () => {
  before(async () => {
    const result = await mvmctl(['image', 'build'], env);
    assert.equal(result.code, 0, result.stderr);
  });

  test('a shell on a guest terminal: size, resize, Ctrl-C, exit code, host terminal restored', { timeout: 600_000 }, async () => {
    const exitFile = join(work, 'exit-code');
    const envArgs = Object.entries({ MVM_STATE_DIR: env.MVM_STATE_DIR!, MVM_NO_TCG_WARNING: '1' }).map(([k, v]) => `${k}=${v}`);
    // The pane runs a host shell, so that after mvmctl returns the test can look at the terminal it left.
    tmux('new-session', '-d', '-s', session, '-x', '100', '-y', '30', 'sh');
    type(`env ${envArgs.join(' ')} ${mvmctlBin} exec -t -i -- sh; echo "$?" > ${exitFile}; clear; stty -a`);
    type('tty; echo ready-$((20+22))');
    await waitForScreen(/\/dev\/pts\/\d+\s+ready-42/);
    type('stty size');
    await waitForScreen(/^30 100\s*$/m);
    tmux('resize-window', '-t', session, '-x', '120', '-y', '40');
    type('stty size');
    await waitForScreen(/^40 120\s*$/m);
    // Raw mode on the host: the Ctrl-C byte reaches the guest's terminal, which interrupts its
    // foreground job; the shell lives on and reports 130.
    type('sleep 100');
    await sleep(2_000);
    tmux('send-keys', '-t', session, 'C-c');
    type('echo "slept-$?"');
    await waitForScreen(/slept-130/, 30_000);
    type('exit 7');
    await waitForScreen(/icanon/);
    assert.equal(readFileSync(exitFile, 'utf8').trim(), '7');
    const modes = screen();
    assert.match(modes, /(^|\s)icanon(\s|$)/m, 'canonical mode is back');
    assert.match(modes, /(^|\s)echo(\s|$)/m, 'echo is back');
    assert.match(modes, /(^|\s)isig(\s|$)/m, 'signals from keys are back');
    tmux('kill-session', '-t', session);
  });

  test('the host terminal is restored after a timeout (exit 124) and after SIGTERM (exit 143)', { timeout: 600_000 }, async () => {
    const exitFile = join(work, 'exit-code-2');
    const pidFile = join(work, 'mvmctl-pid');
    const envArgs = `env MVM_STATE_DIR=${env.MVM_STATE_DIR!} MVM_NO_TCG_WARNING=1`;
    tmux('new-session', '-d', '-s', session, '-x', '100', '-y', '30', 'sh');
    type(`${envArgs} ${mvmctlBin} exec -ti --timeout 3 -- sleep 100; echo "timeout-rc-$?"; stty -a`);
    await waitForScreen(/timeout-rc-124[\s\S]*icanon/);
    assert.match(screen(), /(^|\s)echo(\s|$)/m);
    type('clear');
    // exec replaces the pane's shell child, so the pid written is mvmctl's own.
    type(`sh -c 'echo $$ > ${pidFile}; exec ${envArgs} ${mvmctlBin} exec -ti -- sh -c "echo running; sleep 100"'; echo "$?" > ${exitFile}; stty -a`);
    await waitForScreen(/^running\s*$/m);
    process.kill(Number(readFileSync(pidFile, 'utf8')), 'SIGTERM');
    await waitForScreen(/icanon/);
    assert.equal(readFileSync(exitFile, 'utf8').trim(), '143');
    assert.match(screen(), /(^|\s)echo(\s|$)/m);
    tmux('kill-session', '-t', session);
    await assertNoVmLeft(stateDir);
  });

  test('-t without a terminal: 24x80, both streams on stdout, stderr empty', { timeout: 300_000 }, async () => {
    const result = await mvmctl(['exec', '-t', '--', 'sh', '-c', 'tty; stty size; echo to-stderr >&2; exit 3'], env);
    assert.equal(result.code, 3, result.stderr);
    const out = result.stdout.toString('utf8');
    assert.match(out, /\/dev\/pts\/\d+\r\n24 80\r\nto-stderr\r\n/);
    assert.doesNotMatch(result.stderr, /to-stderr/);
  });

  test('--json with -t is refused: one error event, exit 125, no VM', async () => {
    const result = await mvmctl(['exec', '--json', '-t', '--', 'true'], env);
    assert.equal(result.code, 125);
    const lines = result.stdout.toString('utf8').trim().split('\n');
    assert.equal(lines.length, 1);
    const event = JSON.parse(lines[0]!) as { type: string; message: string; exitCode: number };
    assert.equal(event.type, 'error');
    assert.equal(event.exitCode, 125);
    assert.match(event.message, /--json and -t/);
    await assertNoVmLeft(stateDir);
  });

  test('console -t: a shell in an up VM, resized, with its exit code; without a terminal one stream', { timeout: 600_000 }, async () => {
    const up = await mvmctl(['up', '--name', 'term'], env);
    assert.equal(up.code, 0, up.stderr);
    const plain = await mvmctl(['console', 'term', '-t', '--command', 'stty size; echo to-stderr >&2; exit 4'], env);
    assert.equal(plain.code, 4, plain.stderr);
    assert.match(plain.stdout.toString('utf8'), /^24 80\r\nto-stderr\r\n/);

    const exitFile = join(work, 'console-exit-code');
    tmux('new-session', '-d', '-s', session, '-x', '90', '-y', '25', 'sh');
    type(`env MVM_STATE_DIR=${env.MVM_STATE_DIR!} ${mvmctlBin} console term -t -i -- sh; echo "$?" > ${exitFile}; clear; stty -a`);
    type('stty size');
    await waitForScreen(/^25 90\s*$/m);
    tmux('resize-window', '-t', session, '-x', '110', '-y', '35');
    type('stty size');
    await waitForScreen(/^35 110\s*$/m);
    type('exit 9');
    await waitForScreen(/icanon/);
    assert.equal(readFileSync(exitFile, 'utf8').trim(), '9');
    assert.match(screen(), /(^|\s)echo(\s|$)/m, 'echo is back');
    tmux('kill-session', '-t', session);
    assert.equal((await mvmctl(['down', 'term'], env)).code, 0);
  });
});

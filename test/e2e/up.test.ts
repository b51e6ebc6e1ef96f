// End to end: long-lived VMs. `mvmctl up` leaves a supervisor owning a real VM; `console` runs
// commands in it through the supervisor's control socket; `down` stops it cleanly (rw directories
// synced back); a killed supervisor takes its VM with it.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { get } from 'node:http';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { assertNoVmLeft, collect, isolatedEnv, mvmctl, startMvmctl, vmProcessesMentioning, waitForOutput } from './helpers.js';

const isolated = isolatedEnv();
const { env, stateDir } = isolated;
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-up-'));
// A test that fails before its `down` would leave its VM's supervisor running after the state dir is gone.
after(async () => {
  await mvmctl(['down', '--all'], env);
  isolated.cleanup();
  rmSync(work, { recursive: true, force: true });
});

before(async () => {
  const built = await mvmctl(['image', 'build'], env);
  assert.equal(built.code, 0, built.stderr);
});

function fetchText(url: string): Promise<string> {
  return new Promise((resolve, reject) => {
    get(url, (res) => {
      let text = '';
      res.on('data', (chunk: Buffer) => (text += chunk.toString()));
      res.on('end', () => resolve(text));
    }).on('error', reject);
  });
}

async function lsNames(): Promise<string[]> {
  const ls = await mvmctl(['ls', '--json'], env);
  assert.equal(ls.code, 0, ls.stderr);
  return (JSON.parse(ls.stdout.toString()) as { name: string }[]).map((vm) => vm.name);
}

/** Supervisors (`mvmctl __supervise`) of this file's VMs that still run (all, or the one of `name`): the owners `ls` names. */
async function supervisors(name?: string): Promise<number[]> {
  const ls = await mvmctl(['ls', '--json'], env);
  const vms = JSON.parse(ls.stdout.toString()) as { name: string; ownerPid: number }[];
  return vms
    .filter((vm) => name === undefined || vm.name === name)
    .map((vm) => vm.ownerPid)
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('__supervise');
      } catch {
        return false;
      }
    });
}

describe('mvmctl up, console, down', () => {
  test('up prints the name and returns; console runs commands one after another in the same guest; down syncs rw back', async () => {
    const share = mkdtempSync(join(work, 'share-'));
    writeFileSync(join(share, 'in.txt'), 'from the host\n');
    const up = await mvmctl(['up', '--name', 'box', '--add-dir', `${share}:/data:rw`], env);
    assert.equal(up.code, 0, up.stderr);
    assert.equal(up.stdout.toString(), 'box\n');
    assert.deepEqual(await lsNames(), ['box']);

    const first = await mvmctl(['console', 'box', '--command', 'cat /data/in.txt; echo kept > /tmp/state; echo oops >&2; exit 3'], env);
    assert.equal(first.code, 3, first.stderr);
    assert.equal(first.stdout.toString(), 'from the host\n');
    assert.equal(first.stderr.toString(), 'oops\n');
    const second = await mvmctl(['console', 'box', '-e', 'WHO=second', '--', 'sh', '-c', 'cat /tmp/state; echo "$WHO" > /data/out.txt'], env);
    assert.equal(second.code, 0, second.stderr);
    assert.equal(second.stdout.toString(), 'kept\n', 'the second command sees what the first left in the guest');
    const piped = await mvmctl(['console', 'box', '-i', '--', 'tr', 'a-z', 'A-Z'], env, 'stdin reaches it\n');
    assert.equal(piped.stdout.toString(), 'STDIN REACHES IT\n');
    const slow = await mvmctl(['console', 'box', '--timeout', '1', '--', 'sleep', '30'], env);
    assert.equal(slow.code, 124, slow.stderr);

    assert.equal(readFileSync(join(share, 'in.txt'), 'utf8'), 'from the host\n');
    const down = await mvmctl(['down', 'box'], env);
    assert.equal(down.code, 0, down.stderr);
    assert.equal(readFileSync(join(share, 'out.txt'), 'utf8'), 'second\n', 'down synced the guest changes back');
    assert.deepEqual(await supervisors(), []);
    await assertNoVmLeft(stateDir);
  });

  test('Ctrl-C at console goes to the command (exit 130) and the VM stays up', async () => {
    const up = await mvmctl(['up', '--name', 'intr'], env);
    assert.equal(up.code, 0, up.stderr);
    const child = startMvmctl(['console', 'intr', '--', 'sh', '-c', 'echo ready; exec sleep 60'], env);
    const done = collect(child);
    await waitForOutput(child, 'ready\n');
    child.kill('SIGINT');
    assert.equal((await done).code, 130);
    const again = await mvmctl(['console', 'intr', '--command', 'echo still up'], env);
    assert.equal(again.stdout.toString(), 'still up\n', again.stderr);
    assert.equal((await mvmctl(['down', 'intr'], env)).code, 0);
    await assertNoVmLeft(stateDir);
  });

  test('up -p forwards a loopback host port to a server the console started', async () => {
    const probe = createServer().listen(0, '127.0.0.1');
    await once(probe, 'listening');
    const { port } = probe.address() as AddressInfo;
    await new Promise((resolve) => probe.close(resolve));
    const up = await mvmctl(['up', '--name', 'web', '-p', `${port}:8000`], env);
    assert.equal(up.code, 0, up.stderr);
    // The agent kills the command's process group when the command ends, so the server must be in
    // a session of its own by then; httpd's own daemonizing races with that (its parent exits
    // before the child calls setsid), so the command waits for the server's setsid.
    const serve = [
      'mkdir -p /www && echo served > /www/index.html || exit 1',
      'setsid httpd -f -p 8000 -h /www </dev/null >/dev/null 2>&1 &',
      'for i in $(seq 500); do read -r _ _ _ _ _ sid _ < /proc/$!/stat && [ "$sid" = "$!" ] && exit 0; sleep 0.01; done; exit 1',
    ].join('\n');
    const served = await mvmctl(['console', 'web', '--command', serve], env);
    assert.equal(served.code, 0, served.stderr);
    // It may not be listening yet: ask until it answers.
    let body = '';
    for (let attempt = 0; attempt < 100 && body === ''; attempt++) {
      body = await fetchText(`http://127.0.0.1:${port}/index.html`).catch(async () => (await sleep(100), ''));
    }
    assert.equal(body, 'served\n');
    assert.equal((await mvmctl(['down', 'web'], env)).code, 0);
    await assertNoVmLeft(stateDir);
  });

  test('a killed supervisor takes its VM with it; ls cleans up; console and down then say there is no such VM', async () => {
    const up = await mvmctl(['up', '--name', 'doomed'], env);
    assert.equal(up.code, 0, up.stderr);
    const [supervisor] = await supervisors('doomed');
    assert.ok(supervisor, 'the supervisor runs');
    process.kill(supervisor, 'SIGKILL');
    for (let i = 0; i < 50 && vmProcessesMentioning(stateDir).length > 0; i++) await sleep(100);
    assert.deepEqual(vmProcessesMentioning(stateDir), [], 'the VMM died with its supervisor');
    assert.deepEqual(await lsNames(), []);
    const lost = await mvmctl(['console', 'doomed', '--command', 'true'], env);
    assert.equal(lost.code, 1);
    assert.equal(lost.stderr.toString(), "mvmctl: no VM named 'doomed' is up (none is running)\n");
    const down = await mvmctl(['down', 'doomed'], env);
    assert.equal(down.code, 1);
    await assertNoVmLeft(stateDir);
  });

  test('Ctrl-C at up while the VM boots: exit 130, and the supervisor takes the VM down', async () => {
    const child = startMvmctl(['up', '--name', 'halfway', '--no-snapshot', '-v'], env);
    const done = collect(child);
    await new Promise<void>((resolve) => {
      let seen = '';
      child.stderr!.on('data', (chunk: Buffer) => {
        seen += chunk.toString();
        if (seen.includes('[timing] VMM started')) resolve();
      });
    });
    child.kill('SIGINT');
    const result = await done;
    assert.equal(result.code, 130, result.stderr.toString());
    assert.equal(result.stdout.toString(), '');
    for (let i = 0; i < 50 && (await lsNames()).length > 0; i++) await sleep(100);
    assert.deepEqual(await lsNames(), []);
    await assertNoVmLeft(stateDir);
  });

  test('bad input is one line, exit 125, and nothing starts', async () => {
    const both = await mvmctl(['console', 'x', '--command', 'true', '--', 'true'], env);
    assert.equal(both.code, 125);
    assert.match(both.stderr.toString(), /^mvmctl: give the command either as --command/);
    const badName = await mvmctl(['up', '--name', '../evil'], env);
    assert.equal(badName.code, 125);
    assert.match(badName.stderr.toString(), /'\.\.\/evil' cannot name a VM/);
    assert.deepEqual(await supervisors(), []);
    await assertNoVmLeft(stateDir);
  });
});

// End to end: README promises that no other e2e file pins down. Each test fails when its promise
// breaks.
import assert from 'node:assert/strict';
import { accessSync, chmodSync, constants, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { inspectKvmHost } from '../../src/accel/index.js';
import { collect, isolatedEnv, mvmctl, startMvmctl, vmProcessesMentioning, waitForOutput, type RunResult } from './helpers.js';

const isolated = isolatedEnv();
const { stateDir } = isolated;
// The QEMU backend under whatever accelerator auto picks: the promises below are the default path's.
const env: NodeJS.ProcessEnv = { ...isolated.env };
for (const name of ['MVM_BACKEND', 'MVM_ACCEL', 'MVM_KVM_PRECHECK', 'MVM_FIRECRACKER', 'MVM_QEMU']) delete env[name];
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-promises-'));

after(() => {
  isolated.cleanup();
  rmSync(work, { recursive: true, force: true });
});

before(async () => {
  const built = await mvmctl(['image', 'build'], env);
  assert.equal(built.code, 0, built.stderr);
});

const GUEST_PATH = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const lines = (text: string | Buffer) => text.toString().split('\n').filter((line) => line !== '');
const freshDir = (name: string) => mkdtempSync(join(work, `${name}-`));

function vmNames(dir = stateDir): string[] {
  const vms = join(dir, 'vms');
  return existsSync(vms) ? readdirSync(vms) : [];
}

/** No VMM process and no VM state directory under `dir` once the runs are over. */
async function assertNothingLeft(dir = stateDir): Promise<void> {
  for (let i = 0; i < 50 && vmProcessesMentioning(dir).length > 0; i++) await sleep(100);
  assert.deepEqual(vmProcessesMentioning(dir), [], 'no VMM or vsock device process may outlive its run');
  assert.deepEqual(vmNames(dir), [], 'no state dir may outlive its run');
}

/**
 * Starts `exec -- sh -c 'echo ready; sleep 100'` and resolves once the command runs in the guest,
 * with the run's result still to come (wrapped: an async function would wait for a returned promise).
 */
async function startSleeper(runEnv: NodeJS.ProcessEnv): Promise<{ done: Promise<RunResult> }> {
  const child = startMvmctl(['exec', '--', 'sh', '-c', 'echo ready; sleep 100'], runEnv);
  const done = collect(child);
  await waitForOutput(child, 'ready\n');
  return { done };
}

async function lsNames(runEnv: NodeJS.ProcessEnv): Promise<string[]> {
  const ls = await mvmctl(['ls', '--json'], runEnv);
  assert.equal(ls.code, 0, ls.stderr);
  return (JSON.parse(ls.stdout.toString()) as { name: string }[]).map((vm) => vm.name).sort();
}

const host = inspectKvmHost();
const TCG_WARNING = /^mvmctl: .+: emulating the CPU with TCG, which is much slower than KVM \(--accel tcg or MVM_ACCEL=tcg skips this check; MVM_NO_TCG_WARNING=1 hides this line\)$/;

describe('the TCG warning', {
  skip: host.device === 'present' && !host.ruledOut ? 'KVM may run the guest on this host, so auto need not emulate' : false,
}, () => {
  test('auto prints it once; MVM_NO_TCG_WARNING=1 hides it; --accel tcg never prints it', async () => {
    const loud = { ...env };
    delete loud.MVM_NO_TCG_WARNING;
    const auto = await mvmctl(['exec', '--accel', 'auto', '--', 'echo', 'ok'], loud);
    assert.equal(auto.code, 0, auto.stderr);
    assert.equal(auto.stdout.toString(), 'ok\n');
    assert.equal(lines(auto.stderr).length, 1, auto.stderr);
    assert.match(lines(auto.stderr)[0]!, TCG_WARNING);

    const hidden = await mvmctl(['exec', '--accel', 'auto', '--', 'echo', 'ok'], { ...loud, MVM_NO_TCG_WARNING: '1' });
    assert.equal(hidden.code, 0, hidden.stderr);
    assert.equal(hidden.stdout.toString(), 'ok\n');
    assert.equal(hidden.stderr, '');

    const tcg = await mvmctl(['exec', '--accel', 'tcg', '--', 'echo', 'ok'], loud);
    assert.equal(tcg.code, 0, tcg.stderr);
    assert.equal(tcg.stdout.toString(), 'ok\n');
    assert.equal(tcg.stderr, '');
    await assertNothingLeft();
  });
});

describe('directories: MVM_* variables, else XDG, else under HOME', () => {
  const unset = (extra: NodeJS.ProcessEnv): NodeJS.ProcessEnv => {
    const out: NodeJS.ProcessEnv = { ...env, ...extra };
    for (const name of ['MVM_STATE_DIR', 'MVM_CACHE_DIR', 'MVM_DATA_DIR', 'XDG_RUNTIME_DIR', 'XDG_CACHE_HOME', 'XDG_DATA_HOME']) {
      if (!(name in extra)) delete out[name];
    }
    return out;
  };

  /** The paths `mvmctl doctor --json` reports for the state, cache and data dirs. */
  async function doctorDirs(runEnv: NodeJS.ProcessEnv): Promise<Record<string, string>> {
    const result = await mvmctl(['doctor', '--json'], runEnv);
    assert.equal(result.code, 0, result.stdout.toString() + result.stderr);
    const report = JSON.parse(result.stdout.toString()) as { checks: { name: string; summary: string }[] };
    const out: Record<string, string> = {};
    for (const name of ['state dir', 'cache dir', 'data dir']) {
      const summary = report.checks.find((check) => check.name === name)?.summary;
      assert.ok(summary, `doctor has a '${name}' row`);
      out[name] = /^(\/\S*?)(?::| \(|$)/.exec(summary)?.[1] ?? summary;
    }
    return out;
  }

  test('a run with only XDG_RUNTIME_DIR set keeps its VM state in $XDG_RUNTIME_DIR/mvm', async () => {
    const runtime = freshDir('xdg-runtime');
    const xdgEnv = unset({ XDG_RUNTIME_DIR: runtime });
    // The image cache stays the shared one (XDG_CACHE_HOME and MVM_CACHE_DIR as the caller has them).
    if (process.env.MVM_CACHE_DIR) xdgEnv.MVM_CACHE_DIR = process.env.MVM_CACHE_DIR;
    if (process.env.XDG_CACHE_HOME) xdgEnv.XDG_CACHE_HOME = process.env.XDG_CACHE_HOME;
    const xdgState = join(runtime, 'mvm');
    const { done } = await startSleeper(xdgEnv);
    const names = vmNames(xdgState);
    assert.equal(names.length, 1, 'the VM state dir is under $XDG_RUNTIME_DIR/mvm/vms');
    assert.equal(vmProcessesMentioning(xdgState).length, 1, 'its QEMU uses that state dir');
    assert.deepEqual(await lsNames(xdgEnv), names);
    assert.deepEqual(await lsNames(env), [], 'another state dir does not see it');
    const down = await mvmctl(['down', names[0]!], xdgEnv);
    assert.equal(down.code, 0, down.stderr);
    assert.equal((await done).code, 143);
    await assertNothingLeft(xdgState);
  });

  test('doctor reports each directory by the documented rules, and creates none of them', async () => {
    const [runtime, cache, data, home] = ['run', 'cache', 'data', 'home'].map(freshDir) as [string, string, string, string];
    const xdg = await doctorDirs(unset({ XDG_RUNTIME_DIR: runtime, XDG_CACHE_HOME: cache, XDG_DATA_HOME: data }));
    assert.deepEqual(xdg, { 'state dir': join(runtime, 'mvm'), 'cache dir': join(cache, 'mvm'), 'data dir': join(data, 'mvm') });

    const [ownState, ownCache, ownData] = ['own-state', 'own-cache', 'own-data'].map(freshDir) as [string, string, string];
    const both = await doctorDirs(unset({
      XDG_RUNTIME_DIR: runtime, XDG_CACHE_HOME: cache, XDG_DATA_HOME: data,
      MVM_STATE_DIR: ownState, MVM_CACHE_DIR: ownCache, MVM_DATA_DIR: ownData,
    }));
    assert.deepEqual(both, { 'state dir': ownState, 'cache dir': ownCache, 'data dir': ownData }, 'MVM_* wins over XDG');

    const neither = await doctorDirs(unset({ HOME: home }));
    assert.deepEqual(neither, {
      'state dir': join(home, '.local', 'state', 'mvm'),
      'cache dir': join(home, '.cache', 'mvm'),
      'data dir': join(home, '.local', 'share', 'mvm'),
    });
    for (const dir of [runtime, cache, data, home]) assert.deepEqual(readdirSync(dir), [], `doctor wrote nothing under ${dir}`);
  });
});

function onPath(binary: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    const candidate = join(dir, binary);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

const realQemu = onPath('qemu-system-x86_64');

test('MVM_QEMU: the run goes through the given binary', { skip: realQemu ? false : 'no qemu-system-x86_64 on PATH to wrap' }, async () => {
  const dir = freshDir('qemu-wrapper');
  const log = join(dir, 'invocations');
  const wrapper = join(dir, 'qemu-wrapper');
  writeFileSync(wrapper, `#!/bin/sh\necho "$$ $*" >> '${log}'\nexec '${realQemu}' "$@"\n`);
  chmodSync(wrapper, 0o755);
  const result = await mvmctl(['exec', '--', 'echo', 'through the wrapper'], { ...env, MVM_QEMU: wrapper });
  assert.equal(result.code, 0, result.stderr);
  assert.equal(result.stdout.toString(), 'through the wrapper\n');
  assert.equal(result.stderr, '');
  const boots = lines(readFileSync(log, 'utf8')).filter((line) => / -M microvm/.test(line));
  assert.equal(boots.length, 1, 'one VM started through the wrapper');
  assert.ok(boots[0]!.includes(stateDir), 'with this run’s state dir');
  await assertNothingLeft();
});

test('the guest environment: PATH, HOME, cwd /, root, nothing from the host unless -e', async () => {
  const hostEnv = { ...env, MVM_SECRET_TEST: 'host-only' };
  const [bare, passed, cwd, uid] = await Promise.all([
    mvmctl(['exec', '--', 'env'], hostEnv),
    mvmctl(['exec', '-e', 'MVM_SECRET_TEST=passed', '--', 'env'], hostEnv),
    mvmctl(['exec', '--', 'readlink', '/proc/self/cwd'], hostEnv),
    mvmctl(['exec', '--', 'id', '-u'], hostEnv),
  ]);
  for (const result of [bare, passed, cwd, uid]) assert.equal(result.code, 0, result.stderr);
  assert.deepEqual(lines(bare.stdout).sort(), ['HOME=/root', GUEST_PATH]);
  assert.deepEqual(lines(passed.stdout).sort(), ['HOME=/root', 'MVM_SECRET_TEST=passed', GUEST_PATH]);
  assert.equal(cwd.stdout.toString(), '/\n');
  assert.equal(uid.stdout.toString(), '0\n');
  await assertNothingLeft();
});

test('--cpus and --memory are what the guest sees', async () => {
  const probe = ['sh', '-c', 'nproc; sed -n "s/^MemTotal: *\\([0-9]*\\) kB$/\\1/p" /proc/meminfo'];
  const [small, standard] = await Promise.all([
    mvmctl(['exec', '--no-snapshot', '--cpus', '1', '--memory', '256M', '--', ...probe], env),
    mvmctl(['exec', '--', ...probe], env),
  ]);
  for (const [result, cpus, mib] of [[small, 1, 256], [standard, 2, 512]] as const) {
    assert.equal(result.code, 0, result.stderr);
    const [nproc, memKiB] = lines(result.stdout);
    assert.equal(nproc, String(cpus));
    // MemTotal is RAM less what the kernel reserves for itself: a little under the size asked for.
    assert.ok(Number(memKiB) > mib * 1024 * 0.75 && Number(memKiB) <= mib * 1024, `${mib} MiB guest: MemTotal ${memKiB} kB`);
  }
  await assertNothingLeft();
});

describe('--add-dir rw: room for new data', () => {
  let result: RunResult;
  let hostDir = '';
  before(async () => {
    hostDir = freshDir('rw-room');
    writeFileSync(join(hostDir, 'small'), 'a small host dir\n');
    // df's Available (what the guest may still write), then whether a 1 GiB file fits.
    const script = 'df -Pk /data | tail -n 1; fallocate -l 1G /data/big; echo "fallocate $?"; rm -f /data/big';
    result = await mvmctl(['exec', '--add-dir', `${hostDir}:/data:rw`, '--', 'sh', '-c', script], env);
  });

  test('df in the guest shows about 1 GiB free for a small host dir; nothing comes back', async () => {
    assert.equal(result.code, 0, result.stderr);
    const [df] = lines(result.stdout);
    const fields = df!.split(/\s+/);
    assert.equal(fields[5], '/data', df);
    assert.ok(Number(fields[3]) >= 1000 * 1024, `at least 1000 MiB available: ${df}`);
    assert.deepEqual(readdirSync(hostDir), ['small']);
    await assertNothingLeft();
  });

  // The image's free blocks count the clusters ext4 holds back for delayed allocation: staging adds them.
  test('a 1 GiB file fits', () => {
    assert.equal(lines(result.stdout)[1], 'fallocate 0', result.stdout.toString() + result.stderr);
  });
});

describe('mvmctl down', () => {
  test('--all stops every running VM, printing each name, exit 0', async () => {
    const runs = await Promise.all([startSleeper(env), startSleeper(env)]);
    const names = await lsNames(env);
    assert.equal(names.length, 2);
    const down = await mvmctl(['down', '--all'], env);
    assert.equal(down.code, 0, down.stderr);
    assert.deepEqual(lines(down.stdout).sort(), names);
    for (const run of runs) assert.equal((await run.done).code, 143, 'each exec ends as on SIGTERM');
    await assertNothingLeft();
  });

  test('several names stop those VMs; a name that is gone exits 1 with one line', async () => {
    const runs = await Promise.all([startSleeper(env), startSleeper(env)]);
    const names = await lsNames(env);
    assert.equal(names.length, 2);
    const down = await mvmctl(['down', ...names], env);
    assert.equal(down.code, 0, down.stderr);
    assert.equal(down.stdout.toString(), names.map((name) => `${name}\n`).join(''));
    for (const run of runs) assert.equal((await run.done).code, 143);
    await assertNothingLeft();
    const again = await mvmctl(['down', names[0]!], env);
    assert.equal(again.code, 1);
    assert.equal(again.stderr, `mvmctl: no VM named '${names[0]}' (none is running)\n`);
  });
});

describe('a guest that dies mid-command', () => {
  test('a kernel panic (panic_on_oom) exits 125 with one line and the console tail; output from before it is kept', async () => {
    // overcommit lets dd's 1 GiB buffer be allocated in a 512 MiB guest; filling it is the OOM.
    const crash = 'echo before; echo 1 > /proc/sys/vm/overcommit_memory; echo 1 > /proc/sys/vm/panic_on_oom; dd if=/dev/zero of=/dev/null bs=1G count=1; echo after';
    const result = await mvmctl(['exec', '--', 'sh', '-c', crash], env);
    await assertNothingLeft();
    assert.equal(result.code, 125, result.stderr);
    assert.equal(result.stdout.toString(), 'before\n');
    assert.match(result.stderr, /^mvmctl: the VM stopped before the command finished [^\n]+\n(  \| .*\n)*$/, 'one line, then the console tail');
  });

  test('a guest that reboots under the command exits 125 with one line and the console tail', async () => {
    const result = await mvmctl(['exec', '--', 'sh', '-c', 'echo before; reboot -f; sleep 30; echo after'], env);
    await assertNothingLeft();
    assert.equal(result.code, 125, result.stderr);
    assert.equal(result.stdout.toString(), 'before\n');
    assert.match(result.stderr, /^mvmctl: the VM stopped before the command finished [^\n]+\n(  \| .*\n)*$/, 'one line, then the console tail');
  });

  // The guest's init ends the VM when the agent ends, rather than respawning an agent that knows no session.
  test('an agent killed under the command ends the run at once: exit 125', async () => {
    const result = await mvmctl(['exec', '--timeout', '60', '--', 'sh', '-c', 'echo before; sleep 1; kill -9 $PPID; sleep 1; echo after'], env);
    await assertNothingLeft();
    assert.equal(result.stdout.toString(), 'before\n');
    assert.equal(result.code, 125, result.stderr);
    assert.match(result.stderr, /^mvmctl: the VM stopped before the command finished [^\n]+\n(  \| .*\n)*$/, 'one line, then the console tail');
  });
});

describe('-v', () => {
  const tagged = (stderr: string, tag: string) => lines(stderr).filter((line) => line.startsWith(`mvmctl: [${tag}] `));

  test('prints [console] and [timing] lines on stderr, booting cold or restored; stdout stays the command’s', async () => {
    const cold = await mvmctl(['exec', '-v', '--no-snapshot', '--', 'echo', 'ok'], env);
    assert.equal(cold.code, 0, cold.stderr);
    assert.equal(cold.stdout.toString(), 'ok\n');
    assert.ok(tagged(cold.stderr, 'console').some((line) => line.includes('mvm-agent')), cold.stderr);
    assert.ok(tagged(cold.stderr, 'timing').some((line) => /agent ready/.test(line)), cold.stderr);
    const warm = await mvmctl(['exec', '-v', '--', 'echo', 'ok'], env);
    assert.equal(warm.code, 0, warm.stderr);
    assert.equal(warm.stdout.toString(), 'ok\n');
    assert.ok(tagged(warm.stderr, 'timing').some((line) => /restored from snapshot/.test(line)), warm.stderr);
    await assertNothingLeft();
  });

  test('without -v neither appears', async () => {
    const [cold, warm] = await Promise.all([
      mvmctl(['exec', '--no-snapshot', '--', 'echo', 'ok'], env),
      mvmctl(['exec', '--', 'echo', 'ok'], env),
    ]);
    for (const result of [cold, warm]) {
      assert.equal(result.code, 0, result.stderr);
      assert.equal(result.stdout.toString(), 'ok\n');
      assert.equal(result.stderr, '', 'no [console], no [timing], nothing else');
    }
    await assertNothingLeft();
  });
});

// End to end: templates and snapshot restore with real QEMU, on the default image and on a tiny
// busybox root file system (fast). The Debian + python3 template lives in template-debian.test.ts.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { collect, isolatedEnv, mvmctl, startMvmctl, vmmPidsMentioning, waitForOutput } from './helpers.js';

const isolated = isolatedEnv();
const dataDir = mkdtempSync(join(tmpdir(), 'mvm-e2e-data-'));
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-tpl-'));
const env = { ...isolated.env, MVM_DATA_DIR: dataDir };
const templatesDir = join(dataDir, 'templates');
const vmsDir = join(isolated.stateDir, 'vms');

after(() => {
  isolated.cleanup();
  rmSync(dataDir, { recursive: true, force: true });
  rmSync(work, { recursive: true, force: true });
});

async function assertNothingLeft(): Promise<void> {
  for (let i = 0; i < 50 && vmmPidsMentioning(isolated.stateDir).length > 0; i++) await sleep(100);
  assert.deepEqual(vmmPidsMentioning(isolated.stateDir), [], 'no VMM process may outlive its run');
  assert.deepEqual(existsSync(vmsDir) ? readdirSync(vmsDir) : [], [], 'no state dir may outlive its run');
}

const restored = (stderr: string) => /\[timing\] restored from snapshot/.test(stderr);

function snapshotDir(name: string): string {
  return join(templatesDir, name, 'snapshot');
}

/** A root file system with nothing but a static busybox and a file of ours. */
function tinyRootfs(dir: string): void {
  mkdirSync(join(dir, 'bin'), { recursive: true });
  mkdirSync(join(dir, 'etc'));
  copyFileSync('/bin/busybox', join(dir, 'bin', 'busybox'));
  for (const applet of ['sh', 'cat', 'ls', 'echo', 'head', 'od', 'sleep', 'mount']) symlinkSync('busybox', join(dir, 'bin', applet));
  writeFileSync(join(dir, 'etc', 'motd'), 'hello from the tiny rootfs\n');
}

function listing(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string, rel: string) => {
    for (const name of readdirSync(d).sort()) {
      const st = statSync(join(d, name), { throwIfNoEntry: false });
      out.push(`${rel}${name} ${st?.mode} ${st?.size} ${st?.mtimeMs}`);
      if (st?.isDirectory()) walk(join(d, name), `${rel}${name}/`);
    }
  };
  walk(dir, '');
  return out;
}

describe('mvmctl template + exec --manifest (default image)', () => {
  before(async () => {
    const image = await mvmctl(['image', 'build'], env);
    assert.equal(image.code, 0, image.stderr);
    const built = await mvmctl(['template', 'build', 'def', '--snapshot'], env);
    assert.equal(built.code, 0, built.stderr);
  });

  test('template ls / info show the template and its snapshot', async () => {
    const ls = await mvmctl(['template', 'ls', '--json'], env);
    assert.equal(ls.code, 0, ls.stderr);
    const list = JSON.parse(ls.stdout.toString()) as Array<{ name: string; snapshot: { state: string } | null; cpus: number; memoryMiB: number }>;
    assert.equal(list.length, 1);
    assert.equal(list[0].name, 'def');
    assert.equal(list[0].snapshot?.state, 'present');
    assert.equal(list[0].cpus, 2);
    assert.equal(list[0].memoryMiB, 512);
    const info = await mvmctl(['template', 'info', 'def'], env);
    assert.equal(info.code, 0, info.stderr);
    assert.match(info.stdout.toString(), /snapshot: +taken .* with (QEMU|Firecracker)/);
    // Only the published template and the version it points to: no build debris.
    assert.deepEqual(readdirSync(templatesDir).sort(), [readlinkSync(join(templatesDir, 'def')), 'def'].sort());
  });

  test('exec --manifest restores from the snapshot (-v says so) and gives what a cold boot gives', async () => {
    const command = ['sh', '-c', 'uname -a; echo to-err >&2; cat /proc/cmdline | grep -c mvm.agent; exit 3'];
    const warm = await mvmctl(['exec', '-v', '--manifest', 'def', '--', ...command], env);
    assert.equal(warm.code, 3, warm.stderr);
    assert.ok(restored(warm.stderr), warm.stderr);
    const cold = await mvmctl(['exec', '-v', '--no-snapshot', '--manifest', 'def', '--', ...command], env);
    assert.equal(cold.code, 3, cold.stderr);
    assert.ok(!restored(cold.stderr), cold.stderr);
    assert.match(cold.stderr, /snapshot not used: --no-snapshot/);
    assert.equal(warm.stdout.toString(), cold.stdout.toString());
    assert.match(warm.stdout.toString(), /^Linux mvm .*-micro/);
    // Without -v: nothing on stderr but the command's own.
    const quiet = await mvmctl(['exec', '--manifest', 'def', '--', ...command], env);
    assert.equal(quiet.stderr, 'to-err\n');
    await assertNothingLeft();
  });

  test('the restored guest clock is the host’s, and two restores read different /dev/urandom bytes', async () => {
    const read = ['sh', '-c', 'date +%s; head -c 32 /dev/urandom | od -An -tx1 | tr -d " \\n"'];
    const a = await mvmctl(['exec', '-v', '--manifest', 'def', '--', ...read], env);
    const b = await mvmctl(['exec', '-v', '--manifest', 'def', '--', ...read], env);
    for (const r of [a, b]) {
      assert.equal(r.code, 0, r.stderr);
      assert.ok(restored(r.stderr), r.stderr);
    }
    const [timeA, bytesA] = a.stdout.toString().split('\n');
    const [, bytesB] = b.stdout.toString().split('\n');
    assert.ok(Math.abs(Number(timeA) - Date.now() / 1000) < 30, `guest time ${timeA} vs host ${Date.now() / 1000}`);
    assert.match(bytesA, /^[0-9a-f]{64}$/);
    assert.notEqual(bytesA, bytesB, 'clones of one snapshot must not share RNG state');
  });

  test('4 concurrent restores from one snapshot', async () => {
    const before = readFileSync(join(snapshotDir('def'), 'snapshot.json'), 'utf8');
    const ramBefore = statSync(join(snapshotDir('def'), 'ram')).mtimeMs;
    const runs = await Promise.all(
      [0, 1, 2, 3].map((i) => mvmctl(['exec', '-v', '--manifest', 'def', '--', 'sh', '-c', `echo run-${i}; head -c 16 /dev/urandom | od -An -tx1`], env)),
    );
    const randoms = new Set<string>();
    runs.forEach((r, i) => {
      assert.equal(r.code, 0, r.stderr);
      assert.ok(restored(r.stderr), r.stderr);
      const [line, random] = r.stdout.toString().split('\n');
      assert.equal(line, `run-${i}`);
      randoms.add(random);
    });
    assert.equal(randoms.size, 4);
    // Restores never write the snapshot.
    assert.equal(statSync(join(snapshotDir('def'), 'ram')).mtimeMs, ramBefore);
    assert.equal(readFileSync(join(snapshotDir('def'), 'snapshot.json'), 'utf8'), before);
    await assertNothingLeft();
  });

  test('a damaged snapshot gives one warning line and a cold boot; the command still runs', async () => {
    const state = join(snapshotDir('def'), 'state');
    const original = readFileSync(state);
    const reference = join(work, 'state-times');
    assert.equal(spawnSync('cp', ['--preserve=timestamps', state, reference]).status, 0);
    try {
      // Same inode, size and mtime (to the nanosecond), different bytes: the per-run check cannot
      // tell (it does not rehash), so QEMU's load of the state fails and the run boots cold.
      const damaged = Buffer.from(original);
      damaged.fill(0x5a, 100, 4000);
      writeFileSync(state, damaged);
      assert.equal(spawnSync('touch', ['-r', reference, state]).status, 0);
      const r = await mvmctl(['exec', '--manifest', 'def', '--', 'echo', 'still runs'], env);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.toString(), 'still runs\n');
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.match(lines[0], /^mvmctl: template def: restoring the snapshot failed \(.*\); booting cold instead$/);
      // The full check finds it.
      const verify = await mvmctl(['template', 'info', 'def', '--verify'], env);
      assert.equal(verify.code, 1);
      assert.match(verify.stdout.toString(), /^verify: .*state: checksum mismatch/m);
    } finally {
      writeFileSync(state, original);
      spawnSync('touch', ['-r', reference, state]);
    }
    // Missing RAM file.
    const ram = join(snapshotDir('def'), 'ram');
    const moved = `${ram}.away`;
    spawnSync('mv', [ram, moved]);
    try {
      const r = await mvmctl(['exec', '--manifest', 'def', '--', 'echo', 'ok'], env);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.toString(), 'ok\n');
      assert.match(r.stderr, /^mvmctl: template def: not using its snapshot \(ram is missing\)/);
      assert.equal(r.stderr.trim().split('\n').length, 1);
    } finally {
      spawnSync('mv', [moved, ram]);
    }
    await assertNothingLeft();
  });

  test('a snapshot QEMU cannot load (checksums made to match) fails over to a cold boot with one warning', async () => {
    const dir = snapshotDir('def');
    const state = join(dir, 'state');
    const metaPath = join(dir, 'snapshot.json');
    const original = readFileSync(state);
    const originalMeta = readFileSync(metaPath, 'utf8');
    try {
      writeFileSync(state, Buffer.from('QEVM garbage that is no migration stream'));
      const meta = JSON.parse(originalMeta);
      const sum = spawnSync('sha256sum', [state]).stdout.toString().split(' ')[0];
      meta.files.state = { ...meta.files.state, size: statSync(state).size, mtimeMs: statSync(state).mtimeMs, sha256: sum };
      writeFileSync(metaPath, JSON.stringify(meta));
      const r = await mvmctl(['exec', '--manifest', 'def', '--', 'echo', 'cold but fine'], env);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.toString(), 'cold but fine\n');
      assert.match(r.stderr, /^mvmctl: template def: restoring the snapshot failed \(.*\); booting cold instead\n$/);
    } finally {
      writeFileSync(state, original);
      writeFileSync(metaPath, originalMeta);
    }
    await assertNothingLeft();
  });

  test('template snapshot retakes the snapshot; exec with other --cpus boots cold (noted with -v)', async () => {
    const old = readdirSync(join(templatesDir, 'def')).filter((e) => e.startsWith('snap-'));
    const r = await mvmctl(['template', 'snapshot', 'def'], env);
    assert.equal(r.code, 0, r.stderr);
    const now = readdirSync(join(templatesDir, 'def')).filter((e) => e.startsWith('snap-'));
    assert.equal(now.length, 1);
    assert.notDeepEqual(now, old);
    const other = await mvmctl(['exec', '-v', '--cpus', '1', '--manifest', 'def', '--', 'true'], env);
    assert.equal(other.code, 0, other.stderr);
    assert.ok(!restored(other.stderr));
    assert.match(other.stderr, /snapshot not used: it was taken with 2 CPUs/);
  });

  test('unknown template: exit 125, and the message lists the templates there are', async () => {
    const r = await mvmctl(['exec', '--manifest', 'nope', '--', 'true'], env);
    assert.equal(r.code, 125);
    assert.equal(r.stderr, "mvmctl: no template named 'nope' (templates: def)\n");
  });

  test('-m and --template also take a template directory (its NAME symlink, or a version directory by a ./ path); another directory: one line, 125', async () => {
    const link = join(templatesDir, 'def');
    const version = `./${relative(process.cwd(), join(templatesDir, readlinkSync(link)))}`;
    for (const flags of [['-m', link], ['--template', version]]) {
      const r = await mvmctl(['exec', '-v', ...flags, '--', 'echo', 'hi'], env);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.toString(), 'hi\n');
      assert.ok(restored(r.stderr), r.stderr);
    }
    const notTemplate = await mvmctl(['exec', '-m', work, '--', 'true'], env);
    assert.equal(notTemplate.code, 125);
    assert.match(notTemplate.stderr, /^mvmctl: \S+ is not a template directory: [^\n]+\n$/);
    await assertNothingLeft();
  });
});

describe('templates with a root file system (tiny busybox tree)', () => {
  const rootfs = join(work, 'tiny');
  before(() => tinyRootfs(rootfs));

  test('--rootfs-dir: commands see the tree as /, writes are thrown away, the tree is left as it was', async () => {
    const before = listing(rootfs);
    const built = await mvmctl(['template', 'build', 'tiny', '--rootfs-dir', rootfs, '--disk-free', '64M', '--snapshot'], env);
    assert.equal(built.code, 0, built.stderr);
    assert.deepEqual(listing(rootfs), before, 'the user’s tree must not change');

    const first = await mvmctl(['exec', '-v', '--manifest', 'tiny', '--', 'sh', '-c', 'cat /etc/motd; echo changed > /etc/motd; cat /etc/motd; ls /'], env);
    assert.equal(first.code, 0, first.stderr);
    assert.ok(restored(first.stderr), first.stderr);
    assert.equal(first.stdout.toString(), 'hello from the tiny rootfs\nchanged\nbin\ndev\netc\nproc\nrun\nsys\ntmp\n');
    // Restored and cold runs side by side share the root image (and the snapshot's disk).
    const runs = await Promise.all(
      [[], [], ['--no-snapshot']].map((flags) => mvmctl(['exec', ...flags, '--manifest', 'tiny', '--', 'cat', '/etc/motd'], env)),
    );
    for (const again of runs) {
      assert.equal(again.code, 0, again.stderr);
      assert.equal(again.stdout.toString(), 'hello from the tiny rootfs\n', 'each run starts from the template');
    }
    await assertNothingLeft();
  });

  test('--net user as the template default: exec gives a NIC and the resolver over the tree\'s resolv.conf; --net none overrides it', async () => {
    const netRoot = join(work, 'tiny-net');
    tinyRootfs(netRoot);
    writeFileSync(join(netRoot, 'etc', 'resolv.conf'), 'nameserver 192.0.2.1\n');
    const built = await mvmctl(['template', 'build', 'tinynet', '--rootfs-dir', netRoot, '--disk-free', '64M', '--net', 'user'], env);
    assert.equal(built.code, 0, built.stderr);
    const info = await mvmctl(['template', 'info', 'tinynet'], env);
    assert.match(info.stdout.toString(), /defaults: .*network user/);
    // Under the Firecracker double a NIC needs a TAP name the backend finds; the double never opens it.
    const netEnv = { ...env, MVM_FIRECRACKER_TAP: 'lo' };
    const withNic = await mvmctl(['exec', '--manifest', 'tinynet', '--', 'sh', '-c', 'ls /sys/class/net; cat /etc/resolv.conf'], netEnv);
    assert.equal(withNic.code, 0, withNic.stderr);
    assert.match(withNic.stdout.toString(), /^eth0\nlo\n(#.*\n)?nameserver 10\.0\.2\.3\n$/);
    const without = await mvmctl(['exec', '--manifest', 'tinynet', '--net', 'none', '--', 'sh', '-c', 'ls /sys/class/net; cat /etc/resolv.conf'], netEnv);
    assert.equal(without.code, 0, without.stderr);
    assert.equal(without.stdout.toString(), 'lo\nnameserver 192.0.2.1\n');
    assert.equal(readFileSync(join(netRoot, 'etc', 'resolv.conf'), 'utf8'), 'nameserver 192.0.2.1\n', 'the user\'s tree is not written');
    assert.equal((await mvmctl(['template', 'rm', 'tinynet'], env)).code, 0);
    await assertNothingLeft();
  });

  test('--add-dir with a template restores into a drive slot after its root drive, and mounts the directory', async () => {
    const host = join(work, 'share');
    mkdirSync(host);
    writeFileSync(join(host, 'data.txt'), 'shared\n');
    const r = await mvmctl(['exec', '-v', '--manifest', 'tiny', '--add-dir', `${host}:/host`, '--', 'cat', '/host/data.txt'], env);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.toString(), 'shared\n');
    if (process.env.MVM_BACKEND === 'firecracker') {
      // A restored Firecracker drive keeps the captured VM's writable flag: a read-only directory boots cold.
      assert.match(r.stderr, /snapshot not used: the firecracker backend cannot attach --add-dir .* read-only to a restored VM/);
      const rw = await mvmctl(['exec', '-v', '--manifest', 'tiny', '--add-dir', `${host}:/host:rw`, '--', 'cat', '/host/data.txt'], env);
      assert.equal(rw.stdout.toString(), 'shared\n', rw.stderr);
      assert.ok(restored(rw.stderr), rw.stderr);
    } else {
      assert.ok(restored(r.stderr), r.stderr);
    }
    const cold = await mvmctl(['exec', '-v', '--no-snapshot', '--manifest', 'tiny', '--add-dir', `${host}:/host`, '--', 'cat', '/host/data.txt'], env);
    assert.equal(cold.stdout.toString(), 'shared\n');
    assert.ok(!restored(cold.stderr));
  });

  test('--rootfs-tar, and a tree using the reserved /.mvm is refused without touching the old template', async () => {
    const tar = join(work, 'tiny.tar');
    assert.equal(spawnSync('tar', ['-c', '-f', tar, '-C', rootfs, '.']).status, 0);
    const built = await mvmctl(['template', 'build', 'fromtar', '--rootfs-tar', tar, '--disk-free', '64M'], env);
    assert.equal(built.code, 0, built.stderr);
    const r = await mvmctl(['exec', '--manifest', 'fromtar', '--', 'cat', '/etc/motd'], env);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout.toString(), 'hello from the tiny rootfs\n');

    const entriesBefore = readdirSync(templatesDir).sort();
    const infoBefore = (await mvmctl(['template', 'info', '--json', 'tiny'], env)).stdout.toString();
    const bad = join(work, 'bad');
    tinyRootfs(bad);
    mkdirSync(join(bad, '.mvm'));
    const refused = await mvmctl(['template', 'build', 'tiny', '--rootfs-dir', bad], env);
    assert.equal(refused.code, 125);
    assert.match(refused.stderr, /reserves/);
    assert.deepEqual(readdirSync(templatesDir).sort(), entriesBefore, 'a failed build leaves no debris');
    assert.equal((await mvmctl(['template', 'info', '--json', 'tiny'], env)).stdout.toString(), infoBefore);
  });

  test('template rm is refused while a VM runs from the template, and works after', async () => {
    const child = startMvmctl(['exec', '--manifest', 'tiny', '--', 'sh', '-c', 'echo started; sleep 6; echo done'], env);
    const done = collect(child);
    await waitForOutput(child, 'started');
    const refused = await mvmctl(['template', 'rm', 'tiny'], env);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /template 'tiny' is in use by exec-/);
    const finished = await done;
    assert.equal(finished.code, 0, finished.stderr);
    assert.equal(finished.stdout.toString(), 'started\ndone\n');
    const removed = await mvmctl(['template', 'rm', 'tiny'], env);
    assert.equal(removed.code, 0, removed.stderr);
    const ls = JSON.parse((await mvmctl(['template', 'ls', '--json'], env)).stdout.toString()) as Array<{ name: string }>;
    assert.deepEqual(ls.map((t) => t.name), ['def', 'fromtar']);
    assert.ok(!readdirSync(templatesDir).some((e) => e.startsWith('.tiny.')), 'its files are gone');
    await assertNothingLeft();
  });
});

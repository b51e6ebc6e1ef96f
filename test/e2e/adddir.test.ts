// `--add-dir` end to end: host directories in a real VM, and what comes back to the host.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  existsSync, lstatSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, describe, test } from 'node:test';
import { treeDigest } from '../../src/dirsync/index.js';
import { collect, dirMaker, isolatedEnv, mvmctl, startMvmctl, waitForOutput } from './helpers.js';

const { env, stateDir, cleanup } = isolatedEnv();
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-adddir-'));
after(() => {
  cleanup();
  rmSync(work, { recursive: true, force: true });
});

const freshDir = dirMaker(work);

function vmDirs(): string[] {
  const dir = join(stateDir, 'vms');
  return existsSync(dir) ? readdirSync(dir) : [];
}

/** `path mode [-> target | sha256]` for every entry, as the guest's `manifest` shell function prints it. */
function hostManifest(root: string): string[] {
  const lines: string[] = [];
  const walk = (dir: string) => {
    for (const name of readdirSync(dir).sort()) {
      const path = join(dir, name);
      const stat = lstatSync(path);
      const rel = `./${relative(root, path)}`;
      const mode = (stat.mode & 0o7777).toString(8);
      if (stat.isSymbolicLink()) lines.push(`${rel} link ${readlinkSync(path)}`);
      else if (stat.isDirectory()) {
        lines.push(`${rel} dir ${mode}`);
        walk(path);
      } else lines.push(`${rel} file ${mode} ${createHash('sha256').update(readFileSync(path)).digest('hex')}`);
    }
  };
  walk(root);
  return lines.sort();
}

// The same listing made inside the guest with busybox, printed after the command's changes.
const GUEST_MANIFEST = `find . -mindepth 1 | sort | while read -r p; do
  if [ -L "$p" ]; then echo "$p link $(readlink "$p")";
  elif [ -d "$p" ]; then echo "$p dir $(stat -c %a "$p")";
  else echo "$p file $(stat -c %a "$p") $(sha256sum < "$p" | cut -d' ' -f1)"; fi
done`;

describe('mvmctl exec --add-dir', () => {
  test('spec example: a read-only host directory is visible in the guest', async () => {
    const dir = freshDir();
    writeFileSync(join(dir, 'foo'), 'hello\n');
    const result = await mvmctl(['exec', '--add-dir', `${dir}:/host`, '--', 'cat', '/host/foo'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'hello\n');
  });

  test('spec example: a rw directory brings the guest’s output back; two modes in one run', async () => {
    const out = freshDir();
    const ro = freshDir({ 'input.txt': 'in\n' });
    const result = await mvmctl(
      ['exec', '--add-dir', `${out}:/work:rw`, '--add-dir', `${ro}:/in:ro`, '--', 'sh', '-c', 'echo result > /work/output.txt; cat /in/input.txt'],
      env,
    );
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'in\n');
    assert.equal(readFileSync(join(out, 'output.txt'), 'utf8'), 'result\n');
    assert.deepEqual(readdirSync(ro), ['input.txt']);
  });

  test('-d: HOST ends at the first colon, so GUEST paths may hold colons; the mode is read from a final :ro/:rw', async () => {
    const ro = freshDir({ foo: 'from ro\n' });
    const rw = freshDir();
    const result = await mvmctl(['exec', '-d', `${ro}:/data:v1`, '-d', `${rw}:/a:b:rw`, '--', 'sh', '-c', 'cat /data:v1/foo; echo new > /a:b/out; touch /data:v1/x 2>/dev/null || echo ro'], env);
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), 'from ro\nro\n');
    assert.equal(readFileSync(join(rw, 'out'), 'utf8'), 'new\n');
  });

  test('ro is enforced by the block device: root cannot write, even after remount', async () => {
    const dir = freshDir({ 'keep.txt': 'original\n' });
    const before = treeDigest(dir);
    const result = await mvmctl(
      ['exec', '--add-dir', `${dir}:/data`, '--', 'sh', '-c',
        'echo x > /data/keep.txt && echo WROTE; mount -o remount,rw /data && echo REMOUNTED; echo y > /data/new && echo WROTE2; id -u'],
      env,
    );
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.toString(), '0\n', 'every write failed, as root');
    assert.equal(treeDigest(dir), before);
  });

  test('rw: create, modify, delete, rename, chmod, symlink, hardlink, deep trees, 1000 files, 100 MB: host matches the guest', async () => {
    const dir = freshDir({ 'modify.txt': 'old\n', 'delete.txt': 'bye\n', 'rename-me.txt': 'r\n', 'chmod.sh': 'echo\n', 'sub/keep.txt': 'k\n' });
    const script = [
      'cd /work',
      'echo new > created.txt',
      'echo changed >> modify.txt',
      'rm delete.txt',
      'mv rename-me.txt renamed.txt',
      'chmod 751 chmod.sh',
      'ln -s sub/keep.txt link-to-keep',
      'ln created.txt hardlink.txt',
      'mkdir -p deep/a/b/c/d/e/f/g && echo deep > deep/a/b/c/d/e/f/g/leaf',
      'mkdir many && i=0; while [ $i -lt 1000 ]; do echo $i > many/f$i; i=$((i+1)); done',
      'head -c 100000000 /dev/urandom > big.bin',
      'mkdir empty-dir',
      GUEST_MANIFEST,
    ].join('\n');
    const result = await mvmctl(['exec', '--timeout', '300', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', script], env);
    assert.equal(result.code, 0, result.stderr);
    const guest = result.stdout.toString().trim().split('\n').sort();
    assert.deepEqual(hostManifest(dir), guest);
    assert.equal(statSync(join(dir, 'created.txt')).ino, statSync(join(dir, 'hardlink.txt')).ino, 'hardlink kept');
    assert.equal(statSync(join(dir, 'big.bin')).size, 100_000_000);
    assert.equal(statSync(join(dir, 'created.txt')).uid, process.getuid!(), 'files belong to the invoking user');
  });

  test('rw with a non-zero exit is still synced back', async () => {
    const dir = freshDir();
    const result = await mvmctl(['exec', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', 'echo partial > /work/out; exit 3'], env);
    assert.equal(result.code, 3, result.stderr);
    assert.equal(readFileSync(join(dir, 'out'), 'utf8'), 'partial\n');
  });

  test('rw with --timeout expiry: host byte-identical, one line says changes were discarded', async () => {
    const dir = freshDir({ 'a.txt': 'a\n', 'sub/b.txt': 'b\n' });
    const before = treeDigest(dir);
    const result = await mvmctl(
      ['exec', '--timeout', '2', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', 'rm /work/a.txt; echo x > /work/new; sleep 100'],
      env,
    );
    assert.equal(result.code, 124, result.stderr);
    assert.match(result.stderr, /discarded/);
    assert.equal(treeDigest(dir), before);
    assert.deepEqual(vmDirs(), []);
  });

  test('rw with SIGINT: host byte-identical, nothing left behind', async () => {
    const dir = freshDir({ 'a.txt': 'a\n' });
    const before = treeDigest(dir);
    const child = startMvmctl(['exec', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', 'rm /work/a.txt; echo ready; sleep 100'], env);
    const done = collect(child);
    await waitForOutput(child, 'ready');
    child.kill('SIGINT');
    const result = await done;
    assert.equal(result.code, 130, result.stderr);
    assert.match(result.stderr, /discarded/);
    assert.equal(treeDigest(dir), before);
    assert.deepEqual(vmDirs(), []);
  });

  test('a hostile guest gets nothing outside HOST and nothing privileged', async () => {
    const dir = freshDir({ 'data.txt': 'd\n' });
    const outside = join(work, 'outside');
    mkdirSync(outside);
    symlinkSync(outside, join(work, 'outside-link'));
    const script = [
      'cd /work',
      'cp /bin/busybox suid && chmod 4755 suid',
      'echo x > sgid && chmod 2755 sgid',
      'mknod dev-null c 1 3',
      'mkfifo fifo',
      // The links' targets exist in the guest too, so writing through them works there: the host
      // must bring back the links as links and write nothing through them.
      `ln -s /etc etc-link && echo pwned > etc-link/pwned-by-guest-${process.pid}`,
      `mkdir -p ${outside} && ln -s ${outside} escape && touch escape/only-in-guest && ls escape >/dev/null`,
      `ln -s /etc/passwd passwd`,
    ].join('; ');
    const result = await mvmctl(['exec', '--add-dir', `${dir}:/work:rw`, '--', 'sh', '-c', script], env);
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stderr, /dev-null/, 'skipped device nodes are reported');
    assert.ok(!existsSync(`/etc/pwned-by-guest-${process.pid}`));
    assert.deepEqual(readdirSync(outside), []);
    assert.equal(readlinkSync(join(dir, 'escape')), outside, 'symlinks come back as symlinks, never followed');
    assert.equal(readlinkSync(join(dir, 'etc-link')), '/etc');
    assert.equal(statSync(join(dir, 'suid')).mode & 0o6000, 0, 'no setuid bit');
    assert.equal(statSync(join(dir, 'sgid')).mode & 0o6000, 0, 'no setgid bit');
    assert.ok(!existsSync(join(dir, 'dev-null')));
    assert.ok(!existsSync(join(dir, 'fifo')));
    assert.equal(readFileSync(join(dir, 'data.txt'), 'utf8'), 'd\n');
  });

  test('bad --add-dir specs: one line, exit 125, no VM started', async () => {
    const dir = freshDir({ 'file.txt': 'f' });
    const specs = [
      `${join(work, 'does-not-exist')}:/x`,
      `${join(dir, 'file.txt')}:/x`,
      `${dir}:relative`,
      `${dir}:/`,
      `${dir}:/proc`,
      `${dir}:/sys/kernel`,
      `${dir}:/dev`,
      `${dir}:/x:`,
      `${dir}`,
    ];
    for (const spec of specs) {
      const result = await mvmctl(['exec', '--add-dir', spec, '--', 'true'], env);
      assert.equal(result.code, 125, `${spec}: ${result.stderr}`);
      assert.match(result.stderr, /^mvmctl: [^\n]+\n$/, spec);
      assert.deepEqual(vmDirs(), []);
    }
    const duplicate = await mvmctl(['exec', '--add-dir', `${dir}:/same`, '--add-dir', `${work}:/same:rw`, '--', 'true'], env);
    assert.equal(duplicate.code, 125, duplicate.stderr);
    assert.match(duplicate.stderr, /^mvmctl: [^\n]*\/same[^\n]*\n$/);
  });
});

// `-u/--user` end to end: the command's ids and HOME in a real guest, a -w directory made as root,
// and --add-dir trees, whose owners in the guest are the host's numeric ids (as a bind mount's are).
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { assertNoVmLeft, dirMaker, isolatedEnv, mvmctl } from './helpers.js';

const { env, stateDir, cleanup } = isolatedEnv();
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-user-'));
const freshDir = dirMaker(work);
after(async () => {
  await mvmctl(['down', '--all'], env);
  cleanup();
  rmSync(work, { recursive: true, force: true });
});

const hostUid = process.getuid!();

describe('exec -u', () => {
  test('runs the command with that uid and gid; HOME is / for a user the guest does not know', async () => {
    const run = await mvmctl(['exec', '-u', '1000:1001', '--', 'sh', '-c', 'id -u; id -g; id -G; echo "$HOME"'], env);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.toString(), '1000\n1001\n1001\n/\n');
  });

  test('without a GID, the uid has no passwd entry: its own number, not root group 0', async () => {
    const run = await mvmctl(['exec', '-u', '4242', '--', 'sh', '-c', 'id -g'], env);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.toString(), '4242\n');
  });

  test('-u 0 is root, with root\'s HOME from /etc/passwd', async () => {
    const run = await mvmctl(['exec', '-u', '0', '--', 'sh', '-c', 'id -u; id -g; echo "$HOME"'], env);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.toString(), '0\n0\n/root\n');
  });

  test('-w is created as root, as a container WORKDIR is; the user runs in it but cannot write there', async () => {
    const run = await mvmctl(['exec', '-u', '1000', '-w', '/made/here', '--', 'sh', '-c', 'pwd; stat -c %u /made/here; touch x'], env);
    assert.equal(run.code, 1, run.stderr);
    assert.equal(run.stdout.toString(), '/made/here\n0\n');
    assert.match(run.stderr, /Permission denied/);
  });

  test('with -t, the terminal is the command\'s even after it has given up root', async () => {
    const run = await mvmctl(['exec', '-t', '-u', '1000', '--', 'sh', '-c', 'id -u; tty; echo err >&2'], env);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout.toString(), /^1000\r\n\/dev\/pts\/\d+\r\nerr\r\n$/);
  });

  test('a name or a junk id is one usage line and exit 125, before any VM', async () => {
    for (const bad of ['nobody', '1000:', '-1', '4294967295']) {
      const run = await mvmctl(['exec', '-u', bad, '--', 'true'], env);
      assert.equal(run.code, 125, `${bad}: ${run.stderr}`);
      assert.equal(run.stderr.trim().split('\n').length, 1, run.stderr);
      assert.match(run.stderr, /-u, --user/);
    }
    await assertNoVmLeft(stateDir);
  });
});

describe('exec -u with --add-dir', () => {
  test('a ro tree is readable by the user; a rw tree owned by another host user cannot be written, and nothing changes on the host', async () => {
    const dir = freshDir({ 'a.txt': 'a\n' });
    const ro = await mvmctl(['exec', '-u', '1000', '-d', `${dir}:/data:ro`, '--', 'sh', '-c', 'stat -c %u /data/a.txt; cat /data/a.txt'], env);
    assert.equal(ro.code, 0, ro.stderr);
    assert.equal(ro.stdout.toString(), `${hostUid}\na\n`);

    if (hostUid === 1000) return; // the guest user would own the tree
    const rw = await mvmctl(['exec', '-u', '1000', '-d', `${dir}:/data:rw`, '--', 'sh', '-c', 'echo new > /data/new.txt'], env);
    assert.equal(rw.code, 1, rw.stderr);
    assert.match(rw.stderr, /Permission denied/);
    assert.deepEqual(readdirSync(dir), ['a.txt']);
  });

  test('a rw tree the host opened to everyone: what the user writes comes back, owned by whoever ran mvmctl', async () => {
    const dir = freshDir({ 'a.txt': 'a\n' });
    chmodSync(dir, 0o777);
    const run = await mvmctl(['exec', '-u', '1000', '-d', `${dir}:/data:rw`, '--', 'sh', '-c', 'echo new > /data/new.txt; stat -c %u /data/new.txt'], env);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.toString(), '1000\n');
    assert.equal(readFileSync(join(dir, 'new.txt'), 'utf8'), 'new\n');
    assert.equal(statSync(join(dir, 'new.txt')).uid, hostUid);
  });
});

describe('console -u', () => {
  test('runs a command in an up VM as the user, and the next one as root again', async () => {
    const up = await mvmctl(['up', '--name', 'asuser'], env);
    assert.equal(up.code, 0, up.stderr);
    const asUser = await mvmctl(['console', 'asuser', '-u', '1000:1000', '--', 'id', '-u'], env);
    assert.equal(asUser.code, 0, asUser.stderr);
    assert.equal(asUser.stdout.toString(), '1000\n');
    const asRoot = await mvmctl(['console', 'asuser', '--', 'id', '-u'], env);
    assert.equal(asRoot.stdout.toString(), '0\n');
    assert.equal((await mvmctl(['down', 'asuser'], env)).code, 0);
    assert.ok(!existsSync(join(stateDir, 'vms', 'asuser')));
  });
});

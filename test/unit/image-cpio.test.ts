import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { lstat, mkdtemp, readFile, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';

import { parseCpio, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, writeCpio, type CpioEntry } from '../../src/image/cpio.js';
import { buildInitramfs, GUEST_AGENT_PATH, initramfsEntries, INITTAB, REQUIRED_APPLETS } from '../../src/image/initramfs.js';

const hasCpio = spawnSync('cpio', ['--version']).status === 0;

const SAMPLE: CpioEntry[] = [
  { type: 'file', path: 'etc/motd', data: Buffer.from('hello\n'), mode: 0o644 },
  { type: 'dir', path: 'etc', mode: 0o755 },
  { type: 'dir', path: '/tmp', mode: 0o1777 },
  { type: 'symlink', path: 'bin/sh', target: '/bin/busybox' },
  { type: 'dir', path: 'bin' },
  { type: 'file', path: 'bin/busybox', data: Buffer.from('\x7fELF fake, odd length'), mode: 0o755 },
  { type: 'char', path: 'dev/console', major: 5, minor: 1, mode: 0o600 },
  { type: 'char', path: 'dev/null', major: 1, minor: 3, mode: 0o666 },
  { type: 'dir', path: 'dev' },
];

describe('cpio newc writer', () => {
  it('round-trips through the parser, sorted, with fixed mtimes', () => {
    const archive = writeCpio(SAMPLE, { mtime: 42 });
    const records = parseCpio(archive);
    assert.deepEqual(
      records.map((r) => r.path),
      ['bin', 'bin/busybox', 'bin/sh', 'dev', 'dev/console', 'dev/null', 'etc', 'etc/motd', 'tmp'],
    );
    const byPath = new Map(records.map((r) => [r.path, r]));
    assert.equal(byPath.get('tmp')!.mode, S_IFDIR | 0o1777);
    assert.equal(byPath.get('bin/busybox')!.mode, S_IFREG | 0o755);
    assert.equal(byPath.get('bin/busybox')!.data.toString(), '\x7fELF fake, odd length');
    assert.equal(byPath.get('bin/sh')!.mode & S_IFMT, S_IFLNK);
    assert.equal(byPath.get('bin/sh')!.data.toString(), '/bin/busybox');
    assert.equal(byPath.get('dev/console')!.mode, S_IFCHR | 0o600);
    assert.deepEqual([byPath.get('dev/console')!.rdevmajor, byPath.get('dev/console')!.rdevminor], [5, 1]);
    assert.deepEqual([byPath.get('dev/null')!.rdevmajor, byPath.get('dev/null')!.rdevminor], [1, 3]);
    assert.ok(records.every((r) => r.mtime === 42 && r.uid === 0 && r.gid === 0));
    assert.equal(new Set(records.map((r) => r.ino)).size, records.length, 'distinct inode numbers');
    // Every header and every data block starts 4-byte aligned; the archive ends with the trailer.
    assert.equal(archive.length % 4, 0);
    assert.match(archive.subarray(archive.length - 140).toString('latin1'), /TRAILER!!!\0/);
  });

  it('is deterministic regardless of input order', () => {
    const a = writeCpio(SAMPLE);
    const b = writeCpio([...SAMPLE].reverse());
    assert.ok(a.equals(b));
  });

  it('rejects duplicates and unsafe paths', () => {
    assert.throws(() => writeCpio([{ type: 'dir', path: 'a' }, { type: 'dir', path: '/a/' }]), /duplicate path a/);
    assert.throws(() => writeCpio([{ type: 'dir', path: 'a/../b' }]), /'\.\.'/);
    assert.throws(() => writeCpio([{ type: 'dir', path: '/' }]), /empty path/);
  });

  it('rejects malformed archives', () => {
    const archive = writeCpio(SAMPLE);
    assert.throws(() => parseCpio(archive.subarray(0, 200)), /truncated/);
    const bad = Buffer.from(archive);
    bad.write('070707', 0, 'ascii');
    assert.throws(() => parseCpio(bad), /bad magic/);
  });

  it('is read by GNU cpio: modes, symlinks and device nodes as written', { skip: !hasCpio && 'cpio not installed' }, async () => {
    const dir = await mkdtemp(join(tmpdir(), 'mvm-cpio-'));
    try {
      const file = join(dir, 'a.cpio');
      await writeFile(file, writeCpio(SAMPLE));
      const listing = execFileSync('cpio', ['-tv', '-F', file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
      const line = (name: string): string => listing.split('\n').find((l) => l.endsWith(` ${name}`) || l.includes(` ${name} -> `))!;
      assert.match(line('dev/console'), /^crw-------\s.*\s5,\s+1\s/);
      assert.match(line('dev/null'), /^crw-rw-rw-\s.*\s1,\s+3\s/);
      assert.match(line('tmp'), /^drwxrwxrwt\s/);
      assert.match(line('bin/sh'), /^lrwxrwxrwx\s.*bin\/sh -> \/bin\/busybox$/);
      assert.match(line('bin/busybox'), /^-rwxr-xr-x\s/);

      // Extract (no device nodes: those need root or are skipped) and compare contents.
      const out = join(dir, 'out');
      execFileSync('sh', ['-c', `mkdir "${out}" && cd "${out}" && cpio -id --no-absolute-filenames --quiet -F "${file}" 'bin/*' 'etc/*' 'etc' 'bin' tmp`]);
      assert.equal(await readFile(join(out, 'etc/motd'), 'utf8'), 'hello\n');
      assert.equal(await readlink(join(out, 'bin/sh')), '/bin/busybox');
      assert.equal((await lstat(join(out, 'bin/busybox'))).mode & 0o777, 0o755);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('initramfs layout', () => {
  const applets = ['bin/busybox', 'linuxrc', 'sbin/init', 'sbin/reboot', ...REQUIRED_APPLETS.map((a) => `usr/bin/${a}`)];
  const inputs = { busybox: Buffer.from('BUSYBOX'), agent: Buffer.from('AGENT'), applets };

  it('has init, the agent, busybox init config, device nodes and every applet link', () => {
    const records = parseCpio(buildInitramfs(inputs));
    const byPath = new Map(records.map((r) => [r.path, r]));
    const link = (p: string): string | undefined => (byPath.get(p) && (byPath.get(p)!.mode & S_IFMT) === S_IFLNK ? byPath.get(p)!.data.toString() : undefined);
    assert.equal(byPath.get('bin/busybox')!.data.toString(), 'BUSYBOX');
    assert.equal(byPath.get('bin/busybox')!.mode, S_IFREG | 0o755);
    assert.equal(byPath.get(GUEST_AGENT_PATH.slice(1))!.data.toString(), 'AGENT');
    assert.equal(byPath.get(GUEST_AGENT_PATH.slice(1))!.mode, S_IFREG | 0o755);
    assert.equal(link('sbin/init'), '/bin/busybox');
    assert.equal(link('init'), '/sbin/init');
    for (const a of REQUIRED_APPLETS) assert.equal(link(`usr/bin/${a}`), '/bin/busybox', a);
    assert.equal(byPath.get('dev/console')!.mode, S_IFCHR | 0o600);
    assert.equal(byPath.get('dev/null')!.mode, S_IFCHR | 0o666);
    assert.equal(byPath.get('etc/inittab')!.data.toString(), INITTAB);
    assert.match(INITTAB, /^::once:\/bin\/busybox sh -c '\/sbin\/mvm-agent; exec \/bin\/busybox reboot -f'$/m);
    assert.match(byPath.get('etc/passwd')!.data.toString(), /^root:x:0:0:/);
    assert.match(byPath.get('etc/group')!.data.toString(), /^root:x:0:/);
    assert.equal(byPath.get('root')!.mode, S_IFDIR | 0o700);
    assert.equal(byPath.get('tmp')!.mode, S_IFDIR | 0o1777);
    // Every entry's parent directory comes before it.
    const seen = new Set<string>();
    for (const r of records) {
      const parent = r.path.split('/').slice(0, -1).join('/');
      if (parent) assert.ok(seen.has(parent), `${parent} before ${r.path}`);
      seen.add(r.path);
    }
  });

  it('is byte-for-byte stable for the same inputs', () => {
    assert.ok(buildInitramfs(inputs).equals(buildInitramfs({ ...inputs, applets: [...applets].reverse() })));
    assert.ok(!buildInitramfs(inputs).equals(buildInitramfs({ ...inputs, agent: Buffer.from('AGENT2') })));
  });

  it('names the applets a busybox lacks', () => {
    assert.throws(() => initramfsEntries({ ...inputs, applets: ['bin/sh', 'bin/mount'] }), /lacks applets: .*sha256sum/);
  });

  it('gzip output is a gzip stream of the same archive', async () => {
    const { gunzipSync } = await import('node:zlib');
    assert.ok(gunzipSync(buildInitramfs(inputs, 'gzip')).equals(buildInitramfs(inputs)));
  });
});

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, realpathSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { MvmError } from '../../src/errors.js';
import { parseAddDirSpec, resolveAddDir, splitAddDirSpec, validateAddDirs } from '../../src/dirsync/index.js';
import { showSpec } from '../../src/dirsync/spec.js';

const base = realpathSync(mkdtempSync(join(tmpdir(), 'dirsync-spec-')));
const dir = join(base, 'proj');
const colonDir = join(base, 'a:b');
mkdirSync(join(dir, 'sub'), { recursive: true });
mkdirSync(colonDir);
mkdirSync(join(base, 'ab'));
symlinkSync(dir, join(base, 'alias'));
writeFileSync(join(base, 'file'), 'x');
after(() => rmSync(base, { recursive: true, force: true }));

function rejects(spec: string, pattern: RegExp): void {
  assert.throws(
    () => parseAddDirSpec(spec, base),
    (err: unknown) => {
      assert.ok(err instanceof MvmError, `expected MvmError for ${spec}`);
      assert.equal(err.exitCode, 125);
      assert.ok(!err.message.includes('\n'), 'one line');
      assert.ok(err.message.includes(`'${showSpec(spec)}'`), `names the spec: ${err.message}`);
      assert.match(err.message, pattern);
      return true;
    },
  );
}

describe('parseAddDirSpec', () => {
  it('defaults to ro and resolves HOST relative to cwd', () => {
    assert.deepEqual(parseAddDirSpec('proj:/work', base), { spec: 'proj:/work', hostPath: dir, guestPath: '/work', readOnly: true });
  });
  it('takes :ro and :rw', () => {
    assert.equal(parseAddDirSpec(`${dir}:/work:rw`, base).readOnly, false);
    assert.equal(parseAddDirSpec(`${dir}:/work:ro`, base).readOnly, true);
  });
  it('expands ~ and ~/ from the home directory', () => {
    assert.equal(parseAddDirSpec('~:/home-dir', base).hostPath, realpathSync(homedir()));
    assert.equal(parseAddDirSpec('~/:/home-dir', base).hostPath, realpathSync(homedir()));
  });
  it('normalizes GUEST', () => {
    assert.equal(parseAddDirSpec(`${dir}:/work//a/../b/`, base).guestPath, '/work/b');
  });
  it('ends HOST at the first colon and reads the mode only from a final :ro or :rw, so GUEST may hold colons', () => {
    assert.deepEqual(parseAddDirSpec('proj:/data:v1', base), { spec: 'proj:/data:v1', hostPath: dir, guestPath: '/data:v1', readOnly: true });
    assert.deepEqual(parseAddDirSpec('proj:/a:b:rw', base), { spec: 'proj:/a:b:rw', hostPath: dir, guestPath: '/a:b', readOnly: false });
    assert.equal(parseAddDirSpec('proj:/a:ro:rw', base).guestPath, '/a:ro');
    assert.equal(parseAddDirSpec('proj:/work:rx', base).guestPath, '/work:rx');
    assert.equal(parseAddDirSpec('proj:/a:b/c', base).guestPath, '/a:b/c');
  });
  it('takes a HOST with a colon only in parts (the SDK\'s { host, guest } form)', () => {
    const parts = splitAddDirSpec(`${colonDir}:/work:rw`);
    assert.deepEqual(parts, { spec: `${colonDir}:/work:rw`, host: join(base, 'a'), guest: `b:/work`, readOnly: false });
    assert.equal(resolveAddDir({ spec: 'x', host: colonDir, guest: '/work', readOnly: false }, base).hostPath, colonDir);
  });
  it('rejects every malformed spec with one line', () => {
    rejects('proj', /HOST:GUEST/);
    rejects(':/work', /HOST is empty/);
    rejects('proj:', /mode must be ro or rw|GUEST/);
    rejects('missing:/work', /does not exist/);
    rejects('file:/work', /not a directory/);
    rejects('proj:work', /must be absolute/);
    rejects('proj:/', /may not be \//);
    rejects('proj:/proc', /\/proc/);
    rejects('proj:/proc/self', /\/proc/);
    rejects('proj:/sys', /\/sys/);
    rejects('proj:/dev/shm', /\/dev/);
    rejects('proj:/work/../dev', /\/dev/);
    rejects('proj:/work:', /mode must be ro or rw, got ''/);
    rejects('proj:/work:RO', /mode must be ro or rw, got 'RO'/);
    rejects('proj::rw', /GUEST is empty/);
    rejects(`${colonDir}:/work`, /does not exist/);
    rejects('~nobody-such-user/x:/work', /~user/);
    rejects('proj:/wo\nrk', /control characters/);
  });
});

describe('validateAddDirs', () => {
  const spec = (s: string) => parseAddDirSpec(s, base);
  it('accepts distinct, non-nested GUEST paths', () => {
    validateAddDirs([spec('proj:/work'), spec('ab:/workbench:rw'), spec('proj/sub:/other')]);
  });
  it('rejects a shared GUEST path', () => {
    assert.throws(() => validateAddDirs([spec('proj:/work'), spec('ab:/work/:rw')]), (err: unknown) => {
      assert.ok(err instanceof MvmError);
      assert.match(err.message, /already used by --add-dir 'proj:\/work'/);
      return true;
    });
  });
  it('rejects nested GUEST paths, in either order', () => {
    for (const pair of [['proj:/work', 'proj:/work/sub'], ['proj:/work/sub', 'proj:/work']]) {
      assert.throws(() => validateAddDirs(pair.map(spec)), /is inside \/work .*non-nested/);
    }
  });
  it('rejects HOST directories that are equal or nested when either is rw, naming both specs', () => {
    const pairs = [
      ['proj:/w1:rw', 'proj/sub:/w2:rw'],
      ['proj/sub:/w2:rw', 'proj:/w1:ro'],
      ['proj:/w1:ro', `${dir}/./:/w2:rw`],
      ['/:/w1:rw', 'proj:/w2:ro'],
      ['alias:/w1:rw', 'proj:/w2:rw'],
    ];
    for (const pair of pairs) {
      assert.throws(() => validateAddDirs(pair.map(spec)), (err: unknown) => {
        assert.ok(err instanceof MvmError);
        assert.ok(!err.message.includes('\n'), 'one line');
        for (const s of pair) assert.ok(err.message.includes(`'${s}'`), `names ${s}: ${err.message}`);
        assert.match(err.message, /(inside|same directory as).*separate/);
        return true;
      });
    }
  });
  it('lets read-only HOST directories overlap, and siblings with a shared prefix pass', () => {
    mkdirSync(join(base, 'proj-other'), { recursive: true });
    validateAddDirs([spec('proj:/w1:ro'), spec('proj/sub:/w2:ro'), spec('proj:/w3')]);
    validateAddDirs([spec('proj:/w1:rw'), spec('proj-other:/w2:rw')]);
  });
});

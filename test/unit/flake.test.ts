/**
 * `--flake` (src/flake/) against a stand-in `nix` on PATH: a shell script that answers
 * `flake metadata` from files in the flake directory and "builds" by pointing the out-link at a
 * prepared output. Covers no nix, nix failing, the output layout's checks, the cache under the locked
 * hash (built once, also when two runs race), the first stage of a rootfs output, and the SDK option.
 */
import assert from 'node:assert/strict';
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { InvalidArgumentError } from 'commander';
import { parseFlakeRefFlag } from '../../src/cli/parse.js';
import { MvmError, NixUnavailableError } from '../../src/errors.js';
import { ensureFlakeImage, flakeBootImage, type FlakeImageOptions } from '../../src/flake/index.js';
import { nixErrorLine, parseFlakeRef } from '../../src/flake/nix.js';
import { parseCpio } from '../../src/image/cpio.js';
import { createExec } from '../../src/sdk/exec.js';
import { politeAgent, ScriptedBackend } from './scripted-guest.js';
import { scratchTree } from './scratch.js';

const { base, fresh } = scratchTree('mvm-flake-');
const cacheRoot = join(base, 'cache');
const log = join(base, 'nix.log');

/**
 * The stand-in: `nix … flake metadata --json DIR` prints DIR/rev as the narHash (exit 1 with
 * DIR/metadata-error's text when that exists); `nix … build --json --out-link LINK path:DIR?…#frag`
 * links LINK to DIR/out and logs the build. Every call is logged with its arguments.
 */
const stubBin = fresh('bin');
writeFileSync(
  join(stubBin, 'nix'),
  `#!/bin/sh
echo "$*" >> ${log}
while [ $# -gt 0 ]; do
  case "$1" in
    --extra-experimental-features) shift 2 ;;
    flake) mode=metadata; shift 3; dir=$1; shift ;;
    build) mode=build; shift ;;
    --json) shift ;;
    --out-link) link=$2; shift 2 ;;
    *) url=$1; shift ;;
  esac
done
if [ "$mode" = metadata ]; then
  if [ -f "$dir/metadata-error" ]; then cat "$dir/metadata-error" >&2; exit 1; fi
  rev=$(cat "$dir/rev")
  printf '{"url":"path:%s?narHash=%s","locked":{"type":"path","path":"%s","narHash":"%s"},"locks":{"nodes":{"root":{}},"root":"root","version":7}}\\n' "$dir" "$rev" "$dir" "$rev"
  exit 0
fi
dir=\${url#path:}; dir=\${dir%%\\?*}
if [ -f "$dir/build-error" ]; then cat "$dir/build-error" >&2; exit 1; fi
if [ -f "$dir/build-hangs" ]; then exec sleep 60; fi
sleep 0.2
echo "building '/nix/store/x-guest.drv'..." >&2
ln -sfn "$dir/out" "$link"
printf '[{"drvPath":"/nix/store/x-guest.drv","outputs":{"out":"%s"}}]\\n' "$dir/out"
`,
);
chmodSync(join(stubBin, 'nix'), 0o755);
const pathWithStub = `${stubBin}:${process.env.PATH}`;

const ELF = Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]);

/** A flake directory for the stub: its locked hash `rev`, and an output with these files. */
function stubFlake(files: Record<string, Buffer | string>, rev = 'sha256-one'): string {
  const dir = fresh('flake');
  writeFileSync(join(dir, 'rev'), rev);
  mkdirSync(join(dir, 'out'));
  for (const [name, data] of Object.entries(files)) writeFileSync(join(dir, 'out', name), data);
  return dir;
}

function builds(): number {
  try {
    return readFileSync(log, 'utf8').split('\n').filter((line) => line.includes(' build ')).length;
  } catch {
    return 0;
  }
}

/** Runs `fn` with PATH set to `path` (the code under test looks nix up through process.env.PATH). */
async function withPath<T>(path: string, fn: () => Promise<T>): Promise<T> {
  const saved = process.env.PATH;
  process.env.PATH = path;
  try {
    return await fn();
  } finally {
    process.env.PATH = saved;
  }
}

const options = (progress: string[] = []): FlakeImageOptions => ({ progress: (line) => progress.push(line), signal: new AbortController().signal, cacheRoot });

function nixUnavailable(pattern: RegExp) {
  return (error: unknown) => {
    assert.ok(error instanceof NixUnavailableError, String(error));
    assert.equal(error.exitCode, 125);
    assert.doesNotMatch(error.message, /\n/, 'one line');
    assert.match(error.message, pattern);
    assert.match(error.message, /--template NAME, or -m\/--manifest/, 'names the way round');
    return true;
  };
}

describe('--flake without a working Nix', () => {
  test('no nix on PATH: one line, exit 125, naming --template/--manifest', async () => {
    const dir = stubFlake({ vmlinux: ELF, initrd: 'cpio' });
    await withPath(fresh('empty'), () => assert.rejects(ensureFlakeImage(dir, options()), nixUnavailable(/^--flake needs Nix, and there is no nix on PATH: install it \(Debian: apt-get install nix-bin\)/)));
  });

  test('nix failing (it cannot fetch): nix\'s own error line, exit 125', async () => {
    const dir = stubFlake({});
    writeFileSync(join(dir, 'metadata-error'), "warning: retrying\nerror: unable to download 'https://api.github.com/repos/o/r': Couldn't resolve host name (6)\n       (use '--show-trace')\n");
    await withPath(pathWithStub, () =>
      assert.rejects(ensureFlakeImage(dir, options()), nixUnavailable(/^--flake .*: nix flake metadata failed: unable to download 'https:\/\/api\.github\.com\/repos\/o\/r': Couldn't resolve host name \(6\); boot a template instead/)),
    );
  });

  test('a failing build: its error line, exit 125, and nothing cached', async () => {
    const dir = stubFlake({ vmlinux: ELF, initrd: 'cpio' });
    writeFileSync(join(dir, 'build-error'), "error: builder for '/nix/store/x.drv' failed with exit code 1;\n       last 10 log lines:\n       > boom\n");
    await withPath(pathWithStub, () => assert.rejects(ensureFlakeImage(dir, options()), nixUnavailable(/: nix build failed: builder for '\/nix\/store\/x\.drv' failed with exit code 1;/)));
  });

  test('a build past MVM_FLAKE_BUILD_TIMEOUT is stopped: one line, exit 125', async () => {
    const dir = stubFlake({ vmlinux: ELF, initrd: 'cpio' }, 'sha256-hangs');
    writeFileSync(join(dir, 'build-hangs'), '');
    process.env.MVM_FLAKE_BUILD_TIMEOUT = '1';
    const started = performance.now();
    try {
      await withPath(pathWithStub, () => assert.rejects(ensureFlakeImage(dir, options()), nixUnavailable(/: nix build did not finish within 1 s and was stopped; boot a template instead/)));
    } finally {
      delete process.env.MVM_FLAKE_BUILD_TIMEOUT;
    }
    assert.ok(performance.now() - started < 10_000, 'nix went at SIGTERM, not at the SIGKILL backstop');
  });

  test("nix's error line: the first error:, colours stripped, else the last line", () => {
    assert.equal(nixErrorLine('\x1b[31;1merror:\x1b[0m cannot\n  more\n'), 'cannot');
    assert.equal(nixErrorLine('something odd\nlast words\n'), 'last words');
  });
});

describe('--flake output layout and cache', () => {
  test('vmlinux + initrd: built once, then the cache under the locked hash; a new hash builds again', async () => {
    const dir = stubFlake({ vmlinux: ELF, initrd: 'the initramfs' });
    await withPath(pathWithStub, async () => {
      const before = builds();
      const progress: string[] = [];
      const first = await ensureFlakeImage(dir, options(progress));
      assert.equal(first.kernel, join(dir, 'out', 'vmlinux'));
      assert.equal(first.initrd, join(dir, 'out', 'initrd'));
      assert.equal(first.rootfs, undefined);
      assert.equal(first.kernelSha256.length, 64);
      assert.ok(progress.some((line) => line.startsWith(`--flake ${dir}: building it with nix (path:${dir}?narHash=sha256-one)`)), progress.join('\n'));
      assert.ok(progress.includes("nix: building '/nix/store/x-guest.drv'..."), 'nix\'s lines are progress');
      const again = await ensureFlakeImage(dir, options());
      assert.deepEqual(again, first);
      assert.equal(builds(), before + 1, 'the second run found the cache');
      const buildLine = readFileSync(log, 'utf8').split('\n').filter((line) => line.includes(' build ')).at(-1)!;
      assert.match(buildLine, new RegExp(`^--extra-experimental-features nix-command flakes build --json --out-link ${first.dir}/result path:${dir}\\?narHash=sha256-one$`), 'the locked URL is built');
      writeFileSync(join(dir, 'rev'), 'sha256-two');
      const moved = await ensureFlakeImage(`${dir}#guest`, options());
      assert.notEqual(moved.dir, first.dir);
      assert.equal(builds(), before + 2);
    });
  });

  test('two runs at once build it once (the lock)', async () => {
    const dir = stubFlake({ vmlinux: ELF, initrd: 'x' }, 'sha256-race');
    await withPath(pathWithStub, async () => {
      const before = builds();
      const [a, b] = await Promise.all([ensureFlakeImage(dir, options()), ensureFlakeImage(dir, options())]);
      assert.deepEqual(a, b);
      assert.equal(builds(), before + 1);
    });
  });

  test('rootfs.ext4: booted behind mvm\'s first stage (busybox + agent), rebuilt when the agent changes, not the flake', async () => {
    const dir = stubFlake({ vmlinux: ELF, 'rootfs.ext4': 'ext4' }, 'sha256-rootfs');
    const agentPath = join(fresh('agent'), 'mvm-agent');
    writeFileSync(agentPath, 'agent v1');
    const opts = { ...options(), agentPath };
    await withPath(pathWithStub, async () => {
      const before = builds();
      const image = await ensureFlakeImage(dir, opts);
      assert.equal(image.rootfs, join(dir, 'out', 'rootfs.ext4'));
      assert.equal(image.initrd, join(image.dir, 'initramfs.cpio'));
      const stage = parseCpio(readFileSync(image.initrd));
      assert.ok(stage.some((entry) => entry.path === 'etc/init.d/mvm-root'), 'the template first stage');
      assert.equal(stage.find((entry) => entry.path === 'sbin/mvm-agent')?.data?.toString(), 'agent v1');
      writeFileSync(agentPath, 'agent v2');
      const rebuilt = await ensureFlakeImage(dir, opts);
      assert.equal(parseCpio(readFileSync(rebuilt.initrd)).find((entry) => entry.path === 'sbin/mvm-agent')?.data?.toString(), 'agent v2');
      assert.equal(builds(), before + 1, 'a new agent rebuilds the first stage only');
    });
  });

  test('an output that does not fit the layout: one line naming what is wrong', async () => {
    const cases: [Record<string, Buffer | string>, RegExp][] = [
      [{ initrd: 'x' }, /has no vmlinux; a --flake output must hold vmlinux and one of initrd, rootfs\.ext4/],
      [{ bzImage: 'x', initrd: 'x' }, /has no vmlinux \(it has a bzImage: give the uncompressed vmlinux instead\)/],
      [{ vmlinux: 'MZ not elf', initrd: 'x' }, /vmlinux is not an ELF vmlinux/],
      [{ vmlinux: ELF }, /has neither initrd nor rootfs\.ext4/],
      [{ vmlinux: ELF, initrd: 'x', 'rootfs.ext4': 'y' }, /has both initrd and rootfs\.ext4/],
    ];
    await withPath(pathWithStub, async () => {
      for (const [files, message] of cases) {
        const dir = stubFlake(files, `sha256-${Object.keys(files).join('-')}`);
        await assert.rejects(ensureFlakeImage(dir, options()), (error: unknown) => error instanceof MvmError && error.exitCode === 125 && !error.message.includes('\n') && message.test(error.message), message.source);
      }
    });
  });
});

describe('--flake references', () => {
  test('split at #: the flake for metadata, the fragment kept for the build', () => {
    assert.deepEqual(parseFlakeRef('./dir#guest'), { ref: './dir#guest', flake: './dir', fragment: '#guest' });
    assert.deepEqual(parseFlakeRef('github:o/r'), { ref: 'github:o/r', flake: 'github:o/r', fragment: '' });
    assert.throws(() => parseFlakeRef('#x'), MvmError);
  });

  test('the CLI flag refuses what cannot be a reference (commander prints the flag with it)', () => {
    assert.equal(parseFlakeRefFlag('.'), '.');
    for (const bad of ['', '#x', '--impure']) assert.throws(() => parseFlakeRefFlag(bad), InvalidArgumentError, bad);
  });

  test('exec({ flake }) boots what the flake image gives, cold', async () => {
    const seen: string[] = [];
    const backend = new ScriptedBackend((message, guest) => {
      if (message.type !== 'exec') return politeAgent(message, guest);
      guest.send({ type: 'started', pid: 2 }, { type: 'exit', kind: 0, code: 0, message: '' });
    });
    const exec = createExec({
      backend: () => backend,
      defaultImage: () => async () => assert.fail('not the default image'),
      flakeImage: (ref) => async () => (seen.push(ref), { kernel: '/flake/vmlinux', kernelSha256: 'f', initrd: '/flake/initrd', kernelArgs: [] }),
    });
    const handle = exec(['true'], { accel: 'tcg', flake: './my-guest' });
    handle.stdout.resume();
    handle.stderr.resume();
    assert.equal((await handle.exited).exitCode, 0);
    assert.deepEqual(seen, ['./my-guest']);
    assert.equal(backend.specs[0]!.kernel, '/flake/vmlinux');
    assert.equal(typeof flakeBootImage('.'), 'function');
  });
});

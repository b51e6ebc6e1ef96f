// End to end: `--flake`. Without a working Nix (none on PATH, or a nix that fails): one line, exit
// 125, no VM. With Nix (Debian's nix-bin is enough): flakes with no inputs that build offline (no
// sandbox, `builder = "/bin/sh"`), from the kernel mvmctl built and files of ours, booted with real
// QEMU: one whose output is vmlinux + initrd, one whose output is vmlinux + rootfs.ext4.
import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { cachedKernel } from '../../src/image/kernel.js';
import { buildInitramfsFromFiles } from '../../src/image/initramfs.js';
import { AGENT_BINARY_PATH, BUSYBOX_PATH, KERNEL_FRAGMENT_PATH, KERNEL_SOURCE_TARBALL } from '../../src/image/repo.js';
import { NIX_FEATURES } from '../../src/flake/index.js';
import { cacheDir } from '../../src/paths.js';
import { lastLine, runTool } from '../../src/run-tool.js';
import { findExecutable } from '../../src/which.js';
import { assertNoVmLeft, isolatedEnv, mvmctl } from './helpers.js';

const isolated = isolatedEnv();
const work = mkdtempSync(join(tmpdir(), 'mvm-e2e-flake-'));
// Flakes made here get new hashes every run: their cache entries go with the test. No substituters:
// the store has nothing to fetch, and Nix would retry cache.nixos.org for seconds when offline.
const env = { ...isolated.env, MVM_CACHE_DIR: join(work, 'cache'), NIX_CONFIG: 'substituters =' };
after(() => {
  isolated.cleanup();
  rmSync(work, { recursive: true, force: true });
});

const oneLine125 = (result: { code: number | null; stderr: string }, pattern: RegExp) => {
  assert.equal(result.code, 125, result.stderr);
  assert.match(result.stderr, /^mvmctl: [^\n]+\n$/, 'one line');
  assert.match(result.stderr, pattern);
};

describe('--flake without a working Nix', () => {
  test('no nix on PATH, a nix that cannot fetch, --flake with --template: one line, exit 125, no VM', async () => {
    const nodeOnly = join(work, 'node-only');
    mkdirSync(nodeOnly);
    symlinkSync(process.execPath, join(nodeOnly, 'node'));
    const noNix = await mvmctl(['exec', '--flake', './guest', '--', 'true'], { ...env, PATH: nodeOnly });
    oneLine125(noNix, /^mvmctl: --flake needs Nix, and there is no nix on PATH: .*--template NAME, or -m\/--manifest/);
    const upNoNix = await mvmctl(['up', '--flake', './guest'], { ...env, PATH: nodeOnly });
    oneLine125(upNoNix, /^mvmctl: --flake needs Nix/);

    const failing = join(work, 'failing-nix');
    mkdirSync(failing);
    writeFileSync(join(failing, 'nix'), "#!/bin/sh\necho \"error: unable to download 'https://api.github.com/repos/o/r/commits/HEAD': Couldn't resolve host name (6)\" >&2\nexit 1\n", { mode: 0o755 });
    const cannotFetch = await mvmctl(['exec', '--flake', 'github:o/r', '--', 'true'], { ...env, PATH: `${failing}:${process.env.PATH}` });
    oneLine125(cannotFetch, /^mvmctl: --flake github:o\/r: nix flake metadata failed: unable to download .*Couldn't resolve host name \(6\); boot a template instead \(--template NAME, or -m\/--manifest\)/);

    oneLine125(await mvmctl(['exec', '--flake', '.', '--template', 'x', '--', 'true'], env), /cannot be used with option '--template/);
    oneLine125(await mvmctl(['exec', '--flake', '.', '-m', 'x', '--', 'true'], env), /cannot be used with option '-m, --manifest/);
    oneLine125(await mvmctl(['exec', '--flake', '#x', '--', 'true'], env), /argument '#x' is invalid/);
    await assertNoVmLeft(isolated.stateDir);
  });
});

/** Why the Nix tests cannot run here, or undefined. */
async function nixSkipReason(): Promise<string | undefined> {
  const nix = findExecutable('nix');
  if (!nix) return 'no nix on PATH (Debian: apt-get install nix-bin nix-setup-systemd)';
  // A nix that cannot reach its store (not root, and no nix-daemon running) could build nothing.
  const ping = await runTool(nix, [...NIX_FEATURES, 'store', 'ping'], { timeoutMs: 20_000 }).catch((error: Error) => ({ code: 1, stderr: error.message }));
  if (ping.code !== 0) return `nix cannot reach its store: ${lastLine(ping.stderr)}`;
  const kernel = await cachedKernel({ cacheRoot: cacheDir(), fragmentPath: KERNEL_FRAGMENT_PATH, sourceTarball: KERNEL_SOURCE_TARBALL }).catch(() => undefined);
  if (!kernel) return 'mvmctl has not built its kernel yet (mvmctl image build)';
  return undefined;
}

/** A flake with no inputs whose builder copies (or makes) its output from files beside flake.nix. */
function writeFlake(dir: string, script: string): void {
  writeFileSync(
    join(dir, 'flake.nix'),
    `{
  description = "mvmctl e2e: a guest built offline";
  outputs = { self }: {
    packages.x86_64-linux.default = builtins.derivation {
      name = "mvm-e2e-guest";
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [ "-c" ''
        set -e
        /bin/mkdir -p $out
        /bin/cp \${./vmlinux} $out/vmlinux
${script}
      '' ];
    };
  };
}
`,
  );
}

describe('--flake with Nix', async () => {
  const skip = await nixSkipReason();

  test('vmlinux + initrd: built by nix build, booted, cached under the locked hash', { skip }, async () => {
    const kernel = (await cachedKernel({ cacheRoot: cacheDir(), fragmentPath: KERNEL_FRAGMENT_PATH, sourceTarball: KERNEL_SOURCE_TARBALL }))!;
    const dir = join(work, 'initrd-flake');
    mkdirSync(dir);
    copyFileSync(kernel.vmlinux, join(dir, 'vmlinux'));
    writeFileSync(join(dir, 'initrd'), await buildInitramfsFromFiles({ busyboxPath: BUSYBOX_PATH, agentPath: AGENT_BINARY_PATH }));
    writeFlake(dir, '        /bin/cp ${./initrd} $out/initrd');
    const first = await mvmctl(['exec', '-v', '--flake', dir, '--', 'sh', '-c', 'echo from the flake; exit 3'], env);
    assert.equal(first.code, 3, first.stderr);
    assert.equal(first.stdout.toString(), 'from the flake\n');
    assert.match(first.stderr, /--flake .*: building it with nix \(path:/);
    const second = await mvmctl(['exec', '-v', '--flake', dir, '--', 'true'], env);
    assert.equal(second.code, 0, second.stderr);
    assert.doesNotMatch(second.stderr, /building it with nix/, 'the second run boots the cached build');
    await assertNoVmLeft(isolated.stateDir);
  });

  test("vmlinux + rootfs.ext4: the root file system is the command's /, behind mvmctl's agent", { skip }, async () => {
    const kernel = (await cachedKernel({ cacheRoot: cacheDir(), fragmentPath: KERNEL_FRAGMENT_PATH, sourceTarball: KERNEL_SOURCE_TARBALL }))!;
    const dir = join(work, 'rootfs-flake');
    mkdirSync(dir);
    copyFileSync(kernel.vmlinux, join(dir, 'vmlinux'));
    copyFileSync(BUSYBOX_PATH, join(dir, 'busybox'));
    // The ext4 is made in the build (mke2fs -d, no root needed): no sandbox, so host tools are at hand.
    writeFlake(
      dir,
      `        t=$TMPDIR/tree
        /bin/mkdir -p $t/bin $t/etc
        /bin/cp \${./busybox} $t/bin/busybox
        for a in sh cat; do /bin/ln -s busybox $t/bin/$a; done
        echo "made by nix" > $t/etc/flake-marker
        /sbin/mke2fs -q -F -t ext4 -O ^has_journal -d $t $out/rootfs.ext4 32M`,
    );
    const run = await mvmctl(['exec', '--flake', dir, '--', 'sh', '-c', 'cat /etc/flake-marker; echo written > /etc/w; cat /etc/w'], env);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout.toString(), 'made by nix\nwritten\n');
    await assertNoVmLeft(isolated.stateDir);
  });
});

import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { after, describe, test } from 'node:test';
import { qemuArgs } from '../../src/backends/qemu/index.js';
import type { VmSpec } from '../../src/backends/types.js';
import { MVM_ROOT_SCRIPT, TEMPLATE_INITTAB } from '../../src/templates/initramfs.js';
import { openTemplate, requireTemplate, validateTemplateName } from '../../src/templates/store.js';

const base: VmSpec = { name: 'vm', runDir: '/run/x', kernel: '/k', initrd: '/i', kernelArgs: [], accel: 'tcg', cpus: 2, memoryMiB: 512, drives: [] };

describe('QEMU arguments for templates and snapshots', () => {
  test('a plain VM: no memory backend, no root drive; a monitor that watches its run state', () => {
    const args = qemuArgs(base).join(' ');
    assert.match(args, /-M microvm,acpi=off /);
    assert.doesNotMatch(args, /memory-backend|-incoming|rootdrive/);
    assert.match(args, /-qmp unix:\/run\/x\/qmp.sock,server=on,wait=off/);
  });

  test('TCG gets the timer workarounds; KVM gets the host CPU and none of them', () => {
    const tcg = qemuArgs(base, { tscKhz: 2096000 }).join(' ');
    assert.match(tcg, /-accel tcg /);
    assert.match(tcg, / noapictimer tsc_early_khz=2096000 /);
    const kvm = qemuArgs({ ...base, accel: 'kvm' }, { tscKhz: 2096000 }).join(' ');
    assert.match(kvm, /-accel kvm -cpu host /);
    assert.doesNotMatch(kvm, /noapictimer|tsc_early_khz/);
  });

  test('commas in state paths are escaped in every option that names a file', () => {
    const args = qemuArgs({ ...base, runDir: '/st,ate/x', drives: [{ path: '/st,ate/x/d.img', readOnly: false }] });
    assert.ok(args.includes('socket,id=agent,path=/st,,ate/x/agent.sock,server=on,wait=off'), args.join(' '));
    assert.ok(args.includes('unix:/st,,ate/x/qmp.sock,server=on,wait=off'));
    assert.ok(args.includes('file=/st,,ate/x/d.img,format=raw,if=none,id=drive0,readonly=off'));
  });

  test('root drive: serial mvmroot, copy-on-write, before the --add-dir drives', () => {
    const args = qemuArgs(
      { ...base, rootDrive: { path: '/t/root,fs.ext4', copyOnWrite: true }, drives: [{ path: '/d.img', readOnly: true }] }
    );
    const root = args.indexOf('file=/t/root,,fs.ext4,format=raw,if=none,id=rootdrive,snapshot=on');
    assert.ok(root > 0, args.join(' '));
    assert.equal(args[root + 2], 'virtio-blk-device,drive=rootdrive,serial=mvmroot');
    assert.ok(args.indexOf('virtio-blk-device,drive=drive0,serial=mvm0') > root);
  });

  test('vsock: RAM shared with the device through a memfd, the vhost-user device on its socket, no virtio-serial port', () => {
    const args = qemuArgs({ ...base, runDir: '/st,ate/x' }, { vsock: true });
    assert.ok(args.includes('microvm,acpi=off,memory-backend=mem'));
    assert.ok(args.includes('memory-backend-memfd,id=mem,size=512M,share=on'));
    assert.ok(args.includes('socket,id=vhostvsock,path=/st,,ate/x/vhost-vsock.sock'));
    assert.ok(args.includes('vhost-user-vsock-device,chardev=vhostvsock'));
    assert.ok(!args.includes('virtio-serial-device'));
    assert.ok(args[args.indexOf('-append') + 1]!.split(' ').includes('mvm.agent=vsock'));
  });

  test('a root drive is raw unless it is a qcow2 overlay the backend made', () => {
    assert.ok(qemuArgs({ ...base, rootDrive: { path: '/s/disk.qcow2', copyOnWrite: true } }).includes('file=/s/disk.qcow2,format=qcow2,if=none,id=rootdrive,snapshot=on'));
    assert.ok(qemuArgs({ ...base, rootDrive: { path: '/t/rootfs.qcow2.ext4', copyOnWrite: false } }).includes('file=/t/rootfs.qcow2.ext4,format=raw,if=none,id=rootdrive,snapshot=off'));
  });

  test('capture: RAM in a shared file and a monitor; restore: private mapping and -incoming defer', () => {
    const capture = qemuArgs({ ...base, snapshot: { mode: 'capture', dir: '/s' } });
    assert.ok(capture.includes('microvm,acpi=off,memory-backend=mem'));
    assert.ok(capture.includes('memory-backend-file,id=mem,mem-path=/s/ram,size=512M,share=on'));
    assert.ok(capture.includes('unix:/run/x/qmp.sock,server=on,wait=off'));
    assert.ok(!capture.includes('-incoming'));
    const restore = qemuArgs({ ...base, snapshot: { mode: 'restore', dir: '/s' } });
    assert.ok(restore.includes('memory-backend-file,id=mem,mem-path=/s/ram,size=512M,share=off'));
    assert.equal(restore[restore.indexOf('-incoming') + 1], 'defer');
  });
});

describe('template boot scripts', () => {
  test('init supervises the agent chrooted into the root drive found by serial', () => {
    assert.match(TEMPLATE_INITTAB, /^::once:\/bin\/busybox sh -c '\/bin\/busybox chroot \/newroot \/\.mvm\/mvm-agent; exec \/bin\/busybox reboot -f'$/m);
    assert.match(MVM_ROOT_SCRIPT, /= mvmroot \]/);
    assert.match(MVM_ROOT_SCRIPT, /mount -t ext4 -o rw,noatime "\$dev" \/newroot/);
    assert.match(MVM_ROOT_SCRIPT, /mount -o remount,ro \/newroot\/\.mvm/);
  });
});

describe('template names and lookup', () => {
  const data = mkdtempSync(join(tmpdir(), 'mvm-unit-tpl-'));
  const saved = process.env.MVM_DATA_DIR;
  process.env.MVM_DATA_DIR = data;
  after(() => {
    process.env.MVM_DATA_DIR = saved;
    rmSync(data, { recursive: true, force: true });
  });

  test('names: letters, digits, . _ -; no leading dot, no slashes', () => {
    for (const ok of ['py', 'debian-12', 'a.b_c']) validateTemplateName(ok);
    for (const bad of ['', '.hidden', '-x', 'a/b', '..', 'a..b', 'x'.repeat(65), 'sp ace']) {
      assert.throws(() => validateTemplateName(bad), /not a valid template name/, bad);
    }
  });

  test('an unknown name is an MvmError (125) that says how to make one', async () => {
    await assert.rejects(requireTemplate('nope'), (error: Error & { exitCode?: number }) => {
      assert.equal(error.exitCode, 125);
      assert.match(error.message, /no template named 'nope' \(there are none yet: create one with 'mvmctl template build nope'\)/);
      return true;
    });
  });

  test('a template by name or by the path of its directory (the NAME symlink or a version directory); anything else is one line', async () => {
    const templates = join(data, 'templates');
    const version = join(templates, '.t.v-1-ab');
    mkdirSync(version, { recursive: true });
    writeFileSync(join(version, 'template.json'), JSON.stringify({ format: 1, name: 't' }));
    symlinkSync('.t.v-1-ab', join(templates, 't'));
    for (const ref of ['t', join(templates, 't'), version, `./${relative(process.cwd(), version)}`]) {
      const template = await openTemplate(ref);
      assert.deepEqual([template.name, template.dir], ['t', version], ref);
    }
    const notTemplate = join(data, 'plain');
    mkdirSync(notTemplate);
    const refused: [string, RegExp][] = [
      [notTemplate, /^\/.+\/plain is not a template directory: it holds no template\.json of a template \(templates are in .+; make one with 'mvmctl template build NAME'\)$/],
      [join(version, 'template.json'), /is not a template directory/],
      ['./no-such-dir', /^template directory \.\/no-such-dir does not exist$/],
      ['nope', /^no template named 'nope' \(templates: t\)$/],
    ];
    for (const [ref, message] of refused) {
      await assert.rejects(openTemplate(ref), (error: Error & { exitCode?: number }) => error.exitCode === 125 && message.test(error.message), ref);
    }
  });
});

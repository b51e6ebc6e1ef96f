import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Command, Option } from 'commander';
import { BACKEND_CHOICES, backendChoice, selectBackend, type BackendChoice } from '../backends/index.js';
import { NET_MODES, type NetMode } from '../net/spec.js';
import { MvmError } from '../errors.js';
import { progressReporter } from '../progress.js';
import { planBootAccel } from '../vm/index.js';
import { captureSnapshot, readSnapshotMeta, removeSnapshot, verifySnapshot, type SnapshotMeta } from '../snapshots/index.js';
import { buildTemplate, collectGarbage, listTemplates, removeTemplate, requireTemplate, templateSubject, vmsUsing, type Template } from '../templates/index.js';
import { accelChoice, type AccelChoice } from '../accel/index.js';
import { accelOption, bootTimeoutFromEnv, logLine, parseIntegerIn, parseMemory } from './parse.js';
import { runInterruptibly } from './signals.js';
import { table } from './table.js';

function mib(bytes: number): string {
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

function sourceText(template: Template): string {
  const source = template.meta.source;
  return source.kind === 'default' ? 'default image' : `${source.kind === 'rootfs-dir' ? 'dir' : 'tar'} ${source.path}`;
}

async function snapshotOf(template: Template): Promise<{ dir: string; meta: SnapshotMeta } | 'damaged' | undefined> {
  try {
    return await readSnapshotMeta(template.dir);
  } catch {
    return 'damaged';
  }
}

/** Disk space actually used by a file (they are sparse). */
async function allocated(path: string): Promise<number> {
  const info = await stat(path).catch(() => undefined);
  return info ? info.blocks * 512 : 0;
}

async function summary(template: Template) {
  const snapshot = await snapshotOf(template);
  const m = template.meta;
  return {
    name: template.name,
    directory: template.dir,
    createdAt: m.createdAt,
    source: m.source,
    cpus: m.cpus,
    memoryMiB: m.memoryMiB,
    agentVersion: m.agentVersion ?? null,
    kernel: m.kernel,
    initrd: m.initrd,
    rootfs: m.rootfs ?? null,
    snapshot:
      snapshot === 'damaged'
        ? { state: 'damaged' }
        : snapshot
          ? {
              state: 'present',
              createdAt: snapshot.meta.createdAt,
              cpus: snapshot.meta.cpus,
              memoryMiB: snapshot.meta.memoryMiB,
              vmm: snapshot.meta.vmm.version,
              accel: snapshot.meta.accel ?? null,
              agentVersion: snapshot.meta.agentVersion,
              bootSeconds: snapshot.meta.bootSeconds,
              files: snapshot.meta.files,
            }
          : null,
  };
}

/** `mvmctl template build|ls|info|rm|snapshot`: registered images for `exec --template NAME`. */
export function templateCommand(): Command {
  const template = new Command('template').description('build and manage templates: guest images for `mvmctl exec --template NAME`, with optional snapshots');
  // Every template command first removes what killed builds and snapshots left behind (store.ts).
  template.hook('preAction', () => collectGarbage());

  template
    .command('build')
    .description('build (or replace) a template from the default image or your root file system')
    .argument('<name>', 'template name (letters, digits, . _ -)')
    .option('--rootfs-dir <dir>', 'use this directory as the root file system (e.g. made by debootstrap); it is not modified')
    .option('--rootfs-tar <file>', 'use this tar as the root file system (e.g. docker export output)')
    .option('--kernel <path>', 'boot this uncompressed vmlinux (default: the default image kernel, or MVM_KERNEL)')
    .option('--cpus <n>', 'default virtual CPUs for this template', parseIntegerIn(1, 64), 2)
    .option('--memory <size>', 'default guest memory for this template', parseMemory, 512)
    .option('--disk-free <size>', 'free space in the root file system for the guest to write into (sparse)', parseMemory, 1024)
    .addOption(new Option('--net <mode>', "the network exec gives this template's guests unless --net says otherwise (snapshots are taken without a NIC)").choices(NET_MODES).default('none'))
    .option('--snapshot', 'boot the template once and capture a snapshot that exec restores from')
    .addOption(new Option('--backend <name>', 'VMM to use for the snapshot').choices(BACKEND_CHOICES))
    .addOption(accelOption())
    .option('-v, --verbose', 'show progress even when stderr is not a terminal')
    .action(
      async (
        name: string,
        options: { rootfsDir?: string; rootfsTar?: string; kernel?: string; cpus: number; memory: number; diskFree: number; net: NetMode; snapshot?: boolean; backend?: BackendChoice; accel?: AccelChoice; verbose?: boolean },
      ) => {
        const progress = progressReporter({ force: options.verbose });
        const backend = selectBackend(backendChoice(options.backend));
        const accel = accelChoice(options.accel);
        process.exitCode = await runInterruptibly(async (signal) => {
          const built = await buildTemplate({
            name,
            rootfsDir: options.rootfsDir,
            rootfsTar: options.rootfsTar,
            kernel: options.kernel,
            cpus: options.cpus,
            memoryMiB: options.memory,
            net: options.net,
            freeBytes: options.diskFree * 1048576,
            snapshot: options.snapshot ?? false,
            backend,
            progress,
            signal,
            bootTimeoutMs: bootTimeoutFromEnv(),
            accel,
            log: logLine,
          });
          process.stdout.write(`${built.name}\n`);
          return 0;
        });
      },
    );

  template
    .command('ls')
    .description('list templates')
    .option('--json', 'print JSON instead of a table')
    .action(async (options: { json?: boolean }) => {
      const templates = await listTemplates();
      if (options.json) {
        process.stdout.write(JSON.stringify(await Promise.all(templates.map(summary)), null, 2) + '\n');
        return;
      }
      const rows = [['NAME', 'SOURCE', 'CPUS', 'MEMORY', 'DISK', 'SNAPSHOT', 'CREATED']];
      for (const t of templates) {
        const snapshot = await snapshotOf(t);
        const disk = (await allocated(join(t.dir, t.meta.kernel.file))) + (await allocated(join(t.dir, t.meta.initrd.file))) + (t.meta.rootfs ? await allocated(join(t.dir, t.meta.rootfs.file)) : 0);
        rows.push([t.name, sourceText(t), String(t.meta.cpus), `${t.meta.memoryMiB}M`, mib(disk), snapshot === 'damaged' ? 'damaged' : snapshot ? 'yes' : 'no', t.meta.createdAt]);
      }
      process.stdout.write(templates.length ? table(rows) : '');
    });

  template
    .command('info')
    .description('show a template and its snapshot')
    .argument('<name>')
    .option('--json', 'print JSON')
    .option('--verify', 'recompute every checksum of the snapshot (reads the whole RAM file)')
    .action(async (name: string, options: { json?: boolean; verify?: boolean }) => {
      const t = await requireTemplate(name);
      const info = await summary(t);
      const problems = options.verify ? await verifySnapshot(t.dir) : undefined;
      const users = await vmsUsing(t.dir);
      if (options.json) {
        process.stdout.write(JSON.stringify({ ...info, inUseBy: users, ...(problems ? { verifyProblems: problems } : {}) }, null, 2) + '\n');
      } else {
        const m = t.meta;
        const lines = [
          `name:        ${t.name}`,
          `directory:   ${t.dir}`,
          `created:     ${m.createdAt}`,
          `source:      ${sourceText(t)}`,
          `defaults:    ${m.cpus} CPUs, ${m.memoryMiB} MiB, network ${m.net ?? 'none'}`,
          `kernel:      ${m.kernel.file} (${mib(m.kernel.size)}, from ${m.kernel.origin}, sha256 ${m.kernel.sha256.slice(0, 16)}…)`,
          `initrd:      ${m.initrd.file} (${mib(m.initrd.size)}, sha256 ${m.initrd.sha256.slice(0, 16)}…)`,
          m.rootfs
            ? `root drive:  ${m.rootfs.file} (${m.rootfs.entries} entries, ${mib(m.rootfs.contentBytes)} of files, image ${mib(m.rootfs.size)} sparse, sha256 ${m.rootfs.sha256.slice(0, 16)}…)`
            : 'root drive:  none (the default image runs from its initramfs)',
          `agent:       ${m.agentVersion ?? 'unknown'}`,
          info.snapshot === null
            ? `snapshot:    none ('mvmctl template snapshot ${t.name}' takes one)`
            : info.snapshot.state === 'damaged'
              ? 'snapshot:    damaged (unreadable metadata)'
              : `snapshot:    taken ${info.snapshot.createdAt} with ${info.snapshot.vmm} under ${info.snapshot.accel ?? 'an unrecorded accelerator'}, ${info.snapshot.cpus} CPUs, ${info.snapshot.memoryMiB} MiB (agent ready ${info.snapshot.bootSeconds?.toFixed(2)} s after boot)`,
          `in use by:   ${users.length ? users.join(', ') : 'no running VM'}`,
        ];
        if (problems) lines.push(`verify:      ${problems.length ? problems.join('; ') : 'all checksums match'}`);
        process.stdout.write(lines.join('\n') + '\n');
      }
      if (problems?.length) process.exitCode = 1;
    });

  template
    .command('rm')
    .description('remove a template (refused while a VM started from it is running, unless --force)')
    .argument('<name>')
    .option('--force', 'remove it even while VMs run from it (they keep working: their files stay open)')
    .action(async (name: string, options: { force?: boolean }) => {
      await removeTemplate(name, options.force ?? false);
    });

  template
    .command('snapshot')
    .description('boot the template once, wait for its agent, and capture a snapshot that exec --template restores from')
    .argument('<name>')
    .option('--rm', 'remove the template’s snapshot instead')
    .addOption(new Option('--backend <name>', 'VMM to use').choices(BACKEND_CHOICES))
    .addOption(accelOption())
    .option('-v, --verbose', 'show progress even when stderr is not a terminal')
    .action(async (name: string, options: { rm?: boolean; backend?: BackendChoice; accel?: AccelChoice; verbose?: boolean }) => {
      const t = await requireTemplate(name);
      if (options.rm) {
        if (!(await removeSnapshot(t.dir))) throw new MvmError(`template '${name}' has no snapshot`, 1);
        return;
      }
      const backend = selectBackend(backendChoice(options.backend));
      const accel = accelChoice(options.accel);
      const progress = progressReporter({ force: options.verbose });
      process.exitCode = await runInterruptibly(async (signal) => {
        const plan = await planBootAccel(backend, accel, t.meta.kernel.sha256, logLine);
        await captureSnapshot(templateSubject(t), { backend, progress, signal, bootTimeoutMs: bootTimeoutFromEnv(), accel: plan, log: logLine });
        return 0;
      });
    });

  return template;
}
